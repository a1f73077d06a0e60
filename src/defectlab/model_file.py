"""A trained model as data: one safetensors file, read back by one loader (docs/model-files.md).

The file holds every persistent tensor of the trained system (memory bank, trained weights,
calibration, normalisation; frozen pretrained backbone weights are left out and rebuilt from the
config) and, in the safetensors header, one JSON document: format version, defectlab version,
the composed run config, the identity and SHA-256 of every backbone's weights, pre-processing and
thresholds. Reading it never unpickles and runs nothing from the file: the header is parsed as
JSON, every ``_target_`` of the config is checked against defectlab's own classes before anything
is built (:mod:`defectlab.config_targets`), then names, shapes and dtypes of the tensors and the
backbones' checksums are compared with the rebuilt model. Older pickle-based run folders are
converted once, knowingly, with ``python -m defectlab.convert``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import defectlab
from defectlab.build import build_run_system
from defectlab.components.backbone import FeatureExtractor, frozen_weight_keys
from defectlab.config_targets import check_config_targets
from defectlab.errors import BackboneWeightsError, ConfigError, ModelFileError
from defectlab.models.protocols import DerivedBuffers, ResizableBuffers
from defectlab.provenance import git_state
from defectlab.results import atomic_target
from defectlab.systems import AnomalySystem

FORMAT = "defectlab.model"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
METADATA_KEY = "defectlab"  # the safetensors header entry holding the JSON document
MODEL_FILE = Path("checkpoints") / "model.safetensors"  # inside a run folder
LEGACY_CHECKPOINT = Path("checkpoints") / "model.ckpt"  # pickle-based, before format 1
CONVERT = "python -m defectlab.convert"
# safetensors' own header size limit; a larger length field means it is not a safetensors file.
_MAX_HEADER = 100_000_000
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip container, a raw pickle stream


@dataclass
class LoadedModel:
    """A trained system rebuilt from a model file, with the file's config and metadata."""

    system: AnomalySystem
    config: DictConfig
    path: Path
    metadata: dict[str, Any]


def _legacy_hint(path: Path) -> str:
    target = path.parent.parent if path.parent.name == LEGACY_CHECKPOINT.parent.name else path
    return (
        f"If you trust where it came from, convert it once: {CONVERT} {target} --trust "
        f"(writes {MODEL_FILE.name} beside it and deletes nothing); see docs/model-files.md."
    )


def resolve_model_path(source: str | Path) -> Path:
    """The model file of a run folder, or ``source`` itself when it is a file."""
    path = Path(source).expanduser()
    if path.is_dir():
        model = path / MODEL_FILE
        if model.is_file():
            return model
        if (path / LEGACY_CHECKPOINT).is_file():
            raise ModelFileError(
                f"{path} holds only {LEGACY_CHECKPOINT}, a pickle-based checkpoint of an older "
                f"defectlab that is no longer loaded (unpickling can run code). "
                + _legacy_hint(path / LEGACY_CHECKPOINT)
            )
        raise ModelFileError(
            f"no trained model in {path}: expected {MODEL_FILE}; point run_dir= at a folder "
            "written by train.py"
        )
    if not path.is_file():
        raise ModelFileError(
            f"no model file at {path}: give a train.py run folder or its {MODEL_FILE}"
        )
    return path


def run_folder(model_path: Path) -> Path:
    """The run folder a model file belongs to (``<run>/checkpoints/model.safetensors``)."""
    return (
        model_path.parent.parent
        if model_path.parent.name == MODEL_FILE.parent.name
        else model_path.parent
    )


def locate_model(run_dir: str | None, model_path: str | None) -> tuple[Path, Path | None]:
    """``(model file, the run's results.json or None)`` from exactly one of the two settings."""
    if (run_dir is None) == (model_path is None):
        raise ConfigError(
            f"give exactly one of run_dir=<train run folder> or model_path=<{MODEL_FILE.name}>"
        )
    path = resolve_model_path(run_dir if run_dir is not None else model_path)
    reference = run_folder(path) / "results.json"
    return path, reference if reference.is_file() else None


# -- writing ---------------------------------------------------------------------------------
def _json_safe(value: Any, key: str) -> Any:
    """``value`` if JSON can hold it exactly (non-tensor module state, e.g. a normalisation name)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_safe(v, key) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_safe(v, key) for k, v in value.items()}
    raise ModelFileError(f"state entry {key} is a {type(value).__name__}: not storable as data")


def _split_state(system: AnomalySystem) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors to store (frozen pretrained backbone weights left out) and non-tensor extra state."""
    frozen = set(frozen_weight_keys(system))
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    seen: set[int] = set()
    for key, value in system.state_dict().items():
        if key in frozen:
            continue
        if not isinstance(value, torch.Tensor):
            extra[key] = _json_safe(value, key)
            continue
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage()
        # safetensors refuses tensors that share or only view a storage: store a copy of those.
        if tensor.numel() and (storage.data_ptr() in seen or storage.nbytes() != tensor.nbytes):
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    return tensors, extra


