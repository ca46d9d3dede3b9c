"""actpass: store activations saved for backward in low precision, as a torch.compile backend (``backend="mesa"``).

Names are imported lazily, so ``import actpass`` (and the CLI's input checks) stay cheap and never touch Inductor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "MesaBackend": "actpass.backend",
    "mesa": "actpass.backend",
    "recorded_backend": "actpass.backend",
    "Inner": "actpass.config",
    "MesaConfig": "actpass.config",
    "Rounding": "actpass.config",
    "Stats": "actpass.config",
    "Decision": "actpass.plan",
    "GraphPlan": "actpass.plan",
    "Layout": "actpass.plan",
    "Reason": "actpass.plan",
    "SavedTensor": "actpass.plan",
    "RunningStats": "actpass.state",
    "default_store": "actpass.state",
}
__all__ = [
    "Decision",
    "GraphPlan",
    "Inner",
    "Layout",
    "MesaBackend",
    "MesaConfig",
    "Reason",
    "Rounding",
    "RunningStats",
    "SavedTensor",
    "Stats",
    "default_store",
    "mesa",
    "recorded_backend",
]

if TYPE_CHECKING:
    from actpass.backend import MesaBackend, mesa, recorded_backend
    from actpass.config import Inner, MesaConfig, Rounding, Stats
    from actpass.plan import Decision, GraphPlan, Layout, Reason, SavedTensor
    from actpass.state import RunningStats, default_store


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'actpass' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
