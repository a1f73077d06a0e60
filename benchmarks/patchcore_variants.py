"""PatchCore variants on every data set, and whether label-free validation ranks them.

    python benchmarks/patchcore_variants.py run   --variants native,native_256 --data mono,poly
    python benchmarks/patchcore_variants.py score [--generator small] [--repeats 4]
    python benchmarks/patchcore_variants.py table

``run`` trains each variant on each data set through ``train.py`` (the real path, one run at a
time) into ``--out/<variant>/<data set>``, skipping finished runs. ``score`` re-scores every finished
run's held-out good images with synthetic defects through the system's own validation code (the
same code as ``eval.validation_anomalies`` during training; nothing from the test set), and
caches ``val_synthetic_auroc`` / ``val_synthetic_pixel_auroc`` per generator in the run folder.
``table`` writes the variants x data sets table and, per data set, Spearman's rank correlation
between each validation metric and each test metric over the variants
(``patchcore_variants.json`` / ``.md`` in ``--out``). docs/methods/patchcore.md shows the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
from _common import write_outputs
from hydra.utils import instantiate
from scipy.stats import spearmanr

from defectlab.components import SyntheticAnomalies
from defectlab.components.synthetic_anomaly import CLASSIC_KINDS
from defectlab.errors import DefectlabError
from defectlab.model_file import load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = {
    "mono": ["data=elpv", "data.category=mono"],
    "poly": ["data=elpv", "data.category=poly"],
    "brick": ["data=synthetic", "data.category=brick"],
    "grass": ["data=synthetic", "data.category=grass"],
    "gravel": ["data=synthetic", "data.category=gravel"],
}
# Each variant: the train.py overrides that make it (on top of the data set's own config).
VARIANTS = {
    "paper": ["embedding=paper"],
    "paper_k1": ["embedding=paper", "model.k=1"],
    "native": ["embedding=native"],
    "native_bicubic": ["embedding=native", "embedding.interpolation=bicubic"],
    "native_256": ["embedding=native", "data.image_size=256"],
    "native_288": ["embedding=native", "data.image_size=288"],
    "native_320": ["embedding=native", "data.image_size=320"],
    "native_b246": ["embedding=native", "backbone.layers=[blocks.2,blocks.4,blocks.6]"],
    "native_b124": ["embedding=native", "backbone.layers=[blocks.1,blocks.2,blocks.4]"],
    "native_b124g1": [
        "embedding=native",
        "backbone.layers=[blocks.1,blocks.2,blocks.4]",
        "embedding.grid_layer=1",  # blocks.1 pooled onto blocks.2's grid: its patch count
    ],
    "native_b234": ["embedding=native", "backbone.layers=[blocks.2,blocks.3,blocks.4]"],
    "native_b23": ["embedding=native", "backbone.layers=[blocks.2,blocks.3]"],
    "native_lite1": ["embedding=native", "backbone=efficientnet_lite1"],
    "native_lite2": ["embedding=native", "backbone=efficientnet_lite2"],
    "native_k1": ["embedding=native", "model.k=1"],
    "native_k3": ["embedding=native", "model.k=3"],
    "native_ensemble": ["embedding=native", "backbone=ensemble"],
    "native_random": ["embedding=native", "sampler=random"],
    "native_full": ["embedding=native", "sampler=none"],
    "native_mobilenet": ["embedding=native", "backbone=mobilenet_v2"],
    "native_p5": ["embedding=native", "embedding.patch_size=5"],
    "native_pn2": ["embedding=native", "model.patch_neighbors=2"],
    "native_pn3": ["embedding=native", "model.patch_neighbors=3"],
    # a fine bank (first layer, own grid) + a coarse bank (both layers, deeper grid), summed
    "native_two_scale": ["embedding=native", "model.scales=two"],
}
# Synthetic validation defects (components.SyntheticAnomalies): "default" is the block of
# conf/hparams_search/patchcore_optuna.yaml; "small" draws 5x smaller ones; "perlin" draws the
# U-Net's training defects (DRAEM-style Perlin regions filled with a turned copy of another good
# image or a scikit-image texture, opacity U(0.2, 1)) at the small areas: fainter and less
# regular than pasted shapes, to test whether harder defects rank ELPV's variants better.
GENERATORS = {
    "default": {"kinds": CLASSIC_KINDS, "min_area": 0.005, "max_area": 0.05},
    "small": {"kinds": CLASSIC_KINDS, "min_area": 0.001, "max_area": 0.01},
    "perlin": {"kinds": ["perlin_self", "perlin_texture"], "min_area": 0.001, "max_area": 0.01},
}
QUIET = ["trainer.enable_progress_bar=false", "eval.images.max_per_type=0", "eval.plots=false"]
TEST_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
VAL_METRICS = ("val_synthetic_auroc", "val_synthetic_pixel_auroc")


def run(variants: list[str], datasets: list[str], out: Path, extra: list[str]) -> None:
    """Train every (variant, data set) not finished yet, one at a time, through train.py."""
    for name in variants:
        for ds in datasets:
            run_dir = out / name / ds
            if (run_dir / "results.json").exists():
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "train.py", *DATA[ds], *VARIANTS[name], *QUIET, *extra]
            cmd.append(f"hydra.run.dir={run_dir}")
            env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
            start = time.perf_counter()
            with open(run_dir.parent / f"{ds}.log", "w") as log:
                rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            print(f"{name:18s} {ds:7s} rc={rc} {time.perf_counter() - start:.0f} s", flush=True)


def score(run_dir: Path, generator: str, repeats: int) -> dict[str, float]:
    """Validation metrics of a trained run for one synthetic-defect generator (cached)."""
    cache = run_dir / "label_free.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    key = f"{generator}_x{repeats}"
    if key in done:
        return done[key]
    loaded = load_model(run_dir)
    system = loaded.system.eval()
    system.validation_anomalies = SyntheticAnomalies(
        probability=1.0, seed=0, **GENERATORS[generator]
    )
    system.evaluation["validation_repeats"] = repeats
    datamodule = instantiate(loaded.config.data)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    metrics = system.validate(trainer, datamodule).metrics
    done[key] = {k: metrics.get(k) for k in VAL_METRICS}
    cache.write_text(json.dumps(done, indent=1))
    return done[key]


def finished(out: Path) -> list[tuple[str, str, Path]]:
    """(variant, data set, run folder) of every run with results."""
    return [
        (name, ds, out / name / ds)
        for name in VARIANTS
        for ds in DATA
        if (out / name / ds / "results.json").exists()
    ]


def table(out: Path, key: str) -> None:
    """Variants x data sets table and per-data-set Spearman correlations."""
    rows: dict[str, dict[str, dict]] = {}
    for name, ds, run_dir in finished(out):
        results = json.loads((run_dir / "results.json").read_text())
        cache = run_dir / "label_free.json"
        label_free = json.loads(cache.read_text()).get(key, {}) if cache.exists() else {}
        rows.setdefault(name, {})[ds] = {
            **{m: results["metrics"].get(m) for m in TEST_METRICS},
            **label_free,
            "fit_s": results.get("timing", {}).get("fit_s"),
            "peak_rss_mb": (results.get("memory") or {}).get("peak_rss_mb"),
        }
    lines = ["| variant | " + " | ".join(DATA) + " |", "|---" * (len(DATA) + 1) + "|"]
    for name, cells in rows.items():
        shown = []
        for ds in DATA:
            c = cells.get(ds)
            if c is None:
                shown.append("")
                continue
            text = f"{c['image_auroc']:.4f}"
            if c.get("pixel_auroc") is not None:
                text += f" / {c['pixel_auroc']:.4f} / {c['pixel_aupro']:.4f}"
            shown.append(text)
        lines.append(f"| {name} | " + " | ".join(shown) + " |")
    lines += ["", f"Spearman rho over variants (validation generator `{key}`):", ""]
    lines += ["| data set | variants | validation metric | " + " | ".join(TEST_METRICS) + " |"]
    lines.append("|---" * (3 + len(TEST_METRICS)) + "|")
    correlations = {}
    for ds in DATA:
        have = [c[ds] for c in rows.values() if ds in c and c[ds].get(VAL_METRICS[0]) is not None]
        if len(have) < 3:
            continue
        for v in VAL_METRICS:
            cells = []
            for t in TEST_METRICS:
                if have[0].get(t) is None:
                    cells.append("")
                    continue
                rho = spearmanr([c[v] for c in have], [c[t] for c in have]).statistic
                correlations[f"{ds}/{v}/{t}"] = rho
                cells.append(f"{rho:+.2f}")
            lines.append(f"| {ds} | {len(have)} | {v} | " + " | ".join(cells) + " |")
    write_outputs(
        out,
        "patchcore_variants",
        {"runs": rows, "spearman": correlations, "generator": key},
        "\n".join(lines) + "\n",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", choices=["run", "score", "table"])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--data", default=",".join(DATA))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "patchcore_variants")
    parser.add_argument("--generator", choices=list(GENERATORS), default="small")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    unknown += [d for d in args.data.split(",") if d not in DATA]
    if unknown:
        parser.error(
            f"unknown variant/data set {unknown}; choose from {list(VARIANTS)} / {list(DATA)}"
        )
    if args.job == "run":
        run(args.variants.split(","), args.data.split(","), args.out, args.overrides)
    elif args.job == "score":
        for name, ds, run_dir in finished(args.out):
            if name in args.variants.split(",") and ds in args.data.split(","):
                try:
                    print(name, ds, score(run_dir, args.generator, args.repeats), flush=True)
                except DefectlabError as err:  # e.g. an old run without a model file: say so
                    print(name, ds, "not scored:", err, flush=True)
    else:
        table(args.out, f"{args.generator}_x{args.repeats}")


if __name__ == "__main__":
    main()
