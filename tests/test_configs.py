"""Every config in conf/ composes and its nodes instantiate (random weights, nothing downloaded).

A broken ``_target_``, a key its class does not take or a missing mandatory value fails here,
before anyone runs a job with it.
"""

import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

import defectlab.experiment_log  # noqa: F401  (registers the ${sweep_id:} resolver of logger=wandb)
from defectlab.build import build_run_system
from defectlab.data import AnomalyDataModule
from defectlab.errors import ConfigError
from defectlab.metrics import ThresholdSpec
from defectlab.systems import AnomalySystem, TrainedSystem

from .conftest import CONF

# Entry configs of the other scripts (train.yaml: every group option below).
ENTRY = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem != "train")
# Groups selected by a train.py override, with every option on disk.
GROUPS = {
    group.name: sorted(p.stem for p in group.glob("*.yaml"))
    for group in sorted(CONF.iterdir())
    if group.is_dir() and group.name != "hydra"
}
# Groups whose choice changes the model or its system: those cases build them.
MODEL_GROUPS = {
    "backbone",
    "embedding",
    "sampler",
    "model",
    "system",
    "experiment",
    "hparams_search",
    "debug",
}
# Random init of these takes 5-16 s on the 2-core CI machine: in the e2e lane.
LARGE = {"vit_base_patch16_224", "wide_resnet50_2", "resnet50", "efficientnet_b5"}
# Values a config leaves mandatory (???) or that would reach outside the test's folder.
NEEDS = {
    ("data", "mvtec"): ["data.root=/nonexistent/mvtec"],
    ("data", "folder"): ["data.root=/nonexistent/folder", "data.category=part"],
    ("sweep", "mvtec_all"): ["data.root=/nonexistent/mvtec"],
    ("threshold", "fixed"): ["threshold.value=2.5"],
    ("threshold", "f1_val"): ["data.val_dir=/nonexistent/val"],
    ("system", "trained"): ["model=cae"],  # the default model (patchcore) has a memory bank
    ("system", "supervised"): ["model=unet"],
}


def _random_weights(cfg: DictConfig) -> DictConfig:
    """``cfg`` with every backbone built from random weights (offline, fast)."""
    for backbone in (cfg.backbone.get("members") or {"": cfg.backbone}).values():
        backbone.pretrained = False
    return cfg


def _compose(config: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config,
            overrides=[f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path}", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    return cfg


def _train_cfg(overrides: list[str], tmp_path: Path) -> DictConfig:
    return _random_weights(_compose("train", overrides, tmp_path))


def _targets(node, where: str = "") -> list[str]:
    """Config keys of every ``_target_`` inside ``node`` (nested ones included)."""
    found = []
    if isinstance(node, dict):
        if "_target_" in node:
            found.append(where or "<root>")
        for key, value in node.items():
            found += _targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _targets(value, f"{where}[{i}]")
    return found


@pytest.mark.parametrize(
    ("group", "option"),
    [
        pytest.param(g, o, marks=[pytest.mark.e2e] if o in LARGE else [])
        for g, options in GROUPS.items()
        for o in options
    ],
)
def test_every_group_option_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}", *NEEDS.get((group, option), [])]
    cfg = _train_cfg(overrides, tmp_path)
    # Every object a run builds from its config, each node on its own: model, system, data,
    # trainer, loggers.
    if group in MODEL_GROUPS:
        model = instantiate(cfg.model)
        system = instantiate(cfg.system)(model)  # a partial: the model is added at build time
        assert isinstance(system, AnomalySystem) and system.model is model
    assert isinstance(instantiate(cfg.data), AnomalyDataModule)
    ThresholdSpec(**OmegaConf.to_container(cfg.threshold, resolve=True))
    for node in (*(cfg.get("logger") or {}).values(), *(cfg.get("callbacks") or {}).values()):
        instantiate(node)
    instantiate(cfg.trainer, logger=False)
    # Every class a config names (launchers, sweepers, samplers of searches) exists.
    hydra_cfg = OmegaConf.to_container(cfg.hydra, resolve=False)
    for key in _targets(hydra_cfg):
        node = OmegaConf.select(cfg.hydra, key) if key != "<root>" else cfg.hydra
        get_object(node._target_)


@pytest.mark.parametrize("launcher", ["basic", "joblib", "slurm", "submitit_local"])
def test_every_launcher_exists(launcher, tmp_path):
    cfg = _compose("train", [f"hydra/launcher={launcher}"], tmp_path)
    get_object(cfg.hydra.launcher._target_)


@pytest.mark.parametrize("config", ENTRY)
def test_every_entry_config_composes(config, tmp_path):
    cfg = _compose(config, [], tmp_path)
    assert cfg.task_name == config
    for key in _targets(OmegaConf.to_container(cfg, resolve=False)):
        if key == "hydra" or key.startswith("hydra."):
            continue
        node = OmegaConf.select(cfg, key)
        if key.startswith("data"):  # the data group's node (and its preparer) builds offline
            instantiate(node)
        else:
            get_object(node._target_)


def test_model_chooses_its_system_and_a_mismatch_is_refused(tmp_path):
    cfg = _train_cfg(["model=cae", "system.patience=3", "debug=tiny"], tmp_path)
    system = build_run_system(cfg)
    assert isinstance(system, TrainedSystem) and system.patience == 3
    assert cfg.trainer.max_epochs == cfg.system.max_epochs == 100
    with pytest.raises(ConfigError, match="use system=trained"):
        build_run_system(_train_cfg(["model=cae", "system=memory_bank"], tmp_path))
    with pytest.raises(ConfigError, match="use system=memory_bank"):
        build_run_system(_train_cfg(["system=trained"], tmp_path))


def test_configs_from_before_the_system_group_keep_training_under_model_fit(tmp_path):
    """Model files of earlier runs hold model.fit and no system node: they still build."""
    cfg = _train_cfg(["model=unet", "system.patience=4", "debug=tiny"], tmp_path)
    old = OmegaConf.to_container(cfg, resolve=False)
    old["model"]["fit"] = old.pop("system")
    old.pop("hydra")
    system = build_run_system(OmegaConf.create(old))
    assert isinstance(system, TrainedSystem) and system.patience == 4
    assert system.max_epochs == 100 and system.anomalies.kinds == ["perlin_texture", "perlin_self"]


def test_configs_from_before_hnsw_was_removed_still_build(tmp_path):
    """Model files saved while the hnsw backend existed store its settings in model.knn."""
    cfg = _train_cfg(["debug=tiny"], tmp_path)
    old = OmegaConf.to_container(cfg, resolve=False)
    old.pop("hydra")
    old["model"].pop("scales")  # those files predate model.scales: one bank
    old["model"]["knn"].update({"hnsw_m": 32, "ef_search": 64})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact run's unused settings: no warning
        system = build_run_system(OmegaConf.create(old))
    assert system.model.knn.backend == "exact"
    old["model"]["knn"]["backend"] = "hnsw"
    with pytest.warns(UserWarning, match="backend=hnsw was removed.*searched exactly"):
        system = build_run_system(OmegaConf.create(old))
    assert system.model.knn.backend == "exact"
    new = _train_cfg(["debug=tiny", "model.knn.backend=hnsw"], tmp_path)
    with pytest.raises(ConfigError, match="backend=hnsw was removed.*use model.knn.backend=exact"):
        build_run_system(new)
