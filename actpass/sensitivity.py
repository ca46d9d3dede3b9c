"""Per-role sensitivities: how much gradient error each kind of saved tensor adds per bit width.

The planner's error model. Quantizing storage ``i`` (role ``r``, layout ``k``, ``b`` bits) is expected to add
``e_i`` to the global relative gradient error ``||g_hat - g|| / ||g||`` of one training step, with

    e_i**2 = s[r, k, b] * n_i / N

where ``n_i`` is the storage's element count and ``N`` the graph's count of saved activation elements, and errors
of different storages add in quadrature (independent rounding errors). ``s[r, k, b]`` is measured by
``tools/measure_sensitivity.py``: for each model of the training suite, quantize only the storages of one role at
``b`` bits with layout ``k`` (everything else exact), measure the step's gradient error ``e_r`` against the same
partition kept exact, and take ``e_r**2 / (n_r / N)``; the table keeps the largest value over the models (a
conservative estimate). The numbers live in ``sensitivity.json`` next to this file, with the command and commit
that produced them.

Example:
    >>> from actpass.plan import Role
    >>> estimate(Role.QKV, "head", 8, share=0.1) > 0
    True
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

from actpass.plan import Role

DATA = Path(__file__).with_name("sensitivity.json")


@functools.cache
def table() -> dict[str, Any]:
    """The measured table (``sensitivity.json``): ``{"s": {role: {layout: {bits: s}}}, "default": {bits: s}, ...}``."""
    return json.loads(DATA.read_text())


def _lookup(by_role: dict[str, dict[str, float]], layout: str, bits: int) -> float | None:
    """``by_role[layout][bits]``, else the largest value of the role's other layouts at ``bits``, else None."""
    key = str(bits)
    if layout in by_role and key in by_role[layout]:
        return float(by_role[layout][key])
    values = [float(v[key]) for v in by_role.values() if key in v]
    return max(values) if values else None


def coefficient(role: Role, layout: str, bits: int) -> float:
    """``s[role, layout, bits]``; falls back to the role's other layouts, then to the table's default for ``bits``."""
    t = table()
    c = _lookup(t["s"].get(role.value, {}), layout, bits)
    return c if c is not None else float(t["default"][str(bits)])


def estimate_rebuilt(role: Role, layout: str, bits: int, share: float) -> float | None:
    """What storing a storage of ``role`` costs with the storages backward rebuilds from it (recomputed LayerNorm
    affine outputs from a normalized input, GELU/SiLU outputs from their input) replayed on its rounded values: the
    table's ``s_rebuilt``, measured that way. None where the table has no such entry for the role.

    NOTE: measured, not summed. Adding the rebuilt tensors' own stored-at-``bits`` sensitivities in quadrature (what
    the planner did before) underestimated it 2-3.5x: on HF ViT at initialisation, 4-bit normalized LayerNorm inputs
    cost 1.33% alone and 4.59% with the affine outputs rebuilt from them, 4-bit GELU inputs 1.33% and 3.21%.
    """
    if bits not in (2, 4, 8):
        return None
    c = _lookup(table().get("s_rebuilt", {}).get(role.value, {}), layout, bits)
    return None if c is None else math.sqrt(max(c, 0.0) * max(share, 0.0))


def estimate(role: Role, layout: str, bits: int | None, share: float) -> float:
    """Expected contribution to the global relative gradient error (see the module docstring).

    Lossless storage (1-bit packed bool masks, ``layout == "bits"``) and exact storage (``bits`` None) add none.
    """
    if bits is None or layout == "bits" or bits not in (2, 4, 8):
        return 0.0  # exact, bool masks (lossless) and float16 (estimated by the planner from the 8-bit value)
    return math.sqrt(max(coefficient(role, layout, bits), 0.0) * max(share, 0.0))