def _backbones(system: AnomalySystem) -> list[dict[str, Any]]:
    """Identity and weight checksum of every FeatureExtractor in the system, by module path."""
    return [
        {
            "module": name,
            "alias": module.alias,
            "arch": module.name,
            "layers": list(module.layers),
            "pretrained": module.pretrained,
            "weights": module.weights,
            "origin": module.weights_origin,
            "stored_in_file": not module.frozen,
            "mean": module.mean.flatten().tolist(),
            "std": module.std.flatten().tolist(),
            "sha256": module.weights_sha256(),
        }
        for name, module in system.named_modules()
        if isinstance(module, FeatureExtractor)
    ]


def _declared_keys(system: AnomalySystem, protocol: type, attribute: str) -> set[str]:
    keys = set()
    for name, module in system.named_modules():
        if isinstance(module, protocol):
            keys.update(f"{name}.{b}" if name else b for b in getattr(module, attribute))
    return keys


def resizable_keys(system: AnomalySystem) -> set[str]:
    """State keys whose first dimension may differ from a fresh model's (ResizableBuffers)."""
    return _declared_keys(system, ResizableBuffers, "resizable_buffers")


def derived_keys(system: AnomalySystem) -> set[str]:
    """State keys a file may lack: the module computes them on load (DerivedBuffers)."""
    return _declared_keys(system, DerivedBuffers, "derived_buffers")


