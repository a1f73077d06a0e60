"""Shared fixtures: offline environment, a small synthetic MVTec-layout set, composed configs."""

import os

# Tests never touch the network: set before anything imports timm/huggingface_hub/wandb.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from defectlab.datasets import SyntheticPreparer

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Tiny runs on the session's synthetic folder (``data.root=<synthetic_root>``), used as it is.
FAST = [
    "debug=tiny",  # conf/debug/tiny.yaml: synthetic data at 96 px, no logger
    "data.prepare=null",  # use the session fixture's folder as it is (no rewrite)
]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Two synthetic categories (brick, grass), 96 px, with clearly visible defects and masks."""
    root = tmp_path_factory.mktemp("synthetic")
    SyntheticPreparer(
        categories=("brick", "grass"),
        image_size=96,
        num_train=24,
        num_test_good=8,
        num_test_defect=4,
    )(root)
    return root


@pytest.fixture
def make_cfg(tmp_path):
    """Compose a real entry config (``train`` or ``evaluate``) with outputs in ``tmp_path``."""

    def _make(*overrides: str, config: str = "train", out: Path | None = None):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                config,
                overrides=[f"paths.output_dir={out or tmp_path}", *overrides],
                return_hydra_config=True,
            )
        HydraConfig.instance().set_config(cfg)  # resolves ${hydra:runtime.choices.*}
        return cfg

    return _make


def _train(synthetic_root: Path, run: Path, *extra: str) -> Path:
    from defectlab.jobs import run_training

    overrides = [f"paths.output_dir={run}", *FAST, f"data.root={synthetic_root}", *extra]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train", overrides=[*overrides, "data.category=brick"], return_hydra_config=True
        )
    HydraConfig.instance().set_config(cfg)
    run_training(cfg)
    return run


@pytest.fixture(scope="session")
def trained_run(synthetic_root, tmp_path_factory):
    """A PatchCore run on synthetic brick (96 px), trained once for the tests that consume runs.

    The default: two banks (``model.scales=auto`` -> two).
    """
    return _train(synthetic_root, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def trained_run_bright(trained_run, tmp_path_factory):
    """A copy of ``trained_run`` whose model file's config sets ``data.brightness=0.4``."""
    import shutil

    from omegaconf import OmegaConf

    from defectlab.model_file import MODEL_FILE, load_model, save_model

    run = tmp_path_factory.mktemp("run_bright") / "run"
    shutil.copytree(trained_run, run)
    loaded = load_model(run)
    config = OmegaConf.to_container(loaded.config)
    config["data"]["brightness"] = 0.4
    save_model(loaded.system, config, run / MODEL_FILE)
    return run


@pytest.fixture(scope="session")
def trained_run_one_bank(synthetic_root, tmp_path_factory):
    """The same run with one bank and Eq. 7 (``model.scales=one``, ``k`` 9): its own tests."""
    return _train(synthetic_root, tmp_path_factory.mktemp("run_one"), "model.scales=one")
