"""PatchCore per stage: seconds, images/s, peak RSS and bank size for one composed config.

    python benchmarks/patchcore_speed.py [train.py overrides ...] [--max-test 64] [--out DIR]
    python benchmarks/patchcore_speed.py data.category=poly sampler.ratio=0.01
    python benchmarks/patchcore_speed.py embedding=native --threads 1 --clock cpu

Stages, each timed on its own after warm-up:
  extract  backbone + patch embedding of every fit image (train loader), once per bank
  coreset  the sampler on all fit embeddings, and the bank's Eq. 7 neighbours (also timed alone)
  knn      nearest-neighbour search + image score (Eq. 7), on test images (every bank)
  map      anomaly-map upsampling + blur, on test images
With ``model.scales=two`` (two banks on one backbone pass) extract and coreset run for each bank,
as in training, and the test-time stages cover both banks (one backbone pass).
and the whole ``predict`` at batch 1 and 32. The backbone's forward alone (the floor) is timed
in the same process, alternating with ``predict`` round by round, so that both see the same
machine load (on a shared 2-core machine the floor alone varied 2x between processes); the
share of the floor is ``predict`` images/s over backbone images/s, the backbone taking the faster
of the full batch and ``model.memory.embed_batch`` slices. ``--threads 1 --clock cpu`` times
everything in this process's CPU time on one thread: on a machine that other processes load
(several times more runnable threads than cores), wall-clock shares moved 3x between stages that
wait on each other's threads, while CPU time stays what the work costs. Writes ``patchcore_speed.json`` /
``.md`` into ``--out`` (default ``benchmarks/results``) with the machine it ran on.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import write_outputs
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from defectlab.build import build, build_model
from defectlab.models import PatchCore
from defectlab.models.two_scale import TwoScalePatchCore
from defectlab.systems.bank_fitting import embedding_rows

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux: the high-water mark of this process so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# perf_counter (wall) or process_time (--clock cpu), set by main().
CLOCK = time.perf_counter


def _timed(fn, repeats: int = 1) -> tuple[float, object]:
    start = CLOCK()
    for _ in range(repeats):
        out = fn()
    return (CLOCK() - start) / repeats, out


def _interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each of ``fns``, called in turn ``rounds`` times (after one warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = CLOCK()
            fn()
            times[name].append(CLOCK() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def compose_config(overrides: list[str], out_dir: Path):
    """The train.py config with ``overrides``, outputs pointed at ``out_dir``."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out_dir}", *overrides])


def first_test_images(datamodule, count: int) -> torch.Tensor:
    """The first ``count`` test images, pre-processed, ``(count, 3, H, W)``."""
    datamodule.setup("test")
    images = []
    for batch in datamodule.test_dataloader():
        images.append(batch["image"])
        if sum(len(b) for b in images) >= count:
            break
    return torch.cat(images)[:count]


