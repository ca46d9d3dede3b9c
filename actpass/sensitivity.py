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
that produced them. A table measured on one model (``actpass calibrate``, :mod:`actpass.calibrate`) replaces it
where ``MesaConfig(sensitivity=path)`` names one: :func:`using` makes it the active table while a plan is made.

Example:
    >>> from actpass.plan import Role
    >>> estimate(Role.QKV, "head", 8, share=0.1) > 0
    True
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (no torch import: budgets files naming a table are validated without it)
    from actpass.plan import Role

DATA = Path(__file__).with_name("sensitivity.json")


_ACTIVE: list[dict[str, Any]] = []  # tables made active by using(), innermost last


class SensitivityTableError(ValueError):
    """A sensitivity table file that cannot be used; the message is one line meant for the user."""


@functools.cache
def shipped() -> dict[str, Any]:
    """The table shipped with the package (``sensitivity.json``)."""
    return json.loads(DATA.read_text())


def table() -> dict[str, Any]:
    """The active table: ``{"s": {role: {layout: {bits: s}}}, "default": {bits: s}, ...}``; the shipped one unless
    :func:`using` made a calibrated one active."""
    return _ACTIVE[-1] if _ACTIVE else shipped()


@contextlib.contextmanager
def using(source: str | os.PathLike[str] | Mapping[str, Any] | None) -> Iterator[None]:
    """Make ``source`` (a table, or the path of a table file) the active table inside the block; None: no change."""
    if source is None:
        yield
        return
    t = dict(source) if isinstance(source, Mapping) else load(source)
    _ACTIVE.append(t)
    try:
        yield
    finally:
        _ACTIVE.pop()


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A table file, validated; raises :class:`SensitivityTableError` with a one-line message. Cached per file
    version (path, size and modification time)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise SensitivityTableError(f"actpass: sensitivity table {str(path)!r}: {e.strerror or e}") from None
    return _load(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _load(path: str, _size: int, _mtime: int) -> dict[str, Any]:
    try:
        t = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise SensitivityTableError(f"actpass: sensitivity table {path!r}: cannot read it: {e}") from None
    except json.JSONDecodeError as e:
        raise SensitivityTableError(f"actpass: sensitivity table {path!r} is not JSON: {e}") from None
    problem = _invalid(t)
    if problem:
        raise SensitivityTableError(
            f"actpass: sensitivity table {path!r}: {problem} (write one with `actpass calibrate MODEL.py -o FILE`)"
        )
    return t


def _invalid(t: Any) -> str | None:
    """What makes ``t`` unusable as a table, or None."""
    if not isinstance(t, dict):
        return "not a JSON object"
    default = t.get("default")
    if not isinstance(default, dict) or any(not _number(default.get(str(b))) for b in (8, 4, 2)):
        return 'no "default" with a number for each of "8", "4", "2"'
    for field in ("s", "s_rebuilt"):
        by_role = t.get(field, {})
        if field == "s" and not isinstance(by_role, dict):
            return 'no "s" object'
        if not isinstance(by_role, dict):
            return f'"{field}" is not an object'
        for role, layouts in by_role.items():
            if not isinstance(layouts, dict) or not all(
                isinstance(v, dict) and all(_number(x) for x in v.values()) for v in layouts.values()
            ):
                return f'"{field}"."{role}" is not {{layout: {{bits: number}}}}'
    return None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def digest(path: str | os.PathLike[str] | None) -> str | None:
    """sha256 of a table file's contents (plans made with it are cached under it); None for the shipped table."""
    if path is None:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


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
