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


def test_patchcore_speed_and_backbone_floor_write_their_tables(synthetic_root, tmp_path):
    from .test_train import FAST

    overrides = [*FAST, f"data.root={synthetic_root}", "data.category=brick"]
    common = ["--batch", "4", "--out", str(tmp_path)]
    speed = [sys.executable, "benchmarks/patchcore_speed.py", *overrides, "--max-test", "4"]
    proc = subprocess.run([*speed, *common], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "patchcore_speed.json").read_text())
    assert row["fit_vectors"] == 22 * 12 * 12  # 22 fit images x (96 / 8)^2 patches
    assert row["bank_rows"] == -(-row["fit_vectors"] // 10)  # ceil(10 %)
    for stage in ("embed", "knn", "map", "predict"):
        assert row["batch1_ms"][stage] > 0 and row["batchN_ms_per_image"][stage] > 0
    assert row["peak_rss_mb"] >= row["peak_rss_after_extract_mb"] > 0
    for key in ("batch1", "batch4"):  # floor timed in the same process
        assert row["backbone_images_per_s"][key] > 0
        expected = row["images_per_s"][key] / row["backbone_images_per_s"][key]
        assert row["share_of_floor"][key] == pytest.approx(expected)

    floor = [sys.executable, "benchmarks/backbone_floor.py", *overrides, "--repeats", "3"]
    floor += ["--speed", str(tmp_path / "patchcore_speed.json")]
    proc = subprocess.run([*floor, *common], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "backbone_floor.json").read_text())
    assert set(result["share_of_floor"]) == {"batch1", "batch4"}
    assert all(v > 0 for v in result["share_of_floor"].values())
    assert "share of floor" in proc.stdout
