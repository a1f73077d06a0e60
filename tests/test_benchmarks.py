"""The benchmark scripts run (their numbers are measurements, not test assertions)."""

import json
import shutil
import subprocess
import sys

import pytest

from defectlab.export import export_run

from .conftest import ROOT

pytestmark = pytest.mark.e2e


def test_latency_benchmark_writes_its_table(trained_run, make_cfg, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    export_run(make_cfg(f"run_dir={run}", "format=torchscript", "parity_images=0", config="export"))
    cmd = [sys.executable, "benchmarks/latency.py", str(run), "--batch", "4", "--exported"]
    cmd += ["--repeats", "5", "--device", "cpu", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "latency.json").read_text())["rows"]
    assert [r["runtime"] for r in rows] == ["lightning", "torchscript"]
    for row in rows:
        assert row["model"] == "patchcore" and row["device"] == "cpu"
        assert 0 < row["batch1_p50_ms"] <= row["batch1_p95_ms"] and row["batch_images_per_s"] > 0
    assert (
        "| patchcore |" in (tmp_path / "latency.md").read_text() and "| patchcore |" in proc.stdout
    )
