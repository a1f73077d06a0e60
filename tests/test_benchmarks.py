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
    from .conftest import FAST

    overrides = [*FAST, f"data.root={synthetic_root}", "data.category=brick"]
    common = ["--batch", "4", "--out", str(tmp_path)]
    speed = [sys.executable, "benchmarks/patchcore_speed.py", *overrides, "--max-test", "4"]
    proc = subprocess.run([*speed, *common], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "patchcore_speed.json").read_text())
    # The default's two banks: 22 fit images x (96 / 8)^2 fine and (96 / 16)^2 coarse patches.
    assert row["scales"] == "two"
    assert [b["fit_vectors"] for b in row["banks"]] == [22 * 12 * 12, 22 * 6 * 6]
    assert [b["dim"] for b in row["banks"]] == [40, 152]
    for bank in row["banks"]:
        assert bank["rows"] == -(-bank["fit_vectors"] // 10)  # ceil(10 %)
    assert row["bank_rows"] == sum(b["rows"] for b in row["banks"])
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


def test_knn_search_benchmark_scores_options_against_exact(trained_run, tmp_path):
    cmd = [sys.executable, "benchmarks/knn_search.py", str(trained_run), "--images", "3"]
    cmd += [
        "--out",
        str(tmp_path),
        "--spec",
        "backend=exact precision=bfloat16",
        "--spec",
        "backend=ivf nlist=4 nprobe=4",
    ]
    cmd += ["--spec", "faiss=IVF4,Flat nprobe=4", "--spec", "faiss=PCA2,IVF4,Flat nprobe=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "knn_search.json").read_text())
    # the default run's fine bank (lite0 blocks.2 at stride 8: 12 x 12 patches, 40-d)
    assert result["images"] == 3 and result["patches_per_image"] == 12 * 12
    assert result["bank"] == "fine" and result["dim"] == 40
    exact, ivf_all, factory_all, projected = result["rows"]
    for row in (exact, ivf_all, factory_all):  # every cell probed: exact
        assert row["recall"] == 1.0 and row["mean_image_max_excess"] == pytest.approx(0, abs=1e-6)
    # 2 of 152 dimensions, one cell of four, no re-rank: misses, which only raise distances
    assert projected["recall"] < 0.99 and projected["mean_distance_excess"] > 0
    assert all(r["ms_per_image_after_forward"] > 0 for r in result["rows"])
    assert "| `faiss=PCA2,IVF4,Flat nprobe=1` |" in proc.stdout


def test_knn_search_default_specs_are_valid():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import knn_search

    specs = knn_search.default_specs()
    assert specs[0].startswith("backend=exact") and "faiss=Flat" in specs
    for spec in specs:
        knn_search.parse_spec(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("backend=nope", "model.knn.backend=nope"),
        ("radius=3", "keys are model.knn's"),
        ("faiss=IVF4,Nonsense", "faiss cannot build it"),
        ("faiss=IVF4,Flat bogus=3", "no parameter bogus"),
        ("backend", "is not key=value"),
    ],
)
def test_knn_search_benchmark_refuses_bad_specs(trained_run, tmp_path, spec, message):
    cmd = [sys.executable, "benchmarks/knn_search.py", str(trained_run), "--spec", spec]
    proc = subprocess.run([*cmd, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "knn_search.json").exists()


@pytest.mark.parametrize("generator", ["small", "perlin"])
def test_patchcore_variants_scores_label_free_and_tables(trained_run, tmp_path, generator):
    out = tmp_path / "variants"
    for name in ("paper", "native", "native_k1"):  # three copies of one run, as three variants
        shutil.copytree(trained_run, out / name / "brick")
    base = [sys.executable, "benchmarks/patchcore_variants.py"]
    for job in (["score", "--repeats", "2"], ["table", "--repeats", "2"]):
        cmd = [*base, *job, "--data", "brick", "--out", str(out), "--generator", generator]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    scores = [
        json.loads((out / name / "brick" / "label_free.json").read_text())[f"{generator}_x2"]
        for name in ("paper", "native", "native_k1")
    ]
    assert scores[0] == scores[1] == scores[2]  # the same model scores the same defects alike
    assert 0.5 < scores[0]["val_synthetic_auroc"] <= 1
    assert 0.5 < scores[0]["val_synthetic_pixel_auroc"] <= 1
    result = json.loads((out / "patchcore_variants.json").read_text())
    assert set(result["runs"]) == {"paper", "native", "native_k1"}
    assert "| native_k1 |" in (out / "patchcore_variants.md").read_text()


@pytest.mark.parametrize("run", ["trained_run", "trained_run_one_bank"])
def test_search_exactness_matches_a_float64_brute_force(run, synthetic_root, tmp_path, request):
    """Two banks (the default: summed maps) and one bank with Eq. 7 (k = 9)."""
    cmd = [
        sys.executable,
        "benchmarks/search_exactness.py",
        str(request.getfixturevalue(run)),
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "search_exactness.json").read_text())
    test_images = list((synthetic_root / "brick" / "test").rglob("*.png"))
    assert result["images"] == len(test_images)
    if run == "trained_run":
        assert set(result["banks"]) == {"fine", "coarse"} and result["k"] is None
    else:
        assert set(result["banks"]) == {"bank"} and result["k"] == 9
    brute = result["brute_fp64"]  # the model's scores are the float64 brute force's, bit for bit
    assert brute["image_scores_identical"] and brute["auroc_bit_identical"]
    assert brute["patches_with_another_nearest_row"] == 0
    assert result["faiss_fp32"]["max_image_score_difference"] < 1e-4
