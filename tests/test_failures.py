"""Failures are loud and lose nothing: bad files at run level, config checks before work, atomic
writes, resumable sweeps, and deterministic runs with their provenance."""

import json
import shutil

import pytest
import torch
from hydra.errors import HydraException
from safetensors.torch import load_file

from defectlab.build import build
from defectlab.errors import ConfigError, DataError
from defectlab.jobs import build_job, run_training
from defectlab.results import write_json_atomic

from .conftest import FAST
from .test_bad_input import _copy, _damage
from .test_sweep import _run

pytestmark = pytest.mark.e2e


def _cfg(make_cfg, root, *extra, out=None):
    return make_cfg(
        *FAST, f"data.root={root}", "data.category=brick", "eval.plots=false", *extra, out=out
    )


def test_skip_counts_bad_files_in_results_and_error_stops_before_fitting(
    make_cfg, synthetic_root, tmp_path
):
    root = _copy(synthetic_root, tmp_path)
    damaged = _damage(root)
    with pytest.raises(DataError, match=r"4 bad file"):
        run_training(_cfg(make_cfg, root, out=tmp_path / "strict"))
    assert not (tmp_path / "strict" / "checkpoints").exists()  # nothing was fitted

    results = run_training(_cfg(make_cfg, root, "data.on_bad_file=skip", out=tmp_path / "skip"))
    assert results["counts"]["skipped_files"] == 4
    listed = sorted(s["path"].split("brick/")[1] for s in results["data_issues"]["skipped_files"])
    assert listed == sorted(damaged)
    assert results["counts"]["test"] == 8 + 12 - 3 and results["metrics"]["image_auroc"] > 0.9


def test_test_set_without_defects_reports_undefined_metrics(make_cfg, synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    for folder in ("hole", "scratch", "stain"):
        shutil.rmtree(root / "brick/test" / folder)
    shutil.rmtree(root / "brick/ground_truth")
    with pytest.warns(UserWarning, match="only one class present"):
        results = run_training(_cfg(make_cfg, root))
    metrics = results["metrics"]
    for key in ("image_auroc", "image_aupr", "pixel_auroc", "pixel_aupro"):
        assert metrics.get(key) is None, key  # undefined, not 0.5 or 0
    assert results["counts"]["test_defective"] == 0 and results["status"] == "completed"


def test_config_errors_come_before_any_heavy_work(make_cfg, synthetic_root, tmp_path):
    with pytest.raises(
        ConfigError, match=r"data.image_size=100 is not a multiple of 16.*96 or 112"
    ):
        build_job(_cfg(make_cfg, synthetic_root, "data.image_size=100"), tmp_path)
    with pytest.raises(ConfigError, match=r"data.crop_size=90 is not a multiple of 16"):
        build_job(_cfg(make_cfg, synthetic_root, "data.crop_size=90"), tmp_path)
    cae = make_cfg(
        *[o for o in FAST if not o.startswith("model.")],
        f"data.root={synthetic_root}",
        "experiment=cae_fast",
        "data.image_size=40",
    )
    with pytest.raises(ConfigError, match=r"data.image_size=40 is not a multiple of 16.*32 or 48"):
        build_job(cae, tmp_path)
    with pytest.raises(ConfigError, match=r"backbone.name=efficientnet_lit0: unknown.*close names"):
        build(_cfg(make_cfg, synthetic_root, "backbone.name=efficientnet_lit0").model)
    with pytest.raises(HydraException, match=r"backbone/resnet19(.|\n)*efficientnet_lite0"):
        _cfg(make_cfg, synthetic_root, "backbone=resnet19")  # Hydra lists the valid configs
    # k larger than the bank: refused after embedding one image, before extracting the rest.
    data_only = [o for o in FAST if not o.startswith("model.")]
    cfg = make_cfg(
        *data_only,
        f"data.root={synthetic_root}",
        "data.category=brick",
        "model=feature_knn",
        "model.k=500",
        out=tmp_path / "k",
    )
    with pytest.raises(ConfigError, match=r"model.k=500 exceeds the memory bank's 22 rows"):
        run_training(cfg)
    for name, overrides, message in (
        ("k2", ["model.k=9"], r"model.k=9 exceeds the memory bank's 1 rows"),
        (
            "k3",
            ["model.k=1", "model.patch_neighbors=3"],
            r"model.patch_neighbors=3 exceeds the memory bank's 1",
        ),
    ):
        cfg = _cfg(
            make_cfg, synthetic_root, "sampler.ratio=0.0001", *overrides, out=tmp_path / name
        )
        with pytest.raises(ConfigError, match=message):
            run_training(cfg)


def test_interrupted_writes_keep_the_earlier_files(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"status": "completed", "metrics": {"image_auroc": 0.9}})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"metrics": {"image_auroc": object()}})  # fails mid-dump
    assert json.loads(path.read_text())["metrics"]["image_auroc"] == 0.9
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left
    # The model file's atomic save: tests/test_model_file.py


