"""Read back what an offline wandb run wrote (its ``run-*.wandb`` file), without network.

wandb >= 0.19 has no Python reader for these files; the format is a 7-byte ``:W&B`` header
followed by LevelDB-log records (32 KiB blocks, 7-byte record headers) holding protobuf
``Record`` messages.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
        else:
            break


def read_run(run_dir: Path) -> dict:
    """``{"summary": {...}, "group": str, "job_type": str, "config": {...}}`` of an offline run."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    out = {"summary": {}, "config": {}, "group": None, "job_type": None}
    for raw in _payloads(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["group"], out["job_type"] = record.run.run_group, record.run.job_type
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                out["summary"][key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
