"""What every benchmark script records: the machine, and its JSON + Markdown outputs."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from omegaconf import DictConfig

from defectlab.data import scan_category


def machine() -> dict:
    """CPU, torch threads, GPU and torch version: a number means little without them."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def test_image_paths(run_config: DictConfig, count: int) -> list[Path]:
    """The first ``count`` test images of a trained run's own category."""
    index = scan_category(run_config.data.root, run_config.data.category)
    return [s.path for s in index.test][:count]


def write_outputs(out: Path, name: str, payload: dict, table: str) -> None:
    """``<out>/<name>.json`` (payload + machine) and ``<name>.md`` (machine + table); prints it."""
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    (out / f"{name}.json").write_text(json.dumps({"machine": info, **payload}, indent=2))
    (out / f"{name}.md").write_text(f"Machine: {info}\n\n{table}")
    print(table)
