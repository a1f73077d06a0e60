"""Multiruns: parallel jobs with the joblib launcher, a failing job, the sweep summary."""

import csv
import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from defectlab.datasets import SyntheticPreparer

from .conftest import ROOT
from .wandb_offline import read_run

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def uneven_root(tmp_path_factory):
    """brick has 24 train images; grass only 10, too few to hold out 95 % of them."""
    root = tmp_path_factory.mktemp("uneven")
    common = dict(image_size=64, num_test_good=4, num_test_defect=2)
    SyntheticPreparer(categories=("brick",), num_train=24, **common)(root)
    SyntheticPreparer(categories=("grass",), num_train=10, **common)(root)
    return root


def _run(args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_joblib_multirun_keeps_going_past_a_failed_job_and_writes_the_summary(
    uneven_root, tmp_path
):
    sweep = tmp_path / "sweep"
    proc = _run(
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep}",
            "data=synthetic",
            "data.prepare=null",
            f"data.root={uneven_root}",
            "data.image_size=64",
            "model=feature_knn",
            "model.k=1",  # brick at 0.95 keeps only a few training images: k=5 would be refused
            "logger=none",
            "eval.images.max_per_type=0",
            "eval.plots=false",
            "data.category=brick,grass",
            "data.val_ratio=0.1,0.95",  # grass at 0.95 holds out all 10 images: that job fails
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep summary: 3/4 jobs completed" in proc.stdout

    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    jobs = [r for r in rows if r["kind"] == "job"]
    assert len(jobs) == 4
    by_setting = {(r["data.category"], r["data.val_ratio"]): r for r in jobs}
    failed = by_setting[("grass", "0.95")]
    assert failed["status"] == "failed" and "too few to hold out" in failed["error"]
    for key in [("brick", "0.1"), ("grass", "0.1"), ("brick", "0.95")]:
        row = by_setting[key]
        assert row["status"] == "completed", row
        assert 0 <= float(row["image_auroc"]) <= 1 and float(row["fit_s"]) > 0
        assert (sweep / row["job"] / "results.json").is_file()
        assert (sweep / row["job"] / "checkpoints" / "model.safetensors").is_file()

    means = {r["data.val_ratio"]: r for r in rows if r["kind"] == "mean"}
    assert means["0.1"]["data.category"] == "mean of 2"
    expected = (
        float(by_setting[("brick", "0.1")]["image_auroc"])
        + float(by_setting[("grass", "0.1")]["image_auroc"])
    ) / 2
    assert float(means["0.1"]["image_auroc"]) == pytest.approx(expected)
    assert means["0.95"]["status"] == "1 completed"
    markdown = (sweep / "summary.md").read_text()
    assert "Failed or missing jobs" in markdown and "too few to hold out" in markdown


def test_single_run_still_fails_loudly(uneven_root, tmp_path):
    proc = _run(
        [
            f"hydra.run.dir={tmp_path / 'run'}",
            "data=synthetic",
            "data.prepare=null",
            f"data.root={uneven_root}",
            "data.category=nosuch",
            "logger=none",
        ]
    )
    assert proc.returncode != 0 and "data.category=nosuch" in proc.stderr


def test_sweep_and_launcher_presets_compose(tmp_path):
    for args, expected in [
        (["sweep=mvtec_all", "data.root=/x"], "zipper"),
        (["hydra/launcher=slurm"], "SlurmLauncher"),
        (["hydra/launcher=joblib"], "JoblibLauncher"),
    ]:
        proc = _run([*args, "--cfg", "hydra"])
        assert proc.returncode == 0 and expected in proc.stdout, proc.stderr[-2000:]


def test_wandb_groups_the_jobs_of_a_sweep_and_tensorboard_works(uneven_root, tmp_path):
    common = [
        "data=synthetic",
        "data.prepare=null",
        f"data.root={uneven_root}",
        "data.category=brick",
        "data.image_size=64",
        "model=feature_knn",
        "eval.images.max_per_type=1",
    ]
    sweep = tmp_path / "sweep"
    proc = _run(["-m", f"hydra.sweep.dir={sweep}", *common, "logger=wandb", "model.k=1,3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [read_run(next((sweep / job / "wandb").glob("offline-run-*"))) for job in ("0", "1")]
    assert {r["group"] for r in runs} == {f"{tmp_path.name}_sweep"}  # one group per sweep
    assert [r["config"]["model"]["k"] for r in runs] == [1, 3]  # one wandb run per job
    assert all(r["job_type"] == "feature_knn" for r in runs)

    run = tmp_path / "tb"
    proc = _run([f"hydra.run.dir={run}", *common, "logger=tensorboard"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    accumulator = EventAccumulator(str(run / "tensorboard")).Reload()
    results = json.loads((run / "results.json").read_text())
    (event,) = accumulator.Scalars("test/image_auroc")
    assert event.value == pytest.approx(results["metrics"]["image_auroc"])
    assert "timing/fit_s" in accumulator.Tags()["scalars"]


def test_optuna_search_maximises_the_validation_metric_not_a_test_metric(uneven_root, tmp_path):
    sweep = tmp_path / "optuna"
    proc = _run(
        [
            "hparams_search=patchcore_optuna",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep}",
            "data=synthetic",
            "data.prepare=null",
            f"data.root={uneven_root}",
            "data.category=brick",
            "logger=none",
            "eval.images.max_per_type=0",
            "eval.plots=false",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    trials = [json.loads((sweep / j / "results.json").read_text()) for j in ("0", "1")]
    values = [t["validation"]["val_synthetic_pixel_auroc"] for t in trials]
    assert best.best_value == pytest.approx(max(values))
    assert set(best.best_params) == {
        "sampler.ratio",
        "model.k",
        "model.blur_sigma",
        "data.image_size",
        "embedding",
        "backbone",
    }
    for trial in trials:  # each trial ran the embedding and backbone the sweeper chose
        assert trial["embedding"] in ("native", "paper")
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert sum(r["kind"] == "job" and r["status"] == "completed" for r in rows) == 2
