"""Configuration of the mesa backend: one frozen dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import textwrap
from collections.abc import Mapping
from typing import Any


class Stats(str, enum.Enum):
    """Where each group's range comes from."""

    DYNAMIC = "dynamic"  # computed from the tensor every step
    RUNNING = "running"  # Mesa's exponential moving average of each group's range


class Rounding(str, enum.Enum):
    NEAREST = "nearest"
    STOCHASTIC = "stochastic"  # unbiased: E[dequantize(quantize(x))] = x inside the range


class Inner(str, enum.Enum):
    """The compiler that receives the rewritten forward and backward graphs."""

    INDUCTOR = "inductor"
    EAGER = "eager"  # run the rewritten FX graphs as they are: for debugging


class Codec(str, enum.Enum):
    """How quantize/dequantize are emitted into the graphs (see ``actpass/emit.py``)."""

    AUTO = "auto"  # Inductor fuses them (aten ops) where it can: inner="inductor", dynamic stats, nearest rounding
    KERNELS = "kernels"  # always the C++/CUDA extension ops
    FUSED = "fused"  # aten ops wherever they apply, 16-bit tensors too (auto measures which dtypes gain; this forces)


_BITS = (2, 4, 8)


def _as_tuple(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"actpass: {name} must be a list of strings, got {value!r}") from None
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"actpass: {name} must hold non-empty strings, got {item!r}")
    return items


