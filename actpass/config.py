"""Configuration of the mesa backend: one frozen dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
import enum
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


@dataclasses.dataclass(frozen=True)
class MesaConfig:
    """Everything the mesa backend can be told. Defaults work for transformers with no config at all.

    Example:
        >>> MesaConfig(bits=4, exclude=("head",)).to_dict()["bits"]
        4
    """

    bits: int = 8  # code width for saved activations: 8, 4 or 2 (4 and 2 are packed)
    stats: Stats = Stats.DYNAMIC  # per-step ranges, or Mesa's running (EMA) ranges
    rounding: Rounding = Rounding.NEAREST  # round-to-nearest, or stochastic rounding
    decay: float = 0.9  # EMA decay of running ranges (Mesa uses 0.9)
    min_bytes: int = 4096  # saved tensors smaller than this stay exact (quantizing them saves ~nothing)
    include: tuple[str, ...] = ("*",)  # module-path globs whose saved tensors may be quantized ("" = top level)
    exclude: tuple[str, ...] = ()  # module-path globs whose saved tensors stay exact
    include_ops: tuple[str, ...] = ()  # producer op globs that may be quantized (empty: all), e.g. "gelu*"
    exclude_ops: tuple[str, ...] = ()  # producer op globs that stay exact, e.g. "_log_softmax"
    overrides: tuple[tuple[str, int], ...] = ()  # (glob on "module:op#k" id, bits or 0 for exact), first match wins
    inner: Inner = Inner.INDUCTOR  # compiler for the rewritten graphs
    quantize_outputs: bool = False  # also quantize saved tensors returned to the caller (LM logits): saves memory
    # only if the caller drops the output before backward (e.g. keeps just `.loss`); otherwise it adds a copy
    codec: Codec = Codec.AUTO  # "auto": aten ops fused by Inductor where possible; "kernels": always the extension ops

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
        if not isinstance(self.quantize_outputs, bool):
            raise ValueError(f"actpass: quantize_outputs must be true or false, got {self.quantize_outputs!r}")
        for name in ("include", "exclude", "include_ops", "exclude_ops"):
            set_(self, name, _as_tuple(name, getattr(self, name)))
        set_(self, "overrides", _overrides(self.overrides))

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
            raise ValueError(f"actpass: unknown option(s) {', '.join(map(repr, unknown))}; known: {known}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> MesaConfig:
        return dataclasses.replace(self, **changes)


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
