"""The inspection web app: its scoring equals the run's, and it works in a real headless Chromium."""

import json
import re
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

from defectlab.app import (
    UploadLimits,
    discover_runs,
    inspect_images,
    inspect_upload,
    legacy_runs,
    run_app,
    table,
    verdict_text,
)
from defectlab.errors import ConfigError
from defectlab.inference import Predictor
from defectlab.model_file import LEGACY_CHECKPOINT

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def uploads(synthetic_root, tmp_path):
    """A good image, a defective one and a truncated file, with distinct names."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    test = synthetic_root / "brick" / "test"
    shutil.copy(test / "good" / "000.png", folder / "good_000.png")
    shutil.copy(test / "hole" / "000.png", folder / "hole_000.png")
    (folder / "broken.png").write_bytes((test / "good" / "001.png").read_bytes()[:300])
    originals = {
        "good_000.png": test / "good" / "000.png",
        "hole_000.png": test / "hole" / "000.png",
    }
    return folder, originals


def _saved_predictions(run):
    return {Path(p["path"]): p for p in json.loads((run / "predictions.json").read_text())}


def test_inspection_scores_equal_the_runs_and_threshold_rejudges(trained_run, uploads):
    folder, originals = uploads
    predictor = Predictor.from_model(trained_run, "cpu")
    items = inspect_images(predictor, sorted(folder.iterdir()))
    by_name = {item.name: item for item in items}
    assert "cannot be read as an image" in by_name["broken.png"].error
    saved = _saved_predictions(trained_run)
    for name, original in originals.items():
        assert by_name[name].score == pytest.approx(saved[original]["score"], rel=1e-5)
        assert len(by_name[name].tiles) == 3  # original, heatmap, overlay

    rows = {row[0]: row[3] for row in table(items, 1.0)}
    assert rows == {"broken.png": "unreadable", "good_000.png": "good", "hole_000.png": "DEFECTIVE"}
    # Lower the threshold below the good image's normalised score: it flips, nothing re-scored.
    low = by_name["good_000.png"].score_normalized - 1e-3
    assert {row[0]: row[3] for row in table(items, low)}["good_000.png"] == "DEFECTIVE"
    assert "**unreadable**" in verdict_text(items, 1.0)


def test_uploads_beyond_the_limits_get_a_message_not_a_crash(trained_run, uploads, tmp_path):
    folder, _ = uploads
    predictor = Predictor.from_model(trained_run, "cpu")
    limits = UploadLimits(max_files=3, max_bytes=50_000, max_pixels=150 * 150)
    big_file = folder / "big_file.png"  # a valid image, but more bytes than max_bytes
    Image.frombytes("RGB", (120, 120), bytes(range(256)) * 168 + bytes(192)).save(big_file)
    big_file.write_bytes(big_file.read_bytes() + bytes(60_000))  # trailing bytes: still decodes
    many_pixels = folder / "many_pixels.png"  # small file, 200 x 200 > 150 x 150 pixels
    Image.new("RGB", (200, 200), (90, 90, 90)).save(many_pixels)
    text = folder / "notes.txt"
    text.write_text("not an image")
    fake = folder / "fake.png"
    fake.write_text("<html>not an image either</html>")
    good = folder / "good_000.png"

    items, refused = inspect_upload(predictor, [str(p) for p in (good, big_file, text)], limits)
    assert refused is None
    errors = {item.name: item.error for item in items}
    assert errors["good_000.png"] is None
    assert "exceeds the upload limit of 0.0477 MB per file (max_file_mb=)" in errors["big_file.png"]
    assert "not an accepted image type (.txt)" in errors["notes.txt"]
    items, refused = inspect_upload(predictor, [str(p) for p in (many_pixels, fake)], limits)
    errors = {item.name: item.error for item in items}
    assert "40000 pixels exceeds max_image_pixels (app)=22500" in errors["many_pixels.png"]
    assert "cannot be read as an image" in errors["fake.png"]
    assert "**unreadable**" in verdict_text(items, 1.0)

    items, refused = inspect_upload(predictor, [str(good)] * 4, limits)
    assert items == [] and "4 files uploaded; at most 3" in refused
    with pytest.raises(ConfigError, match="max_files must be >= 1"):
        UploadLimits(max_files=0)


def test_app_serves_on_localhost_with_limits_by_default(make_cfg):
    cfg = make_cfg(config="app")
    assert cfg.host == "127.0.0.1"
    assert cfg.max_files >= 1 and cfg.max_file_mb > 0 and cfg.max_image_pixels > 0


def test_run_discovery_and_config_errors(trained_run, tmp_path, make_cfg):
    nested = tmp_path / "multirun" / "0"
    shutil.copytree(trained_run / "checkpoints", nested / "checkpoints")
    assert discover_runs([tmp_path / "multirun", trained_run]) == sorted(
        [nested.resolve(), trained_run.resolve()]
    )
    old = tmp_path / "multirun" / "1"
    (old / LEGACY_CHECKPOINT).parent.mkdir(parents=True)
    (old / LEGACY_CHECKPOINT).write_bytes(b"PK\x03\x04 an older run's pickle")
    assert legacy_runs([tmp_path / "multirun"]) == [old.resolve()]
    assert old.resolve() not in discover_runs([tmp_path / "multirun"])
    with pytest.raises(ConfigError, match="no trained run"):
        run_app(make_cfg(f"runs=[{tmp_path / 'empty'}]", config="app"), block=False)
    with pytest.raises(ConfigError, match="run_dir="):
        run_app(make_cfg("runs=[]", config="app"), block=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
def test_app_in_headless_chromium(trained_run, uploads, make_cfg):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    folder, originals = uploads
    port = _free_port()
    cfg = make_cfg(f"run_dir={trained_run}", "runs=[]", f"port={port}", config="app")
    app = run_app(cfg, block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # Without the networking switches Chromium keeps dialling Google, refused by this sandbox.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        wait = WebDriverWait(driver, 90)
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: "Loaded" in d.find_element(By.ID, "loaded").text)
        loaded = driver.find_element(By.ID, "loaded").text
        assert "patchcore" in loaded and "brick" in loaded and "efficientnet_lite0" in loaded

        upload = driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]")
        upload.send_keys("\n".join(str(p) for p in sorted(folder.iterdir())))

        def verdicts(d):
            text = " ".join(d.find_element(By.ID, "verdicts").text.split())
            found = dict(re.findall(r"(\w+\.png)\s*:\s*(DEFECTIVE|good|unreadable)", text))
            return found if len(found) == 3 else None

        shown = wait.until(verdicts)
        saved = _saved_predictions(trained_run)
        for name, original in originals.items():
            assert shown[name] == ("DEFECTIVE" if saved[original]["predicted"] else "good")
        assert shown["broken.png"] == "unreadable"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 6

        # The slider's minimum: every image re-judged live against it, by its normalised score
        # (0 is the held-out good images' minimum, so a good part may score below 0).
        number = driver.find_element(By.CSS_SELECTOR, "#threshold input[type=number]")
        number.send_keys(Keys.CONTROL, "a")
        number.send_keys("-1", Keys.ENTER)
        wait.until(lambda d: "threshold -1.000" in d.find_element(By.ID, "verdicts").text)
        text = " ".join(driver.find_element(By.ID, "verdicts").text.split())
        judged = re.findall(
            r"(\w+\.png)\s*:\s*(DEFECTIVE|good)\s*\(normalised score (-?[\d.]+), "
            r"threshold (-?[\d.]+)\)",
            text,
        )
        assert {name for name, *_ in judged} == {"good_000.png", "hole_000.png"}
        for _, shown_verdict, score, threshold in judged:
            assert float(threshold) == -1.0
            assert shown_verdict == ("DEFECTIVE" if float(score) >= -1.0 else "good")
        assert verdicts(driver)["broken.png"] == "unreadable"
        assert verdicts(driver)["hole_000.png"] == "DEFECTIVE"
    finally:
        driver.quit()
        app.close()
