"""actpass: store activations saved for backward in low precision, as a torch.compile backend."""

from actpass.backend import MesaBackend, mesa, recorded_backend
from actpass.config import Inner, MesaConfig, Rounding, Stats
from actpass.plan import Decision, GraphPlan, Layout, Reason, SavedTensor
from actpass.state import RunningStats, default_store

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
__version__ = "0.1.0"