def test_resume_skips_finished_jobs_and_reruns_failed_ones(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    shutil.move(root / "grass/train", tmp_path / "grass_train")  # grass fails the first time
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *FAST,
        f"data.root={root}",
        "data.category=brick,grass",
        "eval.plots=false",
        "eval.images.max_per_type=0",
        f"hydra.sweep.dir={sweep}",
    ]
    first = _run(args)
    assert first.returncode == 0, first.stderr[-2000:]
    brick = json.loads((sweep / "0" / "results.json").read_text())
    assert brick["status"] == "completed"
    assert json.loads((sweep / "1" / "results.json").read_text())["status"] == "failed"
    stamp = (sweep / "0" / "results.json").stat().st_mtime_ns

    shutil.move(tmp_path / "grass_train", root / "grass/train")  # cause fixed
    again = _run([*args, "resume=true"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"skipped (finished earlier): {sweep / '0'}" in again.stdout
    assert (sweep / "0" / "results.json").stat().st_mtime_ns == stamp  # untouched
    grass = json.loads((sweep / "1" / "results.json").read_text())
    assert grass["status"] == "completed" and grass["category"] == "grass"
    summary = (sweep / "summary.csv").read_text()
    assert summary.count("completed") >= 2


def test_same_seed_same_scores_and_provenance(make_cfg, synthetic_root, tmp_path):
    runs = [
        run_training(_cfg(make_cfg, synthetic_root, "seed=3", out=tmp_path / f"run{i}"))
        for i in range(2)
    ]
    preds = [json.loads((tmp_path / f"run{i}" / "predictions.json").read_text()) for i in range(2)]
    assert [p["score"] for p in preds[0]] == [p["score"] for p in preds[1]]  # bit-identical
    assert runs[0]["metrics"] == runs[1]["metrics"]
    first, second = runs[0]["provenance"], runs[1]["provenance"]
    assert first["memory_bank_sha256"] == second["memory_bank_sha256"] is not None
    assert first["model_sha256"] == second["model_sha256"]
    assert first["seeds"]["seed"] == 3 and first["seeds"]["data.seed"] == 3
    assert first["seeds"]["sampler.seed"] == 3
    assert first["packages"]["torch"] == torch.__version__.split("+")[0] or first["packages"][
        "torch"
    ].startswith(torch.__version__.split("+")[0])
    assert set(first["git"]) == {"commit", "dirty"}
    stored = load_file(runs[0]["model_file"])
    banks = [stored[f"model.members.{name}.memory_bank"] for name in ("fine", "coarse")]
    from defectlab.provenance import tensor_sha256

    assert tensor_sha256(banks) == first["memory_bank_sha256"]  # both banks, fine first
    other = run_training(_cfg(make_cfg, synthetic_root, "seed=4", out=tmp_path / "run_other"))
    assert other["provenance"]["memory_bank_sha256"] != first["memory_bank_sha256"]
