"""Multirun bookkeeping: failed jobs are recorded, every sweep gets ``summary.csv`` / ``summary.md``.

Hydra runs the jobs (basic, joblib or submitit launcher); this module only reads what they wrote
into their folders, so a summary can also be rebuilt later with :func:`summarize_sweep`.
"""

from __future__ import annotations

import csv
import math
import statistics
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from defectlab.results import peak_rss_mb, read_json, write_json_atomic

# Overrides that vary *within* one setting: a setting's mean row averages over them.
GROUPED_OUT = ("data.category", "seed")
METRIC_COLUMNS = (
    "image_auroc",
    "image_auroc_ci_low",
    "image_auroc_ci_high",
    "image_aupr",
    "image_f1",
    "image_precision",
    "image_recall",
    "pixel_auroc",
    "pixel_aupro",
    "pixel_f1",
)
VALIDATION_COLUMNS = ("val_synthetic_auroc", "val_synthetic_pixel_auroc", "val_image_auroc")
COST_COLUMNS = ("fit_s", "test_s", "test_images_per_s", "peak_rss_mb")
MARKDOWN_COLUMNS = (
    "val_synthetic_auroc",
    "val_synthetic_pixel_auroc",
    "image_auroc",
    "image_f1",
    "pixel_auroc",
    "pixel_aupro",
    "fit_s",
    "test_images_per_s",
    "peak_rss_mb",
)


def record_failure(out_dir: Path, cfg: DictConfig, err: BaseException) -> None:
    """Write ``results.json`` with ``status: failed``, the error and its traceback."""
    write_json_atomic(
        out_dir / "results.json",
        {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}",
            "traceback": "".join(traceback.format_exception(err)),
            "category": OmegaConf.select(cfg, "data.category", default=None),
            "model": OmegaConf.select(cfg, "model_name", default=None),
            "memory": {"peak_rss_mb": peak_rss_mb()},
        },
    )


def read_overrides(job_dir: Path) -> list[str]:
    """The command-line overrides of a Hydra job folder (``.hydra/overrides.yaml``)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.is_file() else []


def job_row(job_dir: Path, sweep_overrides: set[str] | None = None) -> dict[str, Any]:
    """One flat summary row of a job folder (``status: missing`` if it wrote no results)."""
    overrides = read_overrides(job_dir)
    row: dict[str, Any] = {"job": job_dir.name, "kind": "job"}
    for item in overrides:
        key, _, value = item.partition("=")
        if sweep_overrides is None or key in sweep_overrides:
            row[key] = value
    row["overrides"] = " ".join(overrides)
    path = job_dir / "results.json"
    if not path.is_file():
        return row | {"status": "missing", "error": "no results.json (killed or still running)"}
    results = read_json(path)
    row["status"] = results.get("status", "completed")
    if row["status"] != "completed":
        return row | {"error": results.get("error")}
    metrics = results.get("metrics", {})
    row |= {k: metrics.get(k) for k in METRIC_COLUMNS}
    row |= {k: results.get("validation", {}).get(k) for k in VALIDATION_COLUMNS}
    timing, memory = results.get("timing", {}), results.get("memory", {})
    row |= {k: timing.get(k) for k in ("fit_s", "test_s", "test_images_per_s")}
    row["peak_rss_mb"] = memory.get("peak_rss_mb")
    return row


def _job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    return sorted(dirs, key=lambda p: (len(p.name), p.name))  # 0, 1, ..., 10 in job order


def mean_or_none(values: list[Any]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    numbers = [v for v in values if v is not None]
    return statistics.fmean(numbers) if numbers else None


def _aggregate(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Per setting (overrides minus category and seed): mean over categories of per-category means;
    per setting and category with several seeds: mean and std over seeds."""
    numeric = (*METRIC_COLUMNS, *VALIDATION_COLUMNS, *COST_COLUMNS)
    setting_keys = [k for k in keys if k not in GROUPED_OUT]
    settings: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("status") == "completed":
            setting = tuple(row.get(k) for k in setting_keys)
            settings[setting][row.get("data.category", "")].append(row)
    out = []
    for setting, categories in settings.items():
        label = dict(zip(setting_keys, setting, strict=True))
        per_category = []
        for category, members in categories.items():
            means = {k: mean_or_none([m.get(k) for m in members]) for k in numeric}
            per_category.append(means)
            if len(members) > 1 and "seed" in keys:
                base = {**label, "data.category": category, "status": f"{len(members)} seeds"}
                out.append({**base, "kind": "mean_over_seeds", **means})
                stds = {
                    k: statistics.stdev(vals)
                    for k in numeric
                    if len(vals := [m[k] for m in members if m.get(k) is not None]) > 1
                }
                out.append({**base, "kind": "std_over_seeds", **stds})
        n_jobs = sum(len(m) for m in categories.values())
        means = {k: mean_or_none([c[k] for c in per_category]) for k in numeric}
        out.append(
            {
                **label,
                "kind": "mean",
                "data.category": f"mean of {len(categories)}",
                "status": f"{n_jobs} completed",
                **means,
            }
        )
    return out


def summarize_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Write ``summary.csv`` and ``summary.md`` into ``sweep_dir``; return the rows."""
    sweep_dir = Path(sweep_dir)
    dirs = _job_dirs(sweep_dir)
    # Columns for the overrides that differ between jobs (the sweep axes).
    all_overrides = [dict(o.partition("=")[::2] for o in read_overrides(d)) for d in dirs]
    keys = sorted(
        k for k in set().union(*all_overrides) if len({o.get(k) for o in all_overrides}) > 1
    )
    rows = [job_row(d, set(keys)) for d in dirs]
    rows += _aggregate(rows, keys)
    columns = [
        "job",
        "kind",
        "status",
        *keys,
        *METRIC_COLUMNS,
        *VALIDATION_COLUMNS,
        *COST_COLUMNS,
        "overrides",
        "error",
    ]
    with (sweep_dir / ".summary.csv.tmp").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / ".summary.csv.tmp").replace(sweep_dir / "summary.csv")
    (sweep_dir / ".summary.md.tmp").write_text(_markdown(rows, keys))
    (sweep_dir / ".summary.md.tmp").replace(sweep_dir / "summary.md")
    return rows


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value).replace("|", "\\|")


def _markdown(rows: list[dict[str, Any]], keys: list[str]) -> str:
    columns = ["job", "kind", "status", *keys, *MARKDOWN_COLUMNS]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows),
    ]
    failed = [r for r in rows if r.get("kind") == "job" and r.get("status") != "completed"]
    if failed:
        lines += ["", "Failed or missing jobs:", ""]
        lines += [f"- job {r['job']} ({r['overrides']}): {r.get('error')}" for r in failed]
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Hydra callback: after a multirun, write the sweep's summary table (failed jobs included)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = summarize_sweep(sweep_dir)
        jobs = [r for r in rows if r["kind"] == "job"]
        done = sum(r["status"] == "completed" for r in jobs)
        print(f"sweep summary: {done}/{len(jobs)} jobs completed -> {sweep_dir / 'summary.md'}")
