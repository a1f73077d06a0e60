"""Training embeddings streamed into one pre-allocated buffer, optionally subsampled chunk by chunk."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from defectlab.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}


STORAGES = ("ram", "disk")


def check_storage(storage: str) -> str:
    """``model.memory.storage`` value, or ConfigError naming the valid ones."""
    if storage not in STORAGES:
        raise ConfigError(f"model.memory.storage={storage}: choose one of {STORAGES}")
    return storage


def check_count(key: str, value: int | None) -> int | None:
    """A ``model.memory.<key>`` that is null or >= 1, or ConfigError."""
    if value is not None and value < 1:
        raise ConfigError(f"model.memory.{key} must be >= 1 or null, got {value}")
    return value


def buffer_dtype(name: str) -> torch.dtype:
    """``model.memory.dtype`` name -> torch dtype (ConfigError names the valid ones)."""
    if name not in DTYPES:
        raise ConfigError(f"model.memory.dtype={name}: choose one of {sorted(DTYPES)}")
    return DTYPES[name]


class EmbeddingBuffer:
    """Collect ``(n, D)`` row blocks into storage allocated once, never a list + concatenate.

    A list of batches followed by ``torch.cat`` holds every embedding twice at the peak (3 GB for
    ELPV mono); this buffer holds them once, in ``dtype`` (float16 halves it again).

    ``storage="disk"`` writes the rows to an anonymous temporary file instead and keeps only their
    ``project``-ions in memory (128 floats a row for the coreset instead of 1024): the sampler
    selects on those and only the selected rows are read back. Exact, and the process never holds
    the raw embeddings (the page cache may, but the kernel can drop it).

    With ``chunk`` set, the buffer holds at most ``chunk`` rows in memory: each time it fills,
    ``reduce`` (the coreset) keeps its share of that chunk and the buffer is reused, so memory no
    longer grows with the dataset. The kept rows are the union of per-chunk coresets, which covers
    the data a little less evenly than one coreset over everything (docs/methods/patchcore.md: chunked coreset).

    Args:
        total: rows expected over the whole pass (sizes the buffer when ``chunk`` is None).
        dim: row dimension D.
        dtype: storage dtype of the rows.
        chunk: rows per chunk, or None to keep everything for one final reduction.
        reduce: ``rows -> kept rows`` applied to each full chunk (needed with ``chunk``).
        device: where in-memory rows live.
        storage: ``ram`` or ``disk``.
        project: row-wise ``rows -> projections`` kept in memory (needed with ``disk``).
        spill_dir: folder of the temporary file (None = the system's temp folder).
    """

    def __init__(
        self,
        total: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        chunk: int | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | str = "cpu",
        storage: str = "ram",
        project: Callable[[torch.Tensor], torch.Tensor] | None = None,
        spill_dir: str | None = None,
    ) -> None:
        check_storage(storage)
        check_count("chunk_vectors", chunk)
        if chunk is not None and storage == "disk":
            raise ValueError("a chunked EmbeddingBuffer keeps its chunk in memory: storage=ram")
        if chunk is not None and reduce is None:
            raise ValueError("a chunked EmbeddingBuffer needs a reduce function")
        if storage == "disk" and project is None:
            raise ValueError("a disk EmbeddingBuffer needs a project function")
        self.dim, self.dtype, self.storage = dim, dtype, storage
        self.chunk = chunk  # rows per chunk (None = one final reduction)
        self.chunked = chunk is not None
        self.reduce, self.project = reduce, project
        self.filled = 0
        self.seen = 0
        self._kept: list[torch.Tensor] = []
        if storage == "disk":
            spill = Path(spill_dir or tempfile.gettempdir())
            if not spill.is_dir():
                raise ConfigError(f"model.memory.spill_dir={spill} is not a folder")
            # Anonymous: removed by the OS when closed or when the process dies.
            self._file = tempfile.TemporaryFile(dir=spill)  # noqa: SIM115 - lives across add()s
            self._projected: EmbeddingBuffer | None = None
            self.capacity = total
            self.buffer = torch.empty(0, dim, dtype=dtype)
        else:
            self.capacity = max(1, min(total, chunk) if chunk else total)
            self.buffer = torch.empty(self.capacity, dim, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held in memory (disk: their projections)."""
        if self.storage == "disk":
            return 0 if self._projected is None else self._projected.nbytes
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row (in memory or on disk)."""
        return self.dim * self.buffer.element_size()

    @property
    def disk_bytes(self) -> int:
        return self.seen * self.row_bytes if self.storage == "disk" else 0

    def add(self, rows: torch.Tensor) -> None:
        """Append ``(n, D)`` rows (cast to the buffer dtype)."""
        self.seen += len(rows)
        if self.storage == "disk":
            self._write(rows)
            return
        while len(rows):
            if self.filled == self.capacity:
                if not self.chunked:
                    # More rows than announced (e.g. a dataset that grew): grow once, not per batch.
                    self.buffer = torch.cat([self.buffer, torch.empty_like(self.buffer)])
                    self.capacity = len(self.buffer)
                else:
                    self._flush()
            take = min(len(rows), self.capacity - self.filled)
            self.buffer[self.filled : self.filled + take] = rows[:take]
            self.filled += take
            rows = rows[take:]

    def _write(self, rows: torch.Tensor) -> None:
        projected = self.project(rows)
        if self._projected is None:
            self._projected = EmbeddingBuffer(self.capacity, projected.shape[1], projected.dtype)
        self._projected.add(projected)
        data = rows.detach().to("cpu", self.dtype).contiguous()
        # numpy has no bfloat16: write the raw 16-bit words.
        raw = data.view(torch.int16) if self.dtype == torch.bfloat16 else data
        try:
            self._file.write(raw.numpy().tobytes())
        except OSError as err:
            raise OSError(
                f"model.memory.storage=disk: writing training embeddings to {self._file.name} "
                f"failed ({err}); free space, set model.memory.spill_dir or use storage=ram"
            ) from err

    def _flush(self) -> None:
        if self.filled:
            self._kept.append(self.reduce(self.buffer[: self.filled]))
            self.filled = 0

    def finish(self) -> torch.Tensor:
        """All rows (ram: a view of the buffer) or the union of per-chunk reductions."""
        if self.storage == "disk":
            raise RuntimeError("a disk EmbeddingBuffer is read with projections() and gather()")
        if not self.chunked:
            return self.buffer[: self.filled]
        self._flush()
        kept, self._kept = self._kept, []
        self.buffer = self.buffer[:0]  # release the chunk buffer
        return torch.cat(kept) if kept else self.buffer

    def projections(self) -> torch.Tensor:
        """``(N, d*)`` projections of every row written (disk storage), handed over: the buffer
        drops them, so they are freed as soon as the caller is done (before :meth:`gather`)."""
        projected, self._projected = self._projected, None
        return projected.finish()

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` read back from disk as float32 ``(M, D)``; closes the file.

        Plain reads, not a memory map: the file was just written, so it sits in the page cache,
        and faulting in one row of a mapping maps its cached neighbours too (fault-around), which
        put most of the file into this process's RSS even for a 10 % selection.
        """
        self._file.flush()
        row_bytes = self.row_bytes
        np_dtype = np.int16 if self.dtype == torch.bfloat16 else DTYPE_NUMPY[self.dtype]
        order = indices.cpu().numpy()
        perm = np.argsort(order, kind="stable")  # read in file order, place in sampler order
        sorted_rows = order[perm]
        out = np.empty((len(order), self.dim), dtype=np_dtype)
        fd = self._file.fileno()
        done = 0
        # Runs of consecutive rows are read with one call each.
        for run in np.split(sorted_rows, np.flatnonzero(np.diff(sorted_rows) != 1) + 1):
            if not len(run):
                continue
            nbytes = len(run) * row_bytes
            chunk = os.pread(fd, nbytes, int(run[0]) * row_bytes)
            if len(chunk) != nbytes:
                raise OSError(f"{self._file.name}: short read of spilled embeddings")
            out[perm[done : done + len(run)]] = np.frombuffer(chunk, np_dtype).reshape(-1, self.dim)
            done += len(run)
        self._file.close()
        picked = torch.from_numpy(out)
        if self.dtype == torch.bfloat16:
            picked = picked.view(torch.bfloat16)
        return picked.float()
