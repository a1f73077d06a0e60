"""Run bookkeeping: atomic JSON writes, resource measurements, the printed summary."""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON to a temporary file and rename it, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def format_summary(results: dict) -> str:
    """A short human-readable block of the headline numbers."""
    lines = [
        f"defectlab | {results['model']} | {results['backbone']} | {results['data']}/{results['category']}"
    ]
    for key, value in results["metrics"].items():
        lines.append(f"  {key:<18} {'n/a' if value is None else f'{value:.4f}'}")
    t, m = results["timing"], results["memory"]
    lines.append(
        f"  fit {t['fit_s']:.1f}s | test {t['test_s']:.1f}s ({t['test_images_per_s']:.1f} img/s) | "
        f"peak RSS {m['peak_rss_mb']:.0f} MB | bank {m['bank_mb']:.1f} MB"
    )
    return "\n".join(lines)
