"""Forward-only throughput of the backbone: the floor PatchCore's inference cannot beat.

    python benchmarks/backbone_floor.py [train.py overrides ...] [--batch 32] [--speed JSON]

Times the frozen feature extractor alone (same backbone, layers, image size and threads as the
composed config) at batch 1 and batch N on random inputs. With ``--speed`` (a
``patchcore_speed.json``), prints PatchCore's predict throughput as a share of this floor.
Writes ``backbone_floor.json`` / ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from _common import write_outputs
from patchcore_speed import _timed, compose_config, set_clock

from defectlab.build import build


@torch.inference_mode()  # as the system scores: Lightning's test loop, Inference.score
def measure(overrides: list[str], batch: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(overrides, Path(tmp))
    extractor = build(cfg.backbone).eval()
    size = cfg.data.get("crop_size") or cfg.data.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g)
    extractor(images[:1])  # warm-up
    one_s, _ = _timed(lambda: extractor(images[:1]), repeats=repeats)
    extractor(images)
    many_s, _ = _timed(lambda: extractor(images), repeats=max(2, repeats // 10))
    return {
        "overrides": overrides,
        "backbone": cfg.backbone.name,
        "layers": list(cfg.backbone.layers),
        "image_size": size,
        "batch": batch,
        "images_per_s": {"batch1": 1 / one_s, f"batch{batch}": batch / many_s},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="train.py overrides")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20, help="batch-1 forwards timed")
    parser.add_argument("--speed", type=Path, help="patchcore_speed.json to compare with")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: CPU time")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    set_clock(args.threads, args.clock)
    row = measure(args.overrides, args.batch, args.repeats)
    floor = row["images_per_s"]
    lines = [
        "| batch | backbone forward images/s | PatchCore predict images/s | share of floor |",
        "|---|---|---|---|",
    ]
    speed = json.loads(args.speed.read_text())["images_per_s"] if args.speed else {}
    for key in floor:
        got = speed.get(key)
        share = f"{got / floor[key]:.0%}" if got else "–"
        lines.append(f"| {key[5:]} | {floor[key]:.2f} | {f'{got:.2f}' if got else '–'} | {share} |")
        row.setdefault("share_of_floor", {})[key] = got / floor[key] if got else None
    write_outputs(args.out, "backbone_floor", row, "\n".join(lines) + "\n")
    return row


if __name__ == "__main__":
    main()
