"""Two-scale PatchCore, measured beside the default: a design study for issues 18 and 19.

    python benchmarks/patchcore_scales.py [--data mono,poly,brick,grass,gravel] [--out DIR]

The default joins the first layer's patches and the deeper layer's, resized onto the first grid,
in one bank (lite0 ``blocks.2`` + ``blocks.4``: 152-d on the 28 x 28 grid of a 224 px image). The
two-scale variant keeps two banks, each with its own 10 % coreset and exact search:

- *fine*: the first layer alone on its own grid (40-d, 28 x 28);
- *coarse*: both layers on the deeper layer's grid (``embedding.grid_layer=1``: the first layer
  average-pooled onto it; 152-d, 14 x 14), a quarter of the queries and of the bank rows.

The coarse distances are resized bilinearly onto the fine grid and added to the fine ones (raw
distances, nothing fitted on held-out or test images); the image score is the maximum of the sum
and the anomaly map its upsampled, blurred version (``model.blur_sigma``). The default runs as
``python train.py`` does (same loaders, buffer, sampler, exact search, Eq. 7). Reported per data
set: image AUROC, pixel AUROC and AUPRO where masks exist, and the search time per test image of
each bank, interleaved in this process. Writes ``patchcore_scales.json`` / ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import write_outputs
from hydra import compose, initialize_config_dir
from torchmetrics.classification import BinaryAUROC

from defectlab.build import build, build_model
from defectlab.components import NativeEmbedder
from defectlab.metrics import pixel_metrics
from defectlab.metrics.image import unit_interval
from defectlab.systems.bank_fitting import embedding_rows

ROOT = Path(__file__).resolve().parents[1]
DATA = {
    "mono": ["data.category=mono"],
    "poly": ["data.category=poly"],
    "brick": ["data=synthetic", "data.category=brick"],
    "grass": ["data=synthetic", "data.category=grass"],
    "gravel": ["data=synthetic", "data.category=gravel"],
}


def _rows(grid: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B * h * w, C)`` float32 rows."""
    return grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1]).float()


class Scale:
    """One bank of the two-scale variant: its layers, layout, sampler and search."""

    def __init__(self, layers: list[int], embedder: NativeEmbedder, sampler, knn) -> None:
        self.layers, self.embedder = layers, embedder
        self.sampler, self.knn = copy.deepcopy(sampler), copy.deepcopy(knn)
        self.parts: list[torch.Tensor] = []
        self.bank: torch.Tensor | None = None

    def embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.embedder([features[i] for i in self.layers])

    def fit(self) -> None:
        rows = torch.cat(self.parts)
        self.bank = rows[self.sampler(rows)].contiguous()
        self.parts = []
        self.knn.fit(self.bank)

    def search(self, grid: torch.Tensor) -> torch.Tensor:
        """Nearest-bank-row distances ``(B, 1, h, w)`` of patch features ``(B, C, h, w)``."""
        b, _, h, w = grid.shape
        dist, _ = self.knn.search(_rows(grid), k=1)
        return dist[:, 0].view(b, 1, h, w)


