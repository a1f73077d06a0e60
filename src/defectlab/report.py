"""Gather runs and sweeps into one leaderboard: ``python -m defectlab.report <folder> [...]``.

Every ``results.json`` under the given folders is one run (single runs, multirun jobs, evaluate.py
outputs). Runs are grouped into *methods*: model, backbone and the overrides that are neither the
category nor the seed. Writes ``leaderboard.md``, ``leaderboard.csv`` (one row per run) and
``leaderboard.html`` (tables plus per-category bars per method and AUROC vs inference speed).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from defectlab.results import read_json
from defectlab.sweep import GROUPED_OUT, mean_or_none, read_overrides

# Overrides that change where or how a run reports, not what the method is.
NOT_METHOD = (
    "hydra",
    "paths.",
    "logger",
    "data.root",
    "data.prepare",
    "trainer.enable_progress_bar",
    "eval.images",
    "eval.plots",
)
TEST_METRICS = ("image_auroc", "image_f1", "pixel_auroc", "pixel_aupro")
RUN_COLUMNS = (
    "method",
    "data",
    "category",
    *TEST_METRICS,
    "val_synthetic_auroc",
    "val_synthetic_pixel_auroc",
    "fit_s",
    "test_images_per_s",
    "peak_rss_mb",
    "folder",
)


def _method(results: dict[str, Any], folder: Path) -> str:
    name = results.get("model") or "?"
    if results.get("backbone"):
        name += f" [{results['backbone']}]"
    extra = [
        o
        for o in read_overrides(folder)
        if o.partition("=")[0].lstrip("+~") not in (*GROUPED_OUT, "model", "backbone")
        and not o.startswith(NOT_METHOD)
    ]
    return " ".join([name, *extra])


def collect(folders: list[str | Path]) -> list[dict[str, Any]]:
    """One row per completed run found under ``folders`` (failed runs are skipped)."""
    rows = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("results.json")):
            results = read_json(path)
            if results.get("status", "completed") != "completed":
                continue
            metrics, timing = results.get("metrics", {}), results.get("timing", {})
            rows.append(
                {
                    "method": _method(results, path.parent),
                    "data": results.get("data"),
                    "category": results.get("category"),
                    **{k: metrics.get(k) for k in TEST_METRICS},
                    **{
                        k: results.get("validation", {}).get(k)
                        for k in ("val_synthetic_auroc", "val_synthetic_pixel_auroc")
                    },
                    "fit_s": timing.get("fit_s"),
                    "test_images_per_s": timing.get("test_images_per_s"),
                    "peak_rss_mb": (results.get("memory") or {}).get("peak_rss_mb"),
                    "folder": str(path.parent),
                }
            )
    return rows


def leaderboard(rows: list[dict[str, Any]], metric: str = "image_auroc") -> dict[str, Any]:
    """Method x category table of ``metric`` (mean over repeated runs), ranked by its mean."""
    categories = sorted({f"{r['data']}/{r['category']}" for r in rows})
    cells: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[r["method"]][f"{r['data']}/{r['category']}"].append(r)
    table = []
    for method, by_cat in cells.items():
        runs = [r for rs in by_cat.values() for r in rs]
        per_cat = {c: mean_or_none([r[metric] for r in by_cat.get(c, [])]) for c in categories}
        table.append(
            {
                "method": method,
                "runs": len(runs),
                **per_cat,
                # Mean over the categories this method ran on (per-category means first).
                "mean": mean_or_none(list(per_cat.values())),
                "pixel_aupro": mean_or_none([r["pixel_aupro"] for r in runs]),
                "test_images_per_s": mean_or_none([r["test_images_per_s"] for r in runs]),
                "fit_s": mean_or_none([r["fit_s"] for r in runs]),
            }
        )
    table.sort(key=lambda t: -1.0 if t["mean"] is None else -t["mean"])
    return {"metric": metric, "categories": categories, "table": table}


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def to_markdown(board: dict[str, Any]) -> str:
    cats = board["categories"]
    head = ["rank", "method", *cats, f"mean {board['metric']}", "pixel AUPRO", "images/s", "fit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, t in enumerate(board["table"], 1):
        cells = [rank, t["method"], *(t[c] for c in cats), t["mean"]]
        cells += [t["pixel_aupro"], t["test_images_per_s"], t["fit_s"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def category_bars(board: dict[str, Any]) -> Figure:
    """Grouped bars: ``metric`` per category, one bar per method."""
    cats, table = board["categories"], board["table"]
    fig = Figure(figsize=(max(6, 1.2 * len(cats) * max(1, len(table)) / 2), 4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(table))
    for i, t in enumerate(table):
        xs = [j + i * width for j in range(len(cats))]
        ax.bar(xs, [t[c] or 0.0 for c in cats], width, label=t["method"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats, rotation=30, ha="right")
    ax.set_ylabel(board["metric"])
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def speed_scatter(board: dict[str, Any]) -> Figure:
    """Mean ``metric`` against mean test images/s, one point per method."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for t in board["table"]:
        if t["mean"] is not None and t["test_images_per_s"] is not None:
            ax.scatter(t["test_images_per_s"], t["mean"])
            ax.annotate(t["method"], (t["test_images_per_s"], t["mean"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("test images/s (log)")
    ax.set_ylabel(f"mean {board['metric']}")
    return fig


def write_report(
    folders: list[str | Path], out: str | Path, metric: str = "image_auroc"
) -> dict[str, Path]:
    """Collect runs under ``folders`` and write the leaderboard files into ``out``."""
    numeric = [c for c in RUN_COLUMNS if c not in ("method", "data", "category", "folder")]
    if metric not in numeric:
        raise SystemExit(f"--metric {metric}: choose one of {numeric}")
    rows = collect(folders)
    if not rows:
        raise SystemExit(f"no completed results.json under {[str(f) for f in folders]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    board = leaderboard(rows, metric)
    paths = {
        "markdown": out / "leaderboard.md",
        "csv": out / "leaderboard.csv",
        "html": out / "leaderboard.html",
    }
    markdown = to_markdown(board)
    paths["markdown"].write_text(markdown)
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(RUN_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    runs_table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in RUN_COLUMNS) + "</tr>"
        for r in rows
    )
    header = "".join(f"<th>{c}</th>" for c in RUN_COLUMNS)
    paths["html"].write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>defectlab leaderboard</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}</style></head><body>"
        f"<h1>defectlab leaderboard ({html.escape(metric)})</h1>"
        f"<pre>{html.escape(markdown)}</pre>"
        f"<h2>Per category</h2><img alt='per-category bars' src='data:image/png;base64,{_png(category_bars(board))}'>"
        f"<h2>Accuracy vs inference speed</h2><img alt='speed scatter' src='data:image/png;base64,{_png(speed_scatter(board))}'>"
        f"<h2>All runs</h2><table><tr>{header}</tr>{runs_table}</table></body></html>"
    )
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m defectlab.report", description=__doc__)
    parser.add_argument("folders", nargs="+", help="run or sweep folders (searched recursively)")
    parser.add_argument("--out", default="report", help="output folder (default: ./report)")
    parser.add_argument("--metric", default="image_auroc", help="ranking metric of results.json")
    args = parser.parse_args(argv)
    paths = write_report(args.folders, args.out, args.metric)
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
