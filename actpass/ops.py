"""The ``torch.ops.actpass`` operators, declared once.

* ``actpass::quantize(x, bits, gend, groups, stochastic, running?, decay) -> (q, scale, lo)``: the kernel op. The
  optional ``running`` ``[2, G]`` fp32 buffer is updated in place (Mesa's EMA of each group's range).
* ``actpass::dequantize(q, scale, lo, bits, gend, last_dim, dtype) -> Tensor``: contiguous, exact shape.
* ``actpass::pack_mask(x) -> q`` / ``actpass::unpack_mask(q, shape) -> x``: bool tensors (dropout and attention
  masks) stored as 1 bit per element, losslessly.
* ``actpass::copy(x) -> Tensor``: a contiguous copy that no compiler elides, for the leading rows of a split storage
  (``plan.Part``) where ``rewrite._Rewriter._copy_rows`` cannot use a transposed ``aten.clone``.
* ``actpass::quantize_saved(x, bits, gend, groups, stochastic, key, decay) -> (q, scale, lo)``: the op the pass
  inserts into forward graphs. ``key`` names a running-statistics entry in a :class:`actpass.state.RunningStats`
  store (empty: per-step statistics). Holding the key instead of the buffer keeps the state out of the graph's
  inputs: see ``state.py`` for why.

Semantics (grouping, rounding, packing, non-finite values) are specified in ``_reference.py``. The reference is
registered for ``CompositeExplicitAutograd``, so it serves every device; compiled kernels from ``csrc/`` register for
the ``CPU``/``CUDA`` keys and take precedence where they load (see ``_extension.py``).
"""

from __future__ import annotations

import torch

from actpass import _extension, _reference
from actpass import state as _state

_LIB = torch.library.Library("actpass", "DEF")  # noqa: TOR901 - this module owns the namespace
# NOTE: the kernels read x contiguously (x.contiguous() first). Without a stride tag Inductor may hand them a strided
# view of its own buffer: it dropped a model's clone of k^T whose only other reader was a bmm, so quantize_saved
# cloned it again with aten::clone and the bmm did too (aten::contiguous inside aten::bmm, 1.2 ms of a 40 ms bf16 HF
# ViT step, torch.profiler). With the tag Inductor materializes the input contiguously, in its own kernel.
_CONTIGUOUS = tuple(
    getattr(torch.Tag, t)
    for t in ("needs_contiguous_strides", "needs_exact_strides", "needs_fixed_stride_order")
    if hasattr(torch.Tag, t)
)[:1]
_LIB.define(
    "quantize(Tensor x, int bits, int gend, int groups, bool stochastic, Tensor(a!)? running, float decay)"
    " -> (Tensor, Tensor, Tensor)",
    tags=_CONTIGUOUS,
)
_LIB.define(
    "dequantize(Tensor q, Tensor scale, Tensor lo, int bits, int gend, SymInt last_dim, ScalarType dtype) -> Tensor"
)
_LIB.define(
    "quantize_saved(Tensor x, int bits, int gend, int groups, bool stochastic, str key, float decay)"
    " -> (Tensor, Tensor, Tensor)",
    tags=_CONTIGUOUS,
)
_LIB.define("pack_mask(Tensor x) -> Tensor")
_LIB.define("unpack_mask(Tensor q, SymInt[] shape) -> Tensor")
_LIB.define("copy(Tensor x) -> Tensor")


def _quantize_ref(x, bits, gend, groups, stochastic, running, decay):
    if _extension.load_once():
        # The compiled kernels registered themselves for this device: dispatch again to reach them.
        if _extension.has_kernel(x.device.type):
            return torch.ops.actpass.quantize.default(x, bits, gend, groups, stochastic, running, decay)
    return _reference.quantize(x, bits, gend, groups, stochastic, running, decay)


def _dequantize_ref(q, scale, lo, bits, gend, last_dim, dtype):
    if _extension.load_once() and _extension.has_kernel(q.device.type):
        return torch.ops.actpass.dequantize.default(q, scale, lo, bits, gend, last_dim, dtype)
    return _reference.dequantize(q, scale, lo, bits, gend, last_dim, dtype)


