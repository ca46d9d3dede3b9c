"""actpass: train with less activation memory. The ``torch.compile`` backend ``"mesa"`` stores the activations that
forward saves for backward as 8-bit (or packed 4/2-bit) integer codes, dequantized right before backward needs them
(Mesa, Pan et al. 2021). Forward stays exact; the model is not edited.

    model = torch.compile(model, backend="mesa")                       # after pip install; no import needed
    model = torch.compile(model, backend="mesa", options={"bits": 4})  # options: any MesaConfig field
    backend = actpass.mesa(bits=4, exclude=["head"])                   # or a backend object you keep:
    model = torch.compile(model, backend=backend)                      # backend.plans says what was stored how

Public API: ``mesa(config=None, **options)`` builds a ``MesaBackend``; ``MesaConfig`` holds every option (its help
lists them); ``MesaBackend.plans`` has one ``GraphPlan`` of ``SavedTensor`` records per compiled graph;
``recorded_backend(options)`` is the backend ``backend="mesa"`` used; ``RunningStats`` and ``default_store()`` hold
the running statistics of ``stats="running"`` (checkpoint them). Also importable: ``GraphPlan``, ``SavedTensor``,
``Decision``, ``Reason``, ``Layout``, and MesaConfig's choices ``Stats``, ``Rounding``, ``Inner`` (strings work too).

Command line: ``actpass inspect MODEL.py`` (every saved tensor: decision, reason, measured bytes), ``actpass check``
(activation-memory budgets in CI).
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
# What `help(actpass)` documents and `import *` gives: the entry points. Every name of _EXPORTS is importable; the
# plan records, enums and RunningStats are left out so that `help(actpass)` stays one short page (each str enum
# alone would add ~450 lines of inherited str methods). The module docstring names them all.
__all__ = ["mesa", "MesaConfig", "MesaBackend", "recorded_backend", "default_store"]

if TYPE_CHECKING:  # `X as X`: re-exported for type checkers, though not all are in __all__
    from actpass.backend import MesaBackend as MesaBackend
    from actpass.backend import mesa as mesa
    from actpass.backend import recorded_backend as recorded_backend
    from actpass.config import Inner as Inner
    from actpass.config import MesaConfig as MesaConfig
    from actpass.config import Rounding as Rounding
    from actpass.config import Stats as Stats
    from actpass.plan import Decision as Decision
    from actpass.plan import GraphPlan as GraphPlan
    from actpass.plan import Layout as Layout
    from actpass.plan import Reason as Reason
    from actpass.plan import SavedTensor as SavedTensor
    from actpass.state import RunningStats as RunningStats
    from actpass.state import default_store as default_store


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'actpass' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
