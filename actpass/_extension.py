"""Loading the compiled kernels from ``csrc/`` (placeholder until the extension lands: reference only)."""

from __future__ import annotations


def load_once() -> bool:
    """Try to load the compiled kernels once; True if they are loaded."""
    return False


def has_kernel(device_type: str) -> bool:
    """Whether a compiled kernel is registered for ``device_type``."""
    return False
