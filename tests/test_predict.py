"""predict.py: the same scores as evaluation, bad files skipped, folders watched."""

import csv
import json
import shutil
import threading
import time

import pytest

from defectlab.errors import ConfigError
from defectlab.inference import run_prediction

pytestmark = pytest.mark.e2e


def _expected(run):
    rows = json.loads((run / "predictions.json").read_text())
    return {r["path"]: r for r in rows}


def test_predict_folder_matches_evaluation_and_skips_bad_files(
    make_cfg, trained_run, synthetic_root, tmp_path
):
    inbox = tmp_path / "inbox"
    shutil.copytree(synthetic_root / "brick" / "test" / "hole", inbox)
    (inbox / "zero.png").write_bytes(b"")
    (inbox / "truncated.png").write_bytes((inbox / "000.png").read_bytes()[:200])
    out = tmp_path / "pred"
    summary = run_prediction(
        make_cfg(f"run_dir={trained_run}", f"input={inbox}", config="predict", out=out)
    )
    assert summary["scored"] == 4 and summary["skipped"] == 2
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    errors = {r["path"].rsplit("/", 1)[1]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"zero.png", "truncated.png"}
    assert "zero-byte file" in errors["zero.png"]
    assert "cannot be read as an image (truncated" in errors["truncated.png"]

    expected = _expected(trained_run)
    threshold = json.loads((trained_run / "results.json").read_text())["threshold"]
    for row in (r for r in rows if not r["error"]):
        name = row["path"].rsplit("/", 1)[1]
        ref = expected[str(synthetic_root / "brick" / "test" / "hole" / name)]
        assert float(row["score"]) == pytest.approx(ref["score"], rel=1e-5)
        assert float(row["score_normalized"]) == pytest.approx(ref["score_normalized"], rel=1e-5)
        assert row["verdict"] == ("defective" if ref["predicted"] else "good")
        assert (out / "images" / f"{name[:-4]}.png").is_file()
    saved = json.loads((out / "predictions.json").read_text())
    assert saved["threshold"]["image_threshold"] == pytest.approx(threshold["image_threshold"])


def test_predict_glob_and_input_errors(make_cfg, trained_run, synthetic_root, tmp_path):
    pattern = str(synthetic_root / "brick" / "test" / "*" / "00[01].png")
    summary = run_prediction(
        make_cfg(
            f"run_dir={trained_run}",
            f"input='{pattern}'",
            "save_images=false",
            config="predict",
            out=tmp_path / "glob",
        )
    )
    assert summary["scored"] == 8  # 000 and 001 of good, hole, scratch, stain
    with pytest.raises(ConfigError, match="input="):
        run_prediction(
            make_cfg(f"run_dir={trained_run}", f"input={tmp_path}/nothing*", config="predict")
        )


def test_watch_scores_files_as_they_arrive(make_cfg, trained_run, synthetic_root, tmp_path):
    inbox = tmp_path / "line"
    inbox.mkdir()
    sources = sorted((synthetic_root / "brick" / "test" / "good").glob("*.png"))[:5]

    def drop():
        for src in sources:
            time.sleep(0.3)
            shutil.copy(src, inbox / src.name)

    dropper = threading.Thread(target=drop)
    dropper.start()
    summary = run_prediction(
        make_cfg(
            f"run_dir={trained_run}",
            f"input={inbox}",
            "watch=true",
            "poll_s=0.1",
            "settle_s=0.2",
            "idle_timeout_s=3",
            "save_images=false",
            config="predict",
            out=tmp_path / "watch",
        )
    )
    dropper.join()
    assert summary["scored"] == 5 and summary["skipped"] == 0
    expected = _expected(trained_run)
    rows = list(csv.DictReader((tmp_path / "watch" / "predictions.csv").open()))
    for row in rows:
        ref = expected[
            str(synthetic_root / "brick" / "test" / "good" / row["path"].rsplit("/", 1)[1])
        ]
        assert float(row["score"]) == pytest.approx(ref["score"], rel=1e-5)
