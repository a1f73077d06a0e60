"""Time loading a trained run's model as predict/export/app do it: best of N in one process.

    python benchmarks/model_loading.py outputs/<run> [outputs/<other run> ...] [--repeats 5]

Times ``Predictor.from_model`` (the model file through ``load_model``) on the CPU and, once more
step by step, where that time goes (header, config check, build incl. backbone weights, backbone
checksum, tensor read, checks + state load). Run against a defectlab from before model files
(PYTHONPATH=<its src>), the script times that version's ``Predictor.from_checkpoint`` on
``checkpoints/model.ckpt`` instead: the before/after numbers of docs/model-files.md. Writes
``model_loading.json`` / ``.md`` into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from pathlib import Path

from _common import write_outputs

import defectlab
from defectlab.inference import Predictor


def _best(fn: Callable[[], object], repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls (after one warm-up call), in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _steps(path: Path, repeats: int) -> dict[str, float]:
    """Best time of each step of ``load_model`` (same calls, in the same order), in ms."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from defectlab.build import build_run_system
    from defectlab.components.backbone import FeatureExtractor, frozen_weight_keys
    from defectlab.config_targets import check_config_targets
    from defectlab.model_file import _check_tensors, read_metadata

    best: dict[str, float] = {}

    def lap(name: str, start: float) -> float:
        now = time.perf_counter()
        best[name] = min(best.get(name, float("inf")), 1000 * (now - start))
        return now

    for _ in range(repeats + 1):
        t = time.perf_counter()
        meta = read_metadata(path)
        t = lap("header_ms", t)
        cfg = OmegaConf.create(meta["config"])
        check_config_targets(cfg, str(path))
        t = lap("config_check_ms", t)
        system = build_run_system(cfg)
        t = lap("build_ms", t)
        for module in system.modules():
            if isinstance(module, FeatureExtractor):
                module.weights_sha256()
        t = lap("backbone_sha256_ms", t)
        tensors = load_file(path)
        t = lap("read_tensors_ms", t)
        extra = meta.get("extra_state") or {}
        _check_tensors(system, tensors, extra, path)
        own = system.state_dict()
        state = {**tensors, **extra, **{k: own[k] for k in frozen_weight_keys(system)}}
        system.load_state_dict(state, strict=True)
        lap("check_and_load_ms", t)
        del system, tensors, state, own
        gc.collect()
    return best


def measure(run: Path, repeats: int) -> dict:
    """Load time of one run's model (model file, or an older version's model.ckpt)."""
    if hasattr(Predictor, "from_model"):
        from defectlab.model_file import resolve_model_path

        path = resolve_model_path(run)
        total = _best(lambda: Predictor.from_model(run, "cpu"), repeats)
        steps = _steps(path, repeats)
        loader = "Predictor.from_model (model file)"
    else:  # a defectlab from before model files (the "before" measurement)
        path = run / "checkpoints" / "model.ckpt"
        total = _best(lambda: Predictor.from_checkpoint(path, "cpu"), repeats)
        steps = {}
        loader = "Predictor.from_checkpoint (Lightning checkpoint, pickle)"
    return {
        "run": str(run),
        "file": str(path),
        "file_mb": path.stat().st_size / 2**20,
        "loader": loader,
        "defectlab": defectlab.__file__,
        "repeats": repeats,
        "best_ms": 1000 * total,
        "steps": steps,
    }


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| run | loader | file MB | best of N ms | steps (best ms each) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        steps = ", ".join(f"{k.removesuffix('_ms')} {v:.0f}" for k, v in r["steps"].items())
        lines.append(
            f"| {Path(r['run']).name} | {r['loader']} | {r['file_mb']:.1f} | {r['best_ms']:.0f} "
            f"| {steps or '–'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train.py run folders")
    parser.add_argument("--repeats", type=int, default=5, help="timed loads per run (best is kept)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    rows = [measure(run, args.repeats) for run in args.runs]
    write_outputs(args.out, "model_loading", {"rows": rows}, to_markdown(rows))
    return rows


if __name__ == "__main__":
    main()
