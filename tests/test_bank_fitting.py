"""fit_memory_bank (one pass, read top to bottom) and the reports systems hand back."""

import lightning as L
import pytest
import torch

from defectlab.components import (
    BackboneEnsemble,
    CoresetSampler,
    FeatureExtractor,
    IdentitySampler,
    NearestNeighbors,
)
from defectlab.data import AnomalyDataModule
from defectlab.errors import ConfigError
from defectlab.models import FeatureKNN, PatchCore, build_patchcore
from defectlab.systems import (
    BankReport,
    FitReport,
    MemoryBankSystem,
    TestReport,
    TrainingReport,
    fit_memory_bank,
)

SIZE = 32  # 8 x 8 patches at resnet18 layer1's stride 4 (PatchCore's native layout)


def _items(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, SIZE, SIZE, generator=g)} for _ in range(n)]


def _batches(items: list[dict], size: int) -> list[dict]:
    return [
        {"image": torch.stack([i["image"] for i in items[s : s + size]])}
        for s in range(0, len(items), size)
    ]


def _extractor(layers=("layer1", "layer2")) -> FeatureExtractor:
    torch.manual_seed(0)
    return FeatureExtractor("resnet18", list(layers), pretrained=False)


def _patchcore(sampler=None, **memory) -> PatchCore:
    return PatchCore(
        _extractor(),
        sampler or IdentitySampler(),
        NearestNeighbors("torch"),
        k=3,
        memory={"embed_batch": 2, **memory},
    )


def test_bank_holds_every_training_patch_and_the_report_its_sizes():
    model, train = _patchcore(storage="ram"), _items(5, 0)
    report = fit_memory_bank(model, train, _batches(train, 3))
    emb = model.embed(torch.stack([i["image"] for i in train]))
    assert torch.equal(model.memory_bank, emb.reshape(-1, emb.shape[-1]))
    assert isinstance(report, BankReport) and report.sample_s >= 0
    mem = report.memory
    assert mem["train_vectors"] == mem["expected_bank_rows"] == 5 * 64 == len(model.memory_bank)
    assert mem["dim"] == emb.shape[-1] and mem["storage"] == "ram" and mem["chunk_vectors"] is None
    assert mem["buffer_mb"] == pytest.approx(5 * 64 * emb.shape[-1] * 4 / 2**20)


def test_disk_spill_and_chunks_build_the_banks_of_their_settings():
    train = _items(6, 1)
    sampler = CoresetSampler(0.25, projection_dim=8, progress=False)
    ram = _patchcore(sampler, storage="ram")
    fit_memory_bank(ram, train, _batches(train, 4))
    disk = _patchcore(sampler, storage="disk")
    report = fit_memory_bank(disk, train, _batches(train, 4))
    assert torch.equal(disk.memory_bank, ram.memory_bank)  # the spill is exact
    assert report.memory["buffer_mb"] == 0 and report.memory["spill_mb"] > 0
    chunked = _patchcore(sampler, chunk_vectors=100)
    report = fit_memory_bank(chunked, train, _batches(train, 4))
    rows = torch.cat(
        [ram.embed(b["image"]).reshape(-1, ram.embedder.out_dim) for b in _batches(train, 4)]
    )
    expected = torch.cat([c[sampler(c)] for c in rows.split(100)])
    assert torch.equal(chunked.memory_bank, expected)
    assert report.memory["chunk_vectors"] == 100
    assert report.memory["expected_bank_rows"] == len(expected) == 25 + 25 + 25 + 21  # 6 x 64 rows


def test_feature_knn_bank_is_one_vector_per_image():
    model = FeatureKNN(_extractor(["layer2"]), NearestNeighbors("torch"), k=2)
    train = _items(4, 2)
    report = fit_memory_bank(model, train, _batches(train, 3))
    assert model.memory_bank.shape == (4, 128)
    assert report.memory["train_vectors"] == report.memory["expected_bank_rows"] == 4


def test_k_above_the_bank_fails_before_any_batch_is_embedded():
    model = PatchCore(_extractor(), IdentitySampler(), NearestNeighbors("torch"), k=500)

    def never():
        raise AssertionError("batches were read")
        yield

    with pytest.raises(ConfigError, match=r"model.k=500 exceeds the memory bank's 128 rows"):
        fit_memory_bank(model, _items(2, 3), never())


def test_ensemble_members_get_their_banks_then_held_out_normalisation():
    torch.manual_seed(0)
    backbones = BackboneEnsemble(
        {
            "a": FeatureExtractor("resnet18", ["layer1", "layer2"], pretrained=False),
            "b": FeatureExtractor("resnet18", ["layer2"], pretrained=False),
        }
    )
    model = build_patchcore(backbones, IdentitySampler(), NearestNeighbors("torch"), k=3)
    train, held = _items(3, 4), _items(4, 5)
    with pytest.raises(ConfigError, match="held-out"):
        fit_memory_bank(model, train, _batches(train, 2))
    report = fit_memory_bank(model, train, _batches(train, 2), held_out=_batches(held, 3))
    images = torch.stack([i["image"] for i in train])
    for member in model.bank_models():
        emb = member.embed(images)
        assert torch.equal(member.memory_bank, emb.reshape(-1, emb.shape[-1]))
    held_images = torch.stack([i["image"] for i in held])
    scores = [out.score for out in model.predict_members(held_images)]
    assert torch.allclose(model.score_mean.float(), torch.stack([s.mean() for s in scores]))
    assert bool(model.normalized)
    mem = report.memory
    assert list(mem["members"]) == ["a", "b"] and mem["train_vectors"] == 3 * 64 + 3 * 16


def test_training_report_from_the_held_out_losses():
    report = TrainingReport.from_history([0.5, 0.25, 0.3], max_epochs=10)
    assert report.as_dict() == {
        "epochs": 3,
        "max_epochs": 10,
        "stopped_early": True,
        "best_epoch": 2,
        "best_val_loss": 0.25,
        "val_loss_history": [0.5, 0.25, 0.3],
    }
    assert TrainingReport.from_history([], max_epochs=None).best_epoch is None


def test_memory_bank_system_fits_validates_and_tests_through_reports(synthetic_root, tmp_path):
    system = MemoryBankSystem(_patchcore(storage="ram"))
    data = AnomalyDataModule(str(synthetic_root), "brick", image_size=SIZE, batch_size=8)
    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        max_epochs=1,
    )
    fit = system.fit(trainer, data)
    assert isinstance(fit, FitReport) and fit.training is None
    assert fit.bank.memory["train_vectors"] == len(data.fit_set) * 64
    assert system.calibration.fitted  # held-out calibration ran
    tested = system.test(trainer, data)
    assert isinstance(tested, TestReport)
    assert len(tested.predictions) == len(tested.outputs.scores) == len(data.test_set)
    assert tested.localization and tested.outputs.maps.shape[-2:] == (SIZE, SIZE)
    assert set(tested.summary()) == {
        "metrics",
        "confusion_matrix",
        "oracle",
        "per_defect_type",
        "localization",
        "threshold",
    }
    with pytest.raises(ConfigError, match=r"system.fit\(trainer, datamodule\)"):
        L.Trainer(logger=False, enable_checkpointing=False, max_epochs=1).fit(system, data)
