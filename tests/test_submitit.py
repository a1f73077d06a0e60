"""Sweeps on a cluster engine: Hydra's submitit launcher, here with submitit's local executor.

``hydra/launcher=submitit_local`` runs each job as its own submitit job (a separate process, the
function pickled and its result collected by submitit), the code path ``hydra/launcher=slurm``
takes on a cluster; only the executor differs.
"""

import csv
import json

import pytest

from .conftest import FAST
from .test_sweep import _run

pytestmark = pytest.mark.e2e


def test_two_job_sweep_then_resume_after_a_killed_job(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
        *FAST,
        f"data.root={synthetic_root}",
        "data.image_size=64",
        "model=feature_knn",
        "model.k=1",
        "eval.images.max_per_type=0",
        "eval.plots=false",
        "eval.bootstrap.n_resamples=0",
        "data.category=brick,grass",
    ]
    proc = _run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep summary: 2/2 jobs completed" in proc.stdout
    jobs = [d for d in (sweep / ".submitit").iterdir() if d.name.isdigit()]  # local job ids
    assert len(jobs) == 2 and all(list(d.glob("*_result.pkl")) for d in jobs)
    done = {job: json.loads((sweep / job / "results.json").read_text()) for job in ("0", "1")}
    assert {r["category"] for r in done.values()} == {"brick", "grass"}

    # A job killed mid-run leaves its folder without results.json and model file (both are
    # written atomically at the end): what SIGKILL or a cluster's time limit leaves behind.
    (sweep / "1" / "results.json").unlink()
    (sweep / "1" / "checkpoints" / "model.safetensors").unlink()
    kept = (sweep / "0" / "results.json").stat().st_mtime_ns

    proc = _run([*args, "resume=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep / "0" / "results.json").stat().st_mtime_ns == kept  # finished job: skipped
    rerun = json.loads((sweep / "1" / "results.json").read_text())
    assert rerun["status"] == "completed" and rerun["category"] == done["1"]["category"]
    assert rerun["metrics"] == done["1"]["metrics"]  # the same job, the same numbers
    rows = [r for r in csv.DictReader((sweep / "summary.csv").open()) if r["kind"] == "job"]
    assert [r["status"] for r in rows] == ["completed", "completed"]
