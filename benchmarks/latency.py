"""Inference latency of trained runs: batch-1 p50/p95 and batch-N throughput.

    python benchmarks/latency.py outputs/<run> [outputs/<other run> ...] [--batch 32] [--repeats 50]

Scores real images of each run's own test set through the deployable path (``predict.py``'s
Predictor: pre-processing, model, normalisation, verdict), after warm-up, on the GPU when one is
present (``--device cpu`` to force the CPU). Writes ``latency.json`` and ``latency.md`` into
``--out`` (default ``benchmarks/results``) and prints the table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _common import test_image_paths, write_outputs

from defectlab.data import image_tensor, load_image
from defectlab.export import FORMATS, Artefact
from defectlab.inference import Predictor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(single, batched, repeats: int, batch: int, sync) -> dict:
    """batch-1 p50/p95 (``single(i)`` scores one image) and images/s of ``batched()`` (``batch``)."""
    for i in range(3):  # warm-up: allocator, cuDNN autotuning, faiss index, ORT arenas
        single(i)
    times = []
    for i in range(repeats):
        sync()
        start = time.perf_counter()
        single(i)
        sync()
        times.append(time.perf_counter() - start)
    batched()  # warm-up at batch size
    rounds = max(3, repeats // 10)
    sync()
    start = time.perf_counter()
    for _ in range(rounds):
        batched()
    sync()
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(times, n=20)  # 5 % steps: q[9] = p50, q[18] = p95
    return {
        "batch1_p50_ms": 1000 * q[9],
        "batch1_p95_ms": 1000 * q[18],
        "batch_images_per_s": rounds * batch / elapsed,
    }


def measure(run_dir: Path, batch: int, repeats: int, device: str, exported: bool) -> list[dict]:
    """Latency and throughput of one run on its own test images (repeated to fill a batch).

    With ``exported``, also of the run's ``export/model.onnx`` / ``model.pt`` files, fed the
    decoded uint8 frames (their time includes the resize the Lightning path did beforehand).
    """
    predictor = Predictor.from_model(run_dir, device)
    cfg = predictor.run_config
    paths = test_image_paths(cfg, max(batch, 8))
    images = torch.stack([predictor.load(p) for p in paths])
    images = images.repeat((batch + len(images) - 1) // len(images), 1, 1, 1)[:batch]
    names = [str(p) for p in paths]
    base = {
        "run": str(run_dir),
        "model": cfg.get("model_name"),
        "backbone": cfg.get("backbone_name")
        if hasattr(predictor.system.model, "extractor")
        else None,
        "image_size": cfg.data.image_size,
        "batch": batch,
    }

    def sync() -> None:
        _sync(predictor.device)

    timing = _time(
        lambda i: predictor.score(images[i % len(images)][None], names[:1]),
        lambda: predictor.score(images, names),
        repeats,
        batch,
        sync,
    )
    rows = [{**base, "runtime": "lightning", "device": str(predictor.device), **timing}]
    if not exported:
        return rows
    frames = np.stack([image_tensor(load_image(p)).numpy() for p in paths])
    frames = np.concatenate([frames] * ((batch + len(frames) - 1) // len(frames)))[:batch]
    for fmt, suffix in FORMATS.items():
        path = run_dir / "export" / f"model{suffix}"
        if not path.is_file():
            continue
        artefact = Artefact(path)
        timing = _time(
            lambda i, a=artefact: a(frames[i % len(frames)][None]),
            lambda a=artefact: a(frames),
            repeats,
            batch,
            lambda: None,
        )
        rows.append({**base, "runtime": fmt, "device": "cpu", **timing})
    return rows


def to_markdown(rows: list[dict]) -> str:
    head = "| model | backbone | px | runtime | device | batch-1 p50 ms | batch-1 p95 ms | batch | images/s |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['backbone'] or '–'} | {r['image_size']} | {r['runtime']} | "
            f"{r['device']} | "
            f"{r['batch1_p50_ms']:.1f} | {r['batch1_p95_ms']:.1f} | {r['batch']} | "
            f"{r['batch_images_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train.py run folders")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the throughput test")
    parser.add_argument("--repeats", type=int, default=50, help="batch-1 timings per run")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument(
        "--exported", action="store_true", help="also time <run>/export/model.onnx and model.pt"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    rows = [
        row
        for run in args.runs
        for row in measure(run, args.batch, args.repeats, args.device, args.exported)
    ]
    write_outputs(args.out, "latency", {"rows": rows}, to_markdown(rows))
    return rows


if __name__ == "__main__":
    main()