def option(default: Any, help: str, **cli: Any) -> Any:
    """A :class:`MesaConfig` field with its help text, which documents it in ``MesaConfig.__doc__`` and on the CLI.

    Args:
        default: the default value (immutable).
        help: one line for users: what the field does and its values.
        **cli: how ``actpass inspect`` spells the flag, when the field's name and type do not say it: ``flag``
            (default ``--field-name``), ``metavar``.

    Returns:
        A ``dataclasses.field``.
    """
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclasses.dataclass(frozen=True)
class MesaConfig:
    """Everything the mesa backend can be told. Defaults work for transformers with no config at all.

    Validated on construction: a bad value is a ``ValueError`` that names it. Choices may be given as strings
    (``MesaConfig(stats="running")``). ``torch.compile(model, backend="mesa", options={...})`` and the budgets
    file's ``[model.options]`` take the same fields; every field is also an ``actpass inspect`` flag.

    Example:
        >>> MesaConfig(bits=4, exclude=("head",)).to_dict()["bits"]
        4
    """

    bits: int = option(8, "code width of saved activations: 8, 4 or 2 (4 and 2 are packed, 2 or 4 codes per byte)")
    stats: Stats = option(
        Stats.DYNAMIC, "where each group's range comes from: 'dynamic' (this step's tensor) or 'running' (Mesa's EMA)"
    )
    rounding: Rounding = option(Rounding.NEAREST, "'nearest' or 'stochastic' (unbiased) rounding to codes")
    decay: float = option(0.9, "EMA decay of running ranges (Mesa uses 0.9); only with stats='running'")
    min_bytes: int = option(4096, "saved tensors smaller than this many bytes stay exact (quantizing saves ~nothing)")
    include: tuple[str, ...] = option(
        ("*",), "module-path globs whose saved tensors may be quantized ('' is the top level)", metavar="GLOB"
    )
    exclude: tuple[str, ...] = option(
        (), "module-path globs whose saved tensors stay exact, e.g. 'head'", metavar="GLOB"
    )
    include_ops: tuple[str, ...] = option(
        (), "producer-op globs that may be quantized (empty: all), e.g. 'gelu*'", flag="--include-op", metavar="GLOB"
    )
    exclude_ops: tuple[str, ...] = option(
        (), "producer-op globs that stay exact, e.g. 'div*'", flag="--exclude-op", metavar="GLOB"
    )
    overrides: tuple[tuple[str, int], ...] = option(
        (),
        "bits per tensor id: glob on the 'module:op#k' id shown by `actpass inspect` -> 8, 4, 2 or 0 (exact); "
        "the first match wins",
        flag="--override",
        metavar="GLOB=BITS",
    )
    inner: Inner = option(
        Inner.INDUCTOR,
        "compiler of the rewritten graphs: 'inductor', or 'eager' (the FX graphs as they are: debugging)",
    )
    quantize_outputs: bool = option(
        True,
        "also quantize saved tensors that are returned to the caller (LM logits): saves memory when the caller drops "
        "the output before backward (keeps just `.loss`, the usual loop); a loop that holds it gets an extra copy",
    )
    recompute: bool = option(
        True,
        "rebuild cheap elementwise results (LayerNorm affine outputs, GELU/SiLU outputs, casts of parameters) in "
        "backward from tensors stored anyway, instead of storing them",
    )
    rerun_attention: bool = option(
        True,
        "when a fused attention's q/k/v are stored lossy, backward re-runs its forward kernel on them for the output "
        "and log-sum-exp it needs, instead of the forward's (which no longer normalize the rebuilt scores)",
    )
    max_error: float = option(
        0.05,
        "bits=8: the one-step gradient error (relative L2) the error model may estimate per graph; above it, the "
        "storages whose 8-bit codes cost the most error per byte get float16 or stay exact. 'inf': 8 bits everywhere",
    )
    budget: int | float | None = option(
        None,
        "saved-activation budget: a byte count (int >= 1) or a fraction in (0, 1) of what the baseline partition "
        "saves; the planner then picks each tensor's precision by least estimated gradient error",
    )
    codec: Codec = option(
        Codec.AUTO,
        "how quantize/dequantize enter the graphs: 'auto' (aten ops Inductor fuses into its kernels, where they "
        "apply and measured faster), 'fused' (aten ops wherever they apply, 16-bit tensors too) or 'kernels' (the "
        "C++/CUDA extension ops everywhere)",
    )
    sensitivity: str | None = option(
        None,
        "a sensitivity table measured on this model (`actpass calibrate MODEL.py -o FILE`, a JSON path): the "
        "planner's error model uses it instead of the shipped suite-wide one",
        metavar="FILE",
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in _BITS:
            raise ValueError(f"actpass: bits must be one of {_BITS}, got {self.bits!r}")
        set_(self, "stats", _enum(Stats, "stats", self.stats))
        set_(self, "rounding", _enum(Rounding, "rounding", self.rounding))
        set_(self, "inner", _enum(Inner, "inner", self.inner))
        set_(self, "codec", _enum(Codec, "codec", self.codec))
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0.0 <= self.decay < 1.0:
            raise ValueError(f"actpass: decay must be a number in [0, 1), got {self.decay!r}")
        set_(self, "decay", float(self.decay))
        if isinstance(self.min_bytes, bool) or not isinstance(self.min_bytes, int) or self.min_bytes < 0:
            raise ValueError(f"actpass: min_bytes must be a non-negative integer, got {self.min_bytes!r}")
        if not isinstance(self.recompute, bool):
            raise ValueError(f"actpass: recompute must be true or false, got {self.recompute!r}")
        if isinstance(self.max_error, bool) or not isinstance(self.max_error, (int, float)) or not self.max_error > 0:
            raise ValueError(f"actpass: max_error must be a positive number (or inf), got {self.max_error!r}")
        set_(self, "max_error", float(self.max_error))
        set_(self, "budget", _budget(self.budget))
        if not isinstance(self.quantize_outputs, bool):
            raise ValueError(f"actpass: quantize_outputs must be true or false, got {self.quantize_outputs!r}")
        for name in ("include", "exclude", "include_ops", "exclude_ops"):
            set_(self, name, _as_tuple(name, getattr(self, name)))
        set_(self, "overrides", _overrides(self.overrides))
        if self.sensitivity is not None:
            if not isinstance(self.sensitivity, (str, os.PathLike)) or not str(self.sensitivity):
                raise ValueError(f"actpass: sensitivity must be the path of a table file, got {self.sensitivity!r}")
            from actpass import sensitivity

            set_(self, "sensitivity", os.fspath(self.sensitivity))
            sensitivity.load(self.sensitivity)  # a missing or malformed table fails here, not at the first compile

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-friendly values; ``MesaConfig.from_dict(c.to_dict()) == c``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, enum.Enum):
                v = v.value
            elif f.name == "overrides":
                v = dict(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MesaConfig:
        """Build from ``torch.compile(..., options=d)`` or a budgets file; unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise ValueError(f"actpass: options must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            known = ", ".join(sorted(names))
            near = [m for u in unknown for m in difflib.get_close_matches(str(u), names, n=1)]
            hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
            raise ValueError(f"actpass: unknown option(s) {', '.join(map(repr, unknown))}{hint}; known: {known}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> MesaConfig:
        return dataclasses.replace(self, **changes)


def _budget(value: Any) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"actpass: budget must be a byte count (int >= 1) or a fraction in (0, 1), got {value!r}")
    if isinstance(value, float) and value >= 1.0:
        if not value.is_integer():
            raise ValueError(f"actpass: budget {value!r}: a fraction must be in (0, 1); a byte count must be whole")
        return int(value)
    return value


def _document_fields(cls: type) -> None:
    """Append a ``Fields:`` section, built from each field's help, to ``cls.__doc__``."""
    lines = ["", "    Fields:"]
    for f in dataclasses.fields(cls):
        default = f.default.value if isinstance(f.default, enum.Enum) else f.default
        text = f"{f.name} (default {default!r}): {f.metadata.get('help', '')}"
        lines += textwrap.wrap(text, 112, initial_indent=" " * 8, subsequent_indent=" " * 12)
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + "\n".join(lines) + "\n"


_document_fields(MesaConfig)


def _enum(kind: type[enum.Enum], name: str, value: Any) -> Any:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in kind)
        raise ValueError(f"actpass: {name} must be one of {allowed}, got {value!r}") from None


def _overrides(value: Any) -> tuple[tuple[str, int], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    try:
        pairs = list(items)
    except TypeError:
        raise ValueError(f"actpass: overrides must map tensor-id globs to bits, got {value!r}") from None
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"actpass: overrides must map tensor-id globs to bits, got {pair!r}")
        pattern, bits = pair
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"actpass: override pattern must be a non-empty string, got {pattern!r}")
        if isinstance(bits, bool) or bits not in (0, *_BITS):
            raise ValueError(f"actpass: override {pattern!r} bits must be 0 (exact) or one of {_BITS}, got {bits!r}")
        out.append((pattern, int(bits)))
    return tuple(out)
