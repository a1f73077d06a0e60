"""The benchmark scripts run (their numbers are measurements, not test assertions)."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.e2e


def test_latency_benchmark_writes_its_table(trained_run, tmp_path):
    cmd = [sys.executable, "benchmarks/latency.py", str(trained_run), "--batch", "4"]
    cmd += ["--repeats", "5", "--device", "cpu", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "latency.json").read_text())["rows"]
    assert row["model"] == "patchcore" and row["device"] == "cpu"
    assert 0 < row["batch1_p50_ms"] <= row["batch1_p95_ms"] and row["batch_images_per_s"] > 0
    assert (
        "| patchcore |" in (tmp_path / "latency.md").read_text() and "| patchcore |" in proc.stdout
    )
