"""One-time conversion of an older run's ``checkpoints/model.ckpt`` into a model file.

    python -m defectlab.convert <run folder | model.ckpt> --trust

Older defectlab versions saved trained models as Lightning checkpoints, which are pickles. This
command is the only part of defectlab that reads one. It uses torch's restricted ``weights_only``
unpickler (plain containers and tensors, no arbitrary objects), yet pickle readers have had bugs
before, so it runs only with ``--trust``, for files whose origin you know. It writes
``model.safetensors`` beside the checkpoint, deletes nothing, then loads the new file with the
ordinary loader and checks that every stored tensor equals the checkpoint's, bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from defectlab.build import build_run_system
from defectlab.config_targets import check_config_targets
from defectlab.errors import DefectlabError, ModelFileError
from defectlab.model_file import LEGACY_CHECKPOINT, MODEL_FILE, load_model, save_model
from defectlab.systems import TrainedSystem


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_legacy_checkpoint(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's contents through torch's weights-only unpickler (no arbitrary objects)."""
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError/RuntimeError for refused globals
        raise ModelFileError(
            f"{ckpt} holds objects other than tensors and plain containers, which torch's "
            f"weights-only reader refuses ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "It was not written by defectlab's train.py, or was altered; it is not converted."
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ModelFileError(f"{ckpt} is not a Lightning checkpoint (no state_dict)")
    if not isinstance(checkpoint.get("defectlab_config"), dict):
        raise ModelFileError(f"{ckpt} holds no defectlab_config: it was not written by train.py")
    return checkpoint


def convert(source: str | Path, overwrite: bool = False) -> Path:
    """Convert a run folder's (or a file's) Lightning checkpoint; returns the new model file."""
    source = Path(source).expanduser()
    ckpt = source / LEGACY_CHECKPOINT if source.is_dir() else source
    if not ckpt.is_file():
        raise ModelFileError(f"no checkpoint at {ckpt}: give an older run folder or its model.ckpt")
    target = ckpt.with_name(MODEL_FILE.name)
    if target.exists() and not overwrite:
        raise ModelFileError(
            f"{target} exists already; nothing converted (--overwrite replaces it)"
        )
    checkpoint = read_legacy_checkpoint(ckpt)
    config = checkpoint["defectlab_config"]
    check_config_targets(OmegaConf.create(config), str(ckpt))
    system = build_run_system(OmegaConf.create(config))
    system.on_load_checkpoint(checkpoint)  # checks the backbone, restores frozen weights
    system.load_state_dict(checkpoint["state_dict"], strict=True)
    epoch = checkpoint.get("epoch")
    save_model(
        system,
        config,
        target,
        extra={
            "converted_from": {"file": str(ckpt.resolve()), "sha256": _sha256(ckpt)},
            **({"training": {"epoch": epoch + 1}} if isinstance(system, TrainedSystem) else {}),
        },
    )
    # The ordinary loader must give back exactly the checkpoint's tensors.
    loaded = load_model(target).system.state_dict()
    differing = [
        key
        for key, value in checkpoint["state_dict"].items()
        if isinstance(value, torch.Tensor) and not torch.equal(loaded[key], value)
    ]
    if differing:
        target.unlink()
        raise ModelFileError(f"converted tensors differ from {ckpt}: {differing[:5]}; removed")
    return target


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m defectlab.convert <run folder | model.ckpt> --trust``."""
    parser = argparse.ArgumentParser(
        prog="python -m defectlab.convert",
        description="Convert an older run's pickle-based checkpoints/model.ckpt into "
        "checkpoints/model.safetensors (docs/model-files.md). Only for files you trust.",
    )
    parser.add_argument("source", nargs="+", help="run folders or model.ckpt files")
    parser.add_argument(
        "--trust",
        action="store_true",
        help="confirm that you know where these checkpoints come from (they are pickles)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    args = parser.parse_args(argv)
    if not args.trust:
        print(
            "Not converting: a model.ckpt is a pickle, and reading a pickle from an unknown source "
            "can be exploited. If you know where these files come from, run again with --trust.",
            file=sys.stderr,
        )
        return 2
    failed = 0
    for source in args.source:
        print(f"reading {source} with torch's weights-only unpickler (pickle: trusted files only)")
        try:
            target = convert(source, args.overwrite)
        except DefectlabError as err:
            print(f"not converted: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"wrote {target} (tensors checked equal to the checkpoint); nothing was deleted")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
