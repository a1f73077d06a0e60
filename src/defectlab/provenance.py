"""What a run needs to be reproduced: seeds, package versions, git commit, model checksums."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

PACKAGES = (
    "defectlab",
    "torch",
    "torchvision",
    "lightning",
    "timm",
    "torchmetrics",
    "faiss-cpu",
    "numpy",
    "pillow",
    "hydra-core",
    "omegaconf",
)
ROOT = Path(__file__).resolve().parents[2]


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the numbers (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """Commit of the defectlab checkout and whether it has uncommitted changes (None: no git)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def tensor_sha256(tensors: list[torch.Tensor]) -> str:
    """SHA-256 over the tensors' bytes, in order (CPU, contiguous)."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def seeds(cfg: DictConfig) -> dict[str, int]:
    """Every ``seed`` value of the config, by key (``seed``, ``data.seed``, ...), resolved."""
    paths: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                path = f"{prefix}.{key}" if prefix else str(key)
                if key == "seed":
                    paths.append(path)
                elif path != "hydra":  # Hydra's own node holds no run seed
                    walk(value, path)

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    found = {path: OmegaConf.select(cfg, path) for path in paths}
    return {path: value for path, value in found.items() if isinstance(value, int)}


def provenance(
    cfg: DictConfig, model: torch.nn.Module, banks: list[torch.Tensor] | None = None
) -> dict[str, Any]:
    """The ``provenance`` section of results.json (``banks``: the model's memory banks, if any)."""
    state = model.state_dict()
    return {
        "seeds": seeds(cfg),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "git": git_state(),
        "torch_threads": torch.get_num_threads(),
        # One hash over every bank in order (one bank: the hash of that bank alone).
        "memory_bank_sha256": tensor_sha256(banks)
        if banks and any(b.numel() for b in banks)
        else None,
        # Every tensor the checkpoint restores (weights, bank, calibration buffers), by name.
        "model_sha256": tensor_sha256([state[k] for k in sorted(state)]),
    }