def _quantize_saved_impl(x, bits, gend, groups, stochastic, key, decay):
    running = None
    if key:
        running = _state.lookup(key, _reference.num_groups(x.shape, gend, groups), x.device)
    return torch.ops.actpass.quantize.default(x, bits, gend, groups, stochastic, running, decay)


_LIB.impl("pack_mask", _reference.pack_mask, "CompositeExplicitAutograd")
_LIB.impl("unpack_mask", _reference.unpack_mask, "CompositeExplicitAutograd")
_LIB.impl("quantize", _quantize_ref, "CompositeExplicitAutograd")
_LIB.impl("dequantize", _dequantize_ref, "CompositeExplicitAutograd")
_LIB.impl("quantize_saved", _quantize_saved_impl, "CompositeExplicitAutograd")


def _quantize_fake(x, bits, gend, groups, stochastic, running, decay):
    _reference.check_args(x, bits, gend, groups)
    g = _reference.num_groups(x.shape, gend, groups)
    q = x.new_empty(_reference.packed_shape(x.shape, bits), dtype=torch.uint8)
    return q, x.new_empty((g,), dtype=torch.float32), x.new_empty((g,), dtype=torch.float32)


def _quantize_saved_fake(x, bits, gend, groups, stochastic, key, decay):
    return _quantize_fake(x, bits, gend, groups, stochastic, None, decay)


def _dequantize_fake(q, scale, lo, bits, gend, last_dim, dtype):
    shape = list(q.shape) if bits == 8 else [*q.shape[:-1], last_dim]
    return q.new_empty(shape, dtype=dtype)


def _pack_mask_fake(x):
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


def _unpack_mask_fake(q, shape):
    return q.new_empty(shape, dtype=torch.bool)


def _copy(x):
    return x.clone(memory_format=torch.contiguous_format)


_LIB.impl("copy", _copy, "CompositeExplicitAutograd")
torch.library.register_fake("actpass::copy", _copy, lib=_LIB)
torch.library.register_fake("actpass::pack_mask", _pack_mask_fake, lib=_LIB)
torch.library.register_fake("actpass::unpack_mask", _unpack_mask_fake, lib=_LIB)
torch.library.register_fake("actpass::quantize", _quantize_fake, lib=_LIB)
torch.library.register_fake("actpass::quantize_saved", _quantize_saved_fake, lib=_LIB)
torch.library.register_fake("actpass::dequantize", _dequantize_fake, lib=_LIB)


def quantize(
    x: torch.Tensor,
    bits: int = 8,
    gend: int | None = None,
    groups: int = -1,
    stochastic: bool = False,
    running: torch.Tensor | None = None,
    decay: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` into ``bits``-bit codes with per-group statistics.

    Args:
        x: float32/bfloat16/float16 tensor, any strides (read in logical order).
        bits: 8, 4 or 2. 4- and 2-bit codes are packed along the last dimension.
        gend: dims ``[gend:]`` form one run; default ``x.dim() - 1`` (per-row statistics).
        groups: ``-1`` for one group per leading index, else runs are folded modulo ``groups``.
        stochastic: stochastic rounding (unbiased) instead of round-to-nearest.
        running: optional ``[2, G]`` fp32 EMA buffer, updated in place.
        decay: EMA decay for ``running``.

    Returns:
        ``(q, scale, lo)``: uint8 codes, per-group fp32 step and low end.

    Example:
        >>> q, s, lo = quantize(torch.randn(2, 4, 8, 16), bits=8, gend=2)
        >>> dequantize(q, s, lo, bits=8, gend=2, last_dim=16, dtype=torch.float32).shape
        torch.Size([2, 4, 8, 16])
    """
    gend = x.dim() - 1 if gend is None else gend
    return torch.ops.actpass.quantize(x, bits, gend, groups, stochastic, running, decay)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int, gend: int, last_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize`: a contiguous ``dtype`` tensor of the original shape."""
    return torch.ops.actpass.dequantize(q, scale, lo, bits, gend, last_dim, dtype)
