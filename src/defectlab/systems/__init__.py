"""Lightning systems: sequencing, logging and checkpoint state around the pure torch models."""

from torch import nn

from defectlab.systems.base import AnomalySystem
from defectlab.systems.memory_bank import MemoryBankSystem


def build_system(model: nn.Module, **kwargs) -> AnomalySystem:
    """Wrap ``model`` in the system its contract calls for (memory-bank models have ``fit``)."""
    if hasattr(model, "embed") and hasattr(model, "fit"):
        return MemoryBankSystem(model, **kwargs)
    raise TypeError(f"no Lightning system for {type(model).__name__}: it has no embed/fit contract")


__all__ = ["AnomalySystem", "MemoryBankSystem", "build_system"]
