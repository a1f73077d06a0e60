"""Freed heap pages handed back to the OS between evaluation batches (glibc's malloc_trim)."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import defectlab.callbacks as callbacks
from defectlab.callbacks import ReleaseFreedMemory
from defectlab.errors import ConfigError
from defectlab.heap import can_release_freed_memory, release_freed_memory

CONF = Path(__file__).resolve().parents[1] / "conf"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not can_release_freed_memory(), reason="needs glibc's malloc_trim")
def test_freed_pages_inside_the_heap_go_back_to_the_os():
    # 100 KB blocks stay below glibc's mmap threshold (128 KB at least): they live on the heap.
    blocks = [b"\x01" * 100_000 for _ in range(1200)]
    pinned = b"\x02" * 100_000  # allocated after them: the heap's top cannot shrink by itself
    del blocks
    freed = _rss_mb()
    assert release_freed_memory() is True
    assert freed - _rss_mb() > 60, "free() kept the pages; malloc_trim should have released them"
    assert pinned[-1] == 2  # live allocations are untouched


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", None])
def test_every_n_batches_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="every_n_batches"):
        ReleaseFreedMemory(every_n_batches=bad)


@pytest.mark.parametrize("available", [True, False])
def test_releases_after_every_nth_batch_of_each_evaluation_loop(monkeypatch, available):
    calls = []
    monkeypatch.setattr(callbacks, "release_freed_memory", lambda: calls.append(1) or available)
    cb = ReleaseFreedMemory(every_n_batches=2)
    for hook in (cb.on_test_batch_end, cb.on_validation_batch_end, cb.on_predict_batch_end):
        for i in range(5):  # batches 0..4: after the 2nd and the 4th
            hook(None, None, None, None, i)
    assert len(calls) == 6
    assert cb.released == (6 if available else 0)


def test_training_runs_it_by_default():
    node = OmegaConf.load(CONF / "callbacks" / "default.yaml").release_freed_memory
    assert node._target_ == "defectlab.callbacks.ReleaseFreedMemory" and node.every_n_batches == 1