@torch.inference_mode()  # as the system scores: Lightning's test loop, Inference.score
def measure(overrides: list[str], max_test: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(overrides, Path(tmp))
        torch.manual_seed(cfg.seed)
        datamodule = build(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        model = build_model(cfg)
        if not isinstance(model, (PatchCore, TwoScalePatchCore)):
            raise SystemExit(
                f"model={cfg.model_name} (backbone={cfg.backbone.name}): this benchmark is for "
                "PatchCore on one backbone"
            )
        model.eval()

        # The same path as training: each bank's model.memory buffer (dtype, storage, chunking),
        # filled from the train loader and turned into its bank before the next bank's pass.
        extract_s = coreset_s = neighbors_s = buffer_mb = 0.0
        rss_after_extract = 0.0
        banks = []
        for bank in model.bank_models():
            per_image = len(next(embedding_rows(bank, datamodule.fit_set[0]["image"][None])))
            buffer = bank.embedding_buffer(
                len(datamodule.fit_set) * per_image, bank.memory_bank.shape[1]
            )
            start = CLOCK()
            fit_images = 0
            for b in datamodule.train_dataloader():
                for rows in embedding_rows(bank, b["image"]):
                    buffer.add(rows)
                fit_images += len(b["image"])
            # Chunked: the per-chunk coresets ran during extraction; their time counts as extract.
            extract_s += CLOCK() - start
            buffer_mb = max(buffer_mb, buffer.nbytes / 2**20)
            rss_after_extract = max(rss_after_extract, _peak_rss_mb())
            start = CLOCK()
            bank.fit_buffer(buffer)
            coreset_s += CLOCK() - start
            vectors = buffer.seen
            del buffer
            neighbors_s += _timed(bank._bank_neighbors)[0]  # once more, alone
            rows, dim = bank.memory_bank.shape
            banks.append({"fit_vectors": vectors, "rows": rows, "dim": dim, "k": bank.k})
        first = model.bank_models()[0]

        images = first_test_images(datamodule, max(max_test, batch))
        size = tuple(images.shape[-2:])
        one = images[:1]
        model.predict(one)  # warm-up: allocator, index
        emb1 = model.embed(one)
        embed1_s, _ = _timed(lambda: model.embed(one), repeats=10)
        knn1_s, (patch1, _) = _timed(lambda: model.score_patches(emb1), repeats=10)
        map1_s, _ = _timed(lambda: model.anomaly_map(patch1, size), repeats=10)
        one_s = _interleaved(
            {"predict": lambda: model.predict(one), "backbone": lambda: model.extractor(one)},
            rounds=20,
        )

        many = images[:batch]
        step = model.embed_batch  # as in training/testing: slices of embed_batch images

        def embed_many():  # as predict embeds: backbone in slices of embed_batch, concatenated
            return model.embed_in_slices(many)

        model.predict(many)  # as the system scores: backbone in slices, one search
        embn = embed_many()
        embedn_s, _ = _timed(embed_many, repeats=3)
        knnn_s, (patchn, _) = _timed(lambda: model.score_patches(embn), repeats=3)
        mapn_s, _ = _timed(lambda: model.anomaly_map(patchn, size), repeats=3)
        many_s = _interleaved(
            {
                "predict": lambda: model.predict(many),
                "backbone": lambda: model.extractor(many),
                "backbone_sliced": lambda: [model.extractor(p) for p in many.split(step or batch)],
            },
            rounds=5,
        )
        predict1_s, predictn_s = one_s["predict"], many_s["predict"]
        floor1_s = one_s["backbone"]
        floorn_s = min(many_s["backbone"], many_s["backbone_sliced"])

    return {
        "overrides": overrides,
        "backbone": cfg.backbone.name,
        "category": str(cfg.data.category),
        "image_size": cfg.data.image_size,
        "sampler": cfg.sampler._target_.rsplit(".", 1)[-1],
        "scales": "two" if isinstance(model, TwoScalePatchCore) else "one",
        "buffer_dtype": str(first.buffer_dtype).removeprefix("torch."),
        "chunk_vectors": first.chunk_vectors,
        "storage": first.storage,
        "embed_batch": model.embed_batch,
        "knn": OmegaConf.to_container(cfg.model.knn),
        # what precision="auto" chose in this process (exact search)
        "search_dtype": str(getattr(first.knn._exact, "dtype", None)).removeprefix("torch."),
        "buffer_mb": buffer_mb,  # the largest bank's buffer (one is held at a time)
        "ratio": cfg.sampler.get("ratio"),
        "fit_images": fit_images,
        "banks": banks,  # per bank, fine first: fit vectors, rows, dim, Eq. 7's k
        "fit_vectors": sum(b["fit_vectors"] for b in banks),
        "bank_rows": sum(b["rows"] for b in banks),
        "bank_mb": sum(b["rows"] * b["dim"] for b in banks) * 4 / 2**20,
        "extract_s": extract_s,
        "coreset_s": coreset_s,
        "bank_neighbors_s": neighbors_s,
        "fit_s": extract_s + coreset_s,
        "peak_rss_after_extract_mb": rss_after_extract,
        "peak_rss_mb": _peak_rss_mb(),
        "batch1_ms": {
            "embed": 1000 * embed1_s,
            "knn": 1000 * knn1_s,
            "map": 1000 * map1_s,
            "predict": 1000 * predict1_s,
        },
        "batch": batch,
        "batchN_ms_per_image": {
            "embed": 1000 * embedn_s / batch,
            "knn": 1000 * knnn_s / batch,
            "map": 1000 * mapn_s / batch,
            "predict": 1000 * predictn_s / batch,
        },
        "images_per_s": {"batch1": 1 / predict1_s, f"batch{batch}": batch / predictn_s},
        "backbone_images_per_s": {"batch1": 1 / floor1_s, f"batch{batch}": batch / floorn_s},
        "share_of_floor": {"batch1": floor1_s / predict1_s, f"batch{batch}": floorn_s / predictn_s},
    }


def to_markdown(row: dict) -> str:
    b, banks = row["batch"], row["banks"]
    shapes = " + ".join(f"{bank['rows']} x {bank['dim']}" for bank in banks)
    lines = [
        f"model.scales={row['scales']}; {row.get('threads')} threads, {row.get('clock', 'wall')} clock",
        "",
        "| stage | seconds / ms |",
        "|---|---|",
        f"| extract ({row['fit_images']} images, {row['fit_vectors']} vectors, {len(banks)} bank(s)) | {row['extract_s']:.1f} s |",
        f"| coreset ({row['sampler']}, ratio {row['ratio']}) -> {shapes}, with Eq. 7 neighbours | {row['coreset_s']:.1f} s |",
        f"| Eq. 7 bank neighbours alone (k = {', '.join(str(b['k']) for b in banks)}) | {row['bank_neighbors_s']:.1f} s |",
        f"| fit total | {row['fit_s']:.1f} s |",
    ]
    lines.append(
        f"| search precision (`model.knn.precision={row['knn'].get('precision')}`) | {row['search_dtype']} |"
    )
    for stage in ("embed", "knn", "map", "predict"):
        lines.append(
            f"| {stage}: batch 1 / batch {b} per image | {row['batch1_ms'][stage]:.1f} / "
            f"{row['batchN_ms_per_image'][stage]:.1f} ms |"
        )
    ips, floor, share = row["images_per_s"], row["backbone_images_per_s"], row["share_of_floor"]
    lines += [
        f"| images/s batch 1 / batch {b} | {ips['batch1']:.2f} / {ips[f'batch{b}']:.2f} |",
        f"| backbone forward only, images/s, same process | {floor['batch1']:.2f} / "
        f"{floor[f'batch{b}']:.2f} |",
        f"| share of the backbone floor | {share['batch1']:.0%} / {share[f'batch{b}']:.0%} |",
        f"| embedding buffer in memory ({row['buffer_dtype']}, {row['storage']}, chunk {row['chunk_vectors']}) | {row['buffer_mb']:.0f} MB |",
        f"| bank | {row['bank_mb']:.1f} MB |",
        f"| peak RSS after extraction / overall | {row['peak_rss_after_extract_mb']:.0f} / {row['peak_rss_mb']:.0f} MB |",
    ]
    return "\n".join(lines) + "\n"


def set_clock(threads: int | None, clock: str) -> None:
    """Torch threads and the clock every timing here uses (``wall`` or ``cpu``)."""
    global CLOCK
    if threads:
        torch.set_num_threads(threads)
    CLOCK = time.process_time if clock == "cpu" else time.perf_counter


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="train.py overrides (model=patchcore)")
    parser.add_argument("--max-test", type=int, default=64, help="test images timed")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the batched timings")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time (with --threads 1, robust to other load)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    set_clock(args.threads, args.clock)
    row = measure(args.overrides, args.max_test, args.batch)
    row |= {"clock": args.clock, "threads": torch.get_num_threads()}
    write_outputs(args.out, "patchcore_speed", row, to_markdown(row))
    return row


if __name__ == "__main__":
    main()