def save_model(
    system: AnomalySystem,
    config: dict[str, Any],
    path: str | Path,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``system`` and its run ``config`` as a model file (atomically); returns the metadata.

    Args:
        system: the fitted and calibrated system.
        config: the portable run config (``jobs.run_folder.config_snapshot``), stored as it is.
        path: target file, usually ``<run>/checkpoints/model.safetensors``.
        extra: more metadata entries (e.g. the epoch of a trained model's weights).
    """
    tensors, extra_state = _split_state(system)
    resolved = OmegaConf.create(config)

    def value(key: str) -> Any:
        try:
            return OmegaConf.select(resolved, key)
        except Exception:  # an interpolation that needs Hydra's runtime: informational only
            return None

    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "defectlab_version": defectlab.__version__,
        "torch_version": torch.__version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "model": {
            "name": config.get("model_name"),
            "class": f"{type(system.model).__module__}.{type(system.model).__qualname__}",
            "system": type(system).__name__,
        },
        "backbones": _backbones(system),
        "preprocessing": {
            "decode": "RGB, 8 bit per channel, EXIF orientation applied",
            "resize": [value("data.image_size")] * 2,
            "resize_mode": "bilinear, antialiased",
            "crop": value("data.crop_size"),
            "scale": "1/255 to [0, 1]; each backbone then applies its own mean/std",
            # None: as decoded; a value: each image scaled to that mean (data.brightness)
            "brightness": value("data.brightness"),
        },
        "thresholds": system.calibration.as_dict(),
        "tensors": {
            "count": len(tensors),
            "resizable": sorted(resizable_keys(system) & tensors.keys()),
        },
        "extra_state": extra_state,
        "config": config,
        **(extra or {}),
    }
    header = {METADATA_KEY: json.dumps(metadata)}
    with atomic_target(path) as tmp:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return metadata


# -- reading ---------------------------------------------------------------------------------
def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON document of a model file, after checking what kind of file it is and its version.

    Reads only the header: no tensor is loaded, nothing is unpickled or built.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    length = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if not (head[8:9] == b"{" and 2 <= length <= min(_MAX_HEADER, size - 8)):
        if head.startswith(_PICKLE_MAGIC):
            raise ModelFileError(
                f"{path} is a pickle-based file (a PyTorch/Lightning checkpoint): defectlab does "
                "not load it, because unpickling can run any code the file contains. "
                + _legacy_hint(path)
            )
        raise ModelFileError(
            f"{path} is not a defectlab model file (not safetensors). Point run_dir= at a "
            f"train.py run folder or model_path= at its {MODEL_FILE}."
        )
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ModelFileError(
            f"{path}: unreadable safetensors file ({err}); retrain or re-copy it"
        ) from err
    try:
        metadata = json.loads(header[METADATA_KEY])
    except (KeyError, ValueError):
        raise ModelFileError(
            f"{path} is a safetensors file without defectlab metadata (e.g. plain backbone "
            "weights): it is not a trained defectlab model."
        ) from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ModelFileError(f"{path}: metadata format is not {FORMAT!r}: not a defectlab model")
    version = metadata.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(
            f"{path} has model-file format version {version!r}, which this defectlab "
            f"{defectlab.__version__} does not know (it reads {list(SUPPORTED_VERSIONS)}; the file "
            f"was written by defectlab {metadata.get('defectlab_version')!r}). Install that "
            "defectlab version or newer to load it."
        )
    if not isinstance(metadata.get("config"), dict):
        raise ModelFileError(f"{path}: metadata has no run config: not written by train.py")
    return metadata


def _check_backbones(
    system: AnomalySystem, recorded: list[dict[str, Any]], path: Path, stored: bool
) -> None:
    """BackboneWeightsError unless each FeatureExtractor's weights hash to the recorded value.

    ``stored=False`` checks the frozen pretrained backbones rebuilt from the config (before the
    tensors are read), ``stored=True`` the random initialisations and fine-tuned weights loaded
    from the file.
    """
    built = {name: m for name, m in system.named_modules() if isinstance(m, FeatureExtractor)}
    by_module = {b.get("module"): b for b in recorded}
    if set(built) != set(by_module):
        raise ModelFileError(
            f"{path} records backbones at {sorted(by_module)} but its config builds "
            f"{sorted(built)}: the file is inconsistent; retrain the model."
        )
    for name, module in built.items():
        entry = by_module[name]
        if module.frozen == stored:
            continue
        found = module.weights_sha256()
        if found != entry.get("sha256"):
            raise BackboneWeightsError(
                f"{path}: backbone '{module.alias}' ({name}, timm '{module.name}') weights from "
                f"{module.weights_origin} have SHA-256 {found}, but the model was trained with "
                f"{entry.get('sha256')} (from {entry.get('origin')}). Its memory bank and "
                "thresholds only fit those weights: install the same weights (same package "
                "version or file) on this machine, or retrain the model here."
            )


def _check_tensors(
    system: AnomalySystem,
    tensors: dict[str, torch.Tensor],
    extra_state: dict[str, Any],
    path: Path,
) -> None:
    """ModelFileError unless names, dtypes and shapes fit the model the config builds."""
    frozen = set(frozen_weight_keys(system))
    expected = {k: v for k, v in system.state_dict().items() if k not in frozen}
    want = {k for k, v in expected.items() if isinstance(v, torch.Tensor)}
    want_extra = set(expected) - want
    # A derived buffer absent from an older file is computed by its module on load.
    missing = sorted(want - tensors.keys() - derived_keys(system))
    unexpected = sorted(tensors.keys() - want)
    if missing or unexpected:
        raise ModelFileError(
            f"{path} does not fit the model its config builds: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}. Retrain the model, or use the defectlab "
            "version that wrote it."
        )
    if set(extra_state) != want_extra:
        raise ModelFileError(
            f"{path}: extra state {sorted(extra_state)} does not fit the model's "
            f"{sorted(want_extra)}; retrain the model."
        )
    resizable = resizable_keys(system)
    for key in sorted(want & tensors.keys()):
        ref, got = expected[key], tensors[key]
        if got.dtype != ref.dtype:
            raise ModelFileError(
                f"{path}: tensor {key} has dtype {got.dtype}, the model needs {ref.dtype}; "
                "the file was altered or written by another model. Retrain the model."
            )
        fits = (
            got.dim() == ref.dim() and got.shape[1:] == ref.shape[1:]
            if key in resizable
            else got.shape == ref.shape
        )
        if not fits:
            shape = (
                f"(N, {', '.join(map(str, ref.shape[1:]))})"
                if key in resizable
                else tuple(ref.shape)
            )
            raise ModelFileError(
                f"{path}: tensor {key} has shape {tuple(got.shape)}, the model needs {shape}; "
                "the file was altered or written by another model. Retrain the model."
            )


def load_model(source: str | Path) -> LoadedModel:
    """Rebuild a trained system from a run folder or model file, on the CPU, in eval mode.

    Raises ModelFileError (pickle-based or unknown file, unknown format version, tensors that do
    not fit), ConfigError (a ``_target_`` outside defectlab) or BackboneWeightsError (backbone
    weights that differ from the training ones); nothing from the file is executed.
    """
    path = resolve_model_path(source)
    metadata = read_metadata(path)
    config = OmegaConf.create(metadata["config"])
    check_config_targets(config, str(path))  # before anything is instantiated
    system = build_run_system(config)
    recorded = metadata.get("backbones") or []
    _check_backbones(system, recorded, path, stored=False)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ModelFileError(f"{path}: tensors cannot be read ({err}); re-copy the file") from err
    extra_state = metadata.get("extra_state") or {}
    _check_tensors(system, tensors, extra_state, path)
    own = system.state_dict()
    # Frozen pretrained weights were left out of the file; the config rebuilt them (checked above).
    state = {**tensors, **extra_state, **{k: own[k] for k in frozen_weight_keys(system)}}
    system.load_state_dict(state, strict=True)
    _check_backbones(system, recorded, path, stored=True)
    system.eval()
    return LoadedModel(system, config, path, metadata)
