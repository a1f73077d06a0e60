"""Pre-allocated embedding buffer: exact rows, chunked subsampling, dtype, and the fit path."""

import pytest
import torch

from defectlab.components import CoresetSampler, EmbeddingBuffer
from defectlab.errors import ConfigError
from defectlab.jobs import run_training

from .conftest import FAST


def _batches(rows: torch.Tensor, size: int):
    return rows.split(size)


def test_buffer_holds_every_row_once_in_order():
    rows = torch.randn(1000, 8)
    buf = EmbeddingBuffer(1000, 8)
    for b in _batches(rows, 64):
        buf.add(b)
    out = buf.finish()
    assert torch.equal(out, rows) and out.data_ptr() == buf.buffer.data_ptr()  # a view, no copy


def test_buffer_grows_when_more_rows_arrive_than_announced():
    rows = torch.randn(250, 4)
    buf = EmbeddingBuffer(100, 4)
    for b in _batches(rows, 30):
        buf.add(b)
    assert torch.equal(buf.finish(), rows)


def test_float16_buffer_halves_memory_and_rounds_like_half():
    rows = torch.randn(300, 16)
    buf = EmbeddingBuffer(300, 16, dtype=torch.float16)
    buf.add(rows)
    assert buf.nbytes == 300 * 16 * 2
    assert torch.equal(buf.finish(), rows.half())


def test_chunked_buffer_reduces_each_chunk_and_never_exceeds_it():
    rows = torch.arange(1000.0).unsqueeze(1).repeat(1, 4)
    seen = []

    def keep_first_tenth(chunk):
        seen.append(len(chunk))
        return chunk[: len(chunk) // 10].clone()

    buf = EmbeddingBuffer(1000, 4, chunk=300, reduce=keep_first_tenth)
    assert len(buf.buffer) == 300
    for b in _batches(rows, 70):
        buf.add(b)
    kept = buf.finish()
    assert seen == [300, 300, 300, 100]
    expected = torch.cat(
        [rows[s : s + n // 10] for s, n in zip([0, 300, 600, 900], seen, strict=True)]
    )
    assert torch.equal(kept, expected)


def test_chunked_coreset_is_the_union_of_per_chunk_coresets():
    rows = torch.randn(900, 32)
    sampler = CoresetSampler(0.1, projection_dim=8, progress=False)
    buf = EmbeddingBuffer(900, 32, chunk=400, reduce=lambda c: c[sampler(c)])
    for b in _batches(rows, 50):
        buf.add(b)
    expected = torch.cat([c[sampler(c)] for c in rows.split(400)])
    assert torch.equal(buf.finish(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_disk_buffer_keeps_projections_and_reads_back_the_selected_rows(dtype, tmp_path):
    rows = torch.randn(700, 24)
    proj = torch.randn(24, 5)
    buf = EmbeddingBuffer(
        700, 24, dtype=dtype, storage="disk", project=lambda r: r @ proj, spill_dir=str(tmp_path)
    )
    for b in _batches(rows, 64):
        buf.add(b)
    assert (
        buf.nbytes == 700 * 5 * 4 and buf.disk_bytes == 700 * 24 * rows[:0].to(dtype).element_size()
    )
    torch.testing.assert_close(buf.projections(), rows @ proj)
    picked = torch.tensor([650, 3, 99, 4, 0])  # sampler order, not sorted
    assert torch.equal(buf.gather(picked), rows[picked].to(dtype).float())
    assert list(tmp_path.iterdir()) == []  # anonymous file: nothing left behind


def test_bad_chunk_is_a_config_error():
    with pytest.raises(ConfigError, match="chunk_vectors"):
        EmbeddingBuffer(10, 4, chunk=0, reduce=lambda c: c)


def test_bad_memory_config_fails_at_build(make_cfg):
    from defectlab.build import build

    with pytest.raises(ConfigError, match=r"model.memory.dtype=float8.*choose one of"):
        build(make_cfg("data=synthetic", "model.memory.dtype=float8").model)
    with pytest.raises(ConfigError, match=r"model.memory.chunk_vectors"):
        build(make_cfg("data=synthetic", "model.memory.chunk_vectors=0").model)
    with pytest.raises(ConfigError, match=r"model.memory.storage=nvme.*choose one of"):
        build(make_cfg("data=synthetic", "model.memory.storage=nvme").model)
    with pytest.raises(ConfigError, match=r"model.memory.spill_dir=/nonexistent"):
        EmbeddingBuffer(10, 4, storage="disk", project=lambda r: r, spill_dir="/nonexistent")


@pytest.mark.e2e
def test_fit_streams_into_the_buffer_float16_and_chunked(make_cfg, synthetic_root, tmp_path):
    """The announced sizes are the real ones; float16 and chunked banks stay close to exact."""
    # One bank: the sizes below are one layout's (two banks report theirs per member).
    common = (*FAST, f"data.root={synthetic_root}", "data.category=brick", "eval.plots=false")
    common = (*common, "model.scales=one")
    runs = {}
    for name, extra in {
        "exact": ["model.memory.storage=ram"],
        "half": ["model.memory.storage=ram", "model.memory.dtype=float16"],
        "disk": [],  # the default
        "chunked": ["model.memory.chunk_vectors=1000"],  # chunks stay in memory
    }.items():
        cfg = make_cfg(*common, *extra, out=tmp_path / name)
        runs[name] = run_training(cfg)
    mem = runs["exact"]["memory"]
    n_vectors = runs["exact"]["counts"]["train"] * 12 * 12
    assert mem["train_vectors"] == n_vectors and mem["buffer_dtype"] == "float32"
    dim = mem["bank_shape"][1]  # native features: 152 for lite0 blocks.2 + blocks.4
    assert dim == mem["dim"] == 152
    assert mem["buffer_mb"] == pytest.approx(n_vectors * dim * 4 / 2**20)
    assert mem["expected_bank_rows"] == mem["bank_shape"][0] == -(-n_vectors // 10)
    assert runs["half"]["memory"]["buffer_mb"] == pytest.approx(mem["buffer_mb"] / 2)
    # Disk: the same bank (exact), nothing of it held in memory while extracting.
    disk = runs["disk"]
    assert disk["memory"]["buffer_mb"] == 0 and disk["memory"]["spill_mb"] == mem["buffer_mb"]
    assert disk["metrics"] == runs["exact"]["metrics"]
    assert disk["memory"]["bank_shape"] == mem["bank_shape"]
    chunked = runs["chunked"]["memory"]
    assert chunked["chunk_vectors"] == 1000 and chunked["buffer_mb"] == pytest.approx(
        1000 * dim * 4 / 2**20
    )
    expected_rows = sum(-(-min(1000, n_vectors - s) // 10) for s in range(0, n_vectors, 1000))
    assert chunked["bank_shape"][0] == chunked["expected_bank_rows"] == expected_rows
    for name in ("half", "chunked"):
        assert runs[name]["metrics"]["image_auroc"] == pytest.approx(
            runs["exact"]["metrics"]["image_auroc"], abs=0.05
        ), name