@torch.no_grad()
def measure(name: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"paths.output_dir={tmp}", *overrides])
        torch.manual_seed(cfg.seed)
        dm = build(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
        dm.setup("test")
        model = build_model(cfg).eval()
        emb = cfg.embedding
        channels = model.extractor.channels
        fine = Scale(
            [0],
            NativeEmbedder([channels[0]], patch_size=emb.patch_size),
            model.sampler,
            model.knn,
        )
        coarse = Scale(
            list(range(len(channels))),
            NativeEmbedder(
                channels,
                patch_size=emb.patch_size,
                interpolation=emb.interpolation,
                grid_layer=len(channels) - 1,
            ),
            model.sampler,
            model.knn,
        )
        scales = {"fine": fine, "coarse": coarse}

        # The default exactly as train.py fits it: its buffer (model.memory), then fit_buffer.
        per_image = len(next(embedding_rows(model, dm.fit_set[0]["image"][None])))
        buffer = model.embedding_buffer(len(dm.fit_set) * per_image, model.memory_bank.shape[1])
        for batch in dm.train_dataloader():
            for part in batch["image"].split(model.embed_batch or len(batch["image"])):
                features = model.extractor(part)
                buffer.add(_rows(model.embedder(features)))
                for scale in scales.values():
                    scale.parts.append(_rows(scale.embed(features)))
        model.fit_buffer(buffer)
        del buffer
        for scale in scales.values():
            scale.fit()

        labels, masks = [], []
        scores: dict[str, list[torch.Tensor]] = {"default": [], "two_scale": []}
        times: dict[str, list[float]] = {"default": [], "fine": [], "coarse": []}
        maps: dict[str, list[torch.Tensor]] = {"default": [], "two_scale": []}
        for batch in dm.test_dataloader():
            for i, part in enumerate(batch["image"].split(1)):
                features = model.extractor(part)
                joint = model.embedder(features).permute(0, 2, 3, 1)
                grids = {n: s.embed(features) for n, s in scales.items()}
                start = time.perf_counter()
                patch, score = model.score_patches(joint)
                times["default"].append(time.perf_counter() - start)
                dist = {}
                for n, s in scales.items():
                    start = time.perf_counter()
                    dist[n] = s.search(grids[n])
                    times[n].append(time.perf_counter() - start)
                size = tuple(part.shape[-2:])
                summed = dist["fine"] + F.interpolate(
                    dist["coarse"],
                    size=dist["fine"].shape[-2:],
                    mode="bilinear",
                    align_corners=False,
                )
                scores["default"].append(score)
                scores["two_scale"].append(summed.flatten(1).amax(1))
                maps["default"].append(model.anomaly_map(patch, size))
                maps["two_scale"].append(model.anomaly_map(summed, size))
                labels.append(batch["label"][i : i + 1])
                if "mask" in batch:
                    masks.append(batch["mask"][i : i + 1])

    target = torch.cat(labels).long()
    out: dict = {"data": name, "overrides": overrides, "test_images": len(target)}
    for variant in ("default", "two_scale"):
        metrics = {
            "image_auroc": float(BinaryAUROC()(unit_interval(torch.cat(scores[variant])), target))
        }
        if masks:
            pm = pixel_metrics(torch.cat(maps[variant]), torch.cat(masks), None)
            metrics.update(pixel_auroc=pm["pixel_auroc"], pixel_aupro=pm["pixel_aupro"])
        out[variant] = metrics
    out["bank_rows"] = {
        "default": len(model.memory_bank),
        **{n: len(s.bank) for n, s in scales.items()},
    }
    out["dim"] = {
        "default": model.memory_bank.shape[1],
        **{n: s.bank.shape[1] for n, s in scales.items()},
    }
    out["search_ms"] = {n: 1000 * statistics.median(t) for n, t in times.items()}
    out["search_ms"]["two_scale"] = out["search_ms"]["fine"] + out["search_ms"]["coarse"]
    return out


def _fmt(m: dict) -> str:
    keys = ("image_auroc", "pixel_auroc", "pixel_aupro")
    return " / ".join(f"{m[k]:.4f}" for k in keys if m.get(k) is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=",".join(DATA), help="comma-separated: " + ",".join(DATA))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    results = []
    for name in args.data.split(","):
        results.append(measure(name, DATA[name]))
        r = results[-1]
        print(name, _fmt(r["default"]), "|", _fmt(r["two_scale"]), r["search_ms"], flush=True)
    lines = [
        "| data set | default (image / pixel AUROC / AUPRO) | two-scale | search ms per image: "
        "default / fine + coarse |",
        "|---|---|---|---|",
    ]
    for r in results:
        ms = r["search_ms"]
        lines.append(
            f"| {r['data']} | {_fmt(r['default'])} | {_fmt(r['two_scale'])} | "
            f"{ms['default']:.1f} / {ms['fine']:.1f} + {ms['coarse']:.1f} |"
        )
    write_outputs(args.out, "patchcore_scales", {"results": results}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
