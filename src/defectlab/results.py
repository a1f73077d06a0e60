"""Run bookkeeping: atomic JSON writes, resource measurements, the printed summary."""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    Readers never see a half-written file, and a failure never destroys an earlier one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        # After writing: mkstemp's 0600 (which some writers, e.g. safetensors, re-create the file
        # with) would hide results from other users.
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON atomically (see :func:`atomic_target`)."""
    with atomic_target(path) as tmp, tmp.open("w") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str | Path) -> Any:
    """Load a JSON file."""
    return json.loads(Path(path).read_text())


def _numbers(tree: Any, prefix: str = "") -> dict[str, float | None]:
    if isinstance(tree, dict):
        out: dict[str, float | None] = {}
        for key, value in tree.items():
            out |= _numbers(value, f"{prefix}{key}/")
        return out
    return {prefix.rstrip("/"): tree}


COMPARED = ("metrics", "confusion_matrix", "oracle", "per_defect_type")


def compare_metrics(old: dict, new: dict) -> float:
    """Largest absolute difference between two results' metrics (inf if their keys or nulls differ)."""
    a = _numbers({k: old.get(k) for k in COMPARED})
    b = _numbers({k: new.get(k) for k in COMPARED})
    if a.keys() != b.keys():
        return float("inf")
    worst = 0.0
    for key, x in a.items():
        y = b[key]
        if (x is None) != (y is None):
            return float("inf")
        if x is not None:
            worst = max(worst, abs(float(x) - float(y)))
    return worst


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def format_summary(results: dict) -> str:
    """A short human-readable block of the headline numbers."""
    lines = [
        f"defectlab | {results['model']} | {results['backbone'] or 'no backbone'} | "
        f"{results['data']}/{results['category']}"
    ]
    metrics = dict(results["metrics"])
    lo, hi = metrics.pop("image_auroc_ci_low", None), metrics.pop("image_auroc_ci_high", None)
    for key, value in metrics.items():
        text = _fmt(value)
        if key == "image_auroc" and lo is not None:
            level = (results.get("eval") or {}).get("bootstrap", {}).get("confidence", 0.95)
            text += f"  ({level:.0%} bootstrap CI {lo:.4f}-{hi:.4f})"
        lines.append(f"  {key:<18} {text}")
    cm = results.get("confusion_matrix") or {}
    if cm.get("tp") is not None:
        lines.append(
            f"  confusion          TN {cm['tn']} FP {cm['fp']} FN {cm['fn']} TP {cm['tp']}"
        )
    oracle = results.get("oracle") or {}
    lines.append(
        f"  image_f1_max       {_fmt(oracle.get('image_f1_max'))}  (oracle: threshold chosen on test labels)"
    )
    per_type = {
        k: v for k, v in (results.get("per_defect_type") or {}).items() if "image_auroc" in v
    }
    if per_type:
        lines.append("  per defect type:   n  image_auroc  recall  pixel_aupro")
        for name, row in per_type.items():
            lines.append(
                f"    {name:<24} {row['n']:>3}  {_fmt(row['image_auroc'])}  "
                f"{_fmt(row['image_recall'])}  {_fmt(row.get('pixel_aupro'))}"
            )
    training = results.get("training")
    if training and training.get("best_epoch") is not None:
        stop = "stopped early" if training["stopped_early"] else "max_epochs reached"
        lines.append(
            f"  trained {training['epochs']} epochs ({stop}); best epoch {training['best_epoch']}, "
            f"held-out loss {training['best_val_loss']:.4g}"
        )
    labeled = (results.get("counts") or {}).get("labeled_anomalies")
    if labeled:
        lines.append(f"  real defects used for training (not tested): {labeled}")
    t, m = results["timing"], results["memory"]
    fit = f"fit {t['fit_s']:.1f}s | " if t.get("fit_s") is not None else ""
    lines.append(
        f"  {fit}test {t['test_s']:.1f}s ({t['test_images_per_s']:.1f} img/s) | "
        f"peak RSS {m['peak_rss_mb']:.0f} MB"
        + ("" if m.get("bank_mb") is None else f" | bank {m['bank_mb']:.1f} MB")
    )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
