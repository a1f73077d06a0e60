"""Which ``_target_`` a config read from a model file may name, checked before anything is built.

A stored config is data from wherever the model file came from; ``hydra.utils.instantiate`` would
import and call whatever its ``_target_`` keys name (``os.system``, ``builtins.eval``, ...). Every
``_target_`` must therefore be a class defined in defectlab, one of defectlab's few model factories
(:data:`DEFECTLAB_FACTORIES`), or one of the few library classes the project's own configs use
(conf/: Lightning's Trainer and loggers, torch optimisers as partials). Functions are not allowed
in general: ``defectlab.results.write_json_atomic`` would write a file. The check imports nothing
outside these packages: a name's prefix is checked before it is imported.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig

from defectlab.errors import ConfigError

OWN_PACKAGE = "defectlab"
# name prefix -> (module the class must be defined under, base class it must subclass)
LIBRARY_CLASSES = {
    "torch.optim.": ("torch.optim", "torch.optim.Optimizer"),
    "lightning.pytorch.loggers.": ("lightning.pytorch.loggers", "lightning.pytorch.loggers.Logger"),
    "lightning.pytorch.callbacks.": (
        "lightning.pytorch.callbacks",
        "lightning.pytorch.callbacks.Callback",
    ),
}
LIBRARY_EXACT = {"lightning.pytorch.Trainer", "lightning.Trainer"}
# defectlab functions a config may name (by where they are defined): they only build models.
DEFECTLAB_FACTORIES = {"defectlab.models.ensemble.build_patchcore"}
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
MAX_DEPTH = 64  # a config nests a few levels; deeper means a self-referencing interpolation


def _locate(name: str) -> Any:
    """The object a dotted name points to: the longest importable module, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def _defined_under(obj: Any, package: str) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module == package or module.startswith(package + ".")


def check_target(target: Any, key: str, source: str) -> None:
    """ConfigError unless ``target`` names an allowed class (see the module docstring)."""
    allowed = (
        f"{OWN_PACKAGE}.* classes, {sorted(DEFECTLAB_FACTORIES)}, {sorted(LIBRARY_EXACT)}, or "
        f"subclasses under {sorted(LIBRARY_CLASSES)}"
    )

    def refuse(why: str) -> ConfigError:
        return ConfigError(
            f"{source}: config key {key}={target!r} {why}. A model file's config may only name "
            f"{allowed}; nothing was built or run. Do not use this file unless you know where it "
            "came from; retrain the model with defectlab's own configs."
        )

    if not isinstance(target, str) or not _DOTTED.fullmatch(target):
        raise refuse("is not a dotted class name")
    library = next((p for p in LIBRARY_CLASSES if target.startswith(p)), None)
    if not (target.startswith(OWN_PACKAGE + ".") or library or target in LIBRARY_EXACT):
        raise refuse("is outside defectlab and the allowed library classes")
    try:
        obj = _locate(target)
    except (ImportError, AttributeError) as err:
        raise refuse(f"does not exist ({type(err).__name__})") from None
    if (
        f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        in DEFECTLAB_FACTORIES
    ):
        return
    if not inspect.isclass(obj):
        raise refuse("is not a class")
    if target in LIBRARY_EXACT:
        if not _defined_under(obj, "lightning.pytorch"):
            raise refuse("is not Lightning's Trainer")
        return
    if library is None:
        # e.g. defectlab.jobs.train.Path or defectlab.build.instantiate resolve outside defectlab.
        if not _defined_under(obj, OWN_PACKAGE):
            raise refuse(f"resolves to {obj.__module__}.{obj.__qualname__}, outside defectlab")
        return
    package, base = LIBRARY_CLASSES[library]
    if not (_defined_under(obj, package) and issubclass(obj, _locate(base))):
        raise refuse(f"is not a {base} defined under {package}")


def _walk(node: Any, path: str, depth: int, seen: set[int]) -> Iterator[tuple[str, Any]]:
    if depth > MAX_DEPTH:
        raise ConfigError(
            f"config nests deeper than {MAX_DEPTH} levels at {path}: a self-referencing "
            "interpolation? Refusing to load it."
        )
    if id(node) in seen:  # an interpolation pointing at a node already checked
        return
    seen.add(id(node))
    keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        child = f"{path}.{key}" if path else str(key)
        try:
            value = node[key]  # resolves interpolations, as instantiate will
        except Exception:  # unresolvable here: instantiate cannot get a target out of it either
            continue
        if key == "_target_":
            yield child, value
        if isinstance(value, DictConfig | ListConfig):
            yield from _walk(value, child, depth + 1, seen)


def check_config_targets(cfg: DictConfig, source: str) -> int:
    """Check every ``_target_`` of ``cfg``, nested nodes and lists included; returns their count.

    Interpolations are resolved in the current context, as instantiation will resolve them, so a
    target hidden behind ``${...}`` or built by a resolver is checked too.
    """
    count = 0
    for key, target in _walk(cfg, "", 0, set()):
        check_target(target, key, source)
        count += 1
    return count
