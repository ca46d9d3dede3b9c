"""Pure-PyTorch reference for the quantize/dequantize kernels.

This module is the specification. It is the fallback on every device with no compiled kernel, and the oracle the
tests compare the C++/CUDA kernels against (bit for bit with nearest rounding).

Grouping. ``x`` is read in its logical (row-major) order. ``R = prod(shape[gend:])`` consecutive elements form a run,
and run ``j`` belongs to statistics group ``j % G``. ``G`` is ``prod(shape[:gend])`` when ``groups == -1`` (every
leading index is its own group), else ``groups`` (runs are folded modulo ``groups``). So, for example:

=========================  ========  =========  ===========================
tensor                     gend      groups     groups are
=========================  ========  =========  ===========================
``[B, H, N, D]``           2         -1         one per (batch, head)
``[B, H, N, D]``           2         H          one per head, shared by the batch
``[B*H, N, D]`` (bmm view) 1         H          one per head, shared by the batch
``[B, N, C]``              3         C          one per channel
``[M, K]``                 1         -1         one per row
=========================  ========  =========  ===========================

Codes. With ``lo``/``hi`` the group's range and ``L = 2**bits - 1`` levels: ``scale = (hi - lo) / L``,
``inv = 1 / scale`` (0 when ``scale == 0``), ``v = (x - lo) * inv``; nearest rounding takes ``floor(v + 0.5)``,
stochastic rounding ``floor(v + u)`` with ``u ~ U[0, 1)``; NaN codes become 0 and codes are clamped to ``[0, L]``
(never wrapped); finally, in a group whose ``lo`` is exactly 0, a value above 0 that got code 0 gets code 1
(zero-preserving: ReLU's backward reads only ``saved > 0``, and ReLU outputs have ``lo == 0``; this biases such
groups' lowest step upward, the only place stochastic rounding is not unbiased). All arithmetic is fp32.
Dequantize computes ``code * scale + lo`` in fp32 (a multiply, then an add:
no fused multiply-add, so kernels stay bit-identical), then casts to the output dtype.

Packing. 8-bit codes keep ``x``'s shape. 4- and 2-bit codes are packed along the last dimension, ``8 // bits``
codes per byte, first code in the lowest bits; the last dimension becomes ``ceil(L_last * bits / 8)`` bytes and the
padding codes are 0.

Non-finite values. A group's range is computed with NaN propagation, so a group holding NaN or Inf dequantizes to
non-finite values, as eager would propagate them into the gradient. Running statistics are never updated from a
non-finite range (that group then uses its own range for this step).

Running statistics (``running`` is ``[2, G]`` fp32: row 0 the low, row 1 the high end; NaN means "not seen yet"):
``running = decay * running + (1 - decay) * current`` (or ``current`` on first sight), updated in place, and the
codes use the updated range, clamping whatever falls outside it.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 4, 8)


def num_groups(shape: tuple[int, ...] | torch.Size, gend: int, groups: int) -> int:
    """Number of statistics groups for a tensor of ``shape`` (see the module docstring)."""
    return math.prod(shape[:gend]) if groups == -1 else groups


def packed_last_dim(last: int, bits: int) -> int:
    """Bytes along the last dimension once ``last`` codes of ``bits`` bits are packed."""
    per = 8 // bits
    return (last + per - 1) // per


def packed_shape(shape: tuple[int, ...] | torch.Size, bits: int) -> list[int]:
    shape = list(shape)
    if bits == 8 or not shape:
        return shape
    return [*shape[:-1], packed_last_dim(shape[-1], bits)]


def check_args(x: torch.Tensor, bits: int, gend: int, groups: int) -> None:
    torch._check(bits in SUPPORTED_BITS, lambda: f"actpass: bits must be one of {SUPPORTED_BITS}, got {bits}")
    torch._check(x.dim() >= 1, lambda: "actpass: cannot quantize a 0-d tensor")
    torch._check(0 <= gend <= x.dim(), lambda: f"actpass: gend={gend} out of range for a {x.dim()}-d tensor")
    torch._check(groups == -1 or groups >= 1, lambda: f"actpass: groups must be -1 or positive, got {groups}")
    torch._check(
        x.dtype in (torch.float32, torch.bfloat16, torch.float16),
        lambda: f"actpass: unsupported dtype {x.dtype} (float32, bfloat16, float16 are supported)",
    )


def _as_runs(x: torch.Tensor, gend: int, groups: int) -> tuple[torch.Tensor, int]:
    """View ``x`` (fp32, contiguous) as ``[A, G, R]``."""
    g = num_groups(x.shape, gend, groups)
    r = math.prod(x.shape[gend:])
    return x.reshape(-1, g, r), g


def group_range(x: torch.Tensor, gend: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (low, high) of ``x`` in fp32, NaN-propagating. Empty groups give (0, 0)."""
    xf = x.detach().contiguous().float()
    g = num_groups(x.shape, gend, groups)
    if xf.numel() == 0:
        z = torch.zeros(g, dtype=torch.float32, device=x.device)
        return z, z.clone()
    runs, g = _as_runs(xf, gend, groups)
    runs = runs.transpose(0, 1).reshape(g, -1)
    lo, hi = torch.aminmax(runs, dim=1)
    # aminmax ignores NaN on some backends; make NaN propagation explicit.
    has_nan = torch.isnan(runs).any(dim=1)
    nan = torch.full_like(lo, float("nan"))
    return torch.where(has_nan, nan, lo), torch.where(has_nan, nan, hi)


def update_running(
    running: torch.Tensor, cur_lo: torch.Tensor, cur_hi: torch.Tensor, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """EMA update of ``running`` in place; returns the range to quantize with."""
    finite = torch.isfinite(cur_lo) & torch.isfinite(cur_hi)
    seen = ~torch.isnan(running[0])
    new_lo = torch.where(seen, decay * running[0] + (1.0 - decay) * cur_lo, cur_lo)
    new_hi = torch.where(seen, decay * running[1] + (1.0 - decay) * cur_hi, cur_hi)
    running[0].copy_(torch.where(finite, new_lo, running[0]))
    running[1].copy_(torch.where(finite, new_hi, running[1]))
    return torch.where(finite, running[0], cur_lo), torch.where(finite, running[1], cur_hi)


def scale_of(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    # NOTE: divide by a tensor, not a Python number: on CUDA, ``t / python_float`` is computed as ``t * (1 / float)``,
    # which differs from the true quotient in the last bit for ~70% of inputs and would make the spec device-dependent.
    return (hi - lo) / torch.full_like(hi, float(2**bits - 1))


def codes(
    x: torch.Tensor,
    lo: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    gend: int,
    groups: int,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Integer codes (uint8, unpacked, shape of ``x``) for the given per-group range."""
    levels = float(2**bits - 1)
    xf = x.detach().contiguous().float()
    if xf.numel() == 0:
        return torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    runs, g = _as_runs(xf, gend, groups)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    v = (runs - lo.view(1, g, 1)) * inv.view(1, g, 1)
    if noise is None:
        c = torch.floor(v + 0.5)
    else:
        c = torch.floor(v + noise.reshape(runs.shape))
    c = torch.where(torch.isnan(c), torch.zeros_like(c), c).clamp_(0.0, levels)
    # Zero-preserving: where a group's low end is exactly 0, a value above it never gets code 0 (ReLU masks).
    zero_lo = (lo == 0).view(1, g, 1)
    c = torch.where((c < 1.0) & (runs > lo.view(1, g, 1)) & zero_lo, torch.ones_like(c), c)
    return c.to(torch.uint8).reshape(x.shape)


def pack(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes along the last dimension, ``8 // bits`` per byte, first code in the low bits."""
    if bits == 8:
        return c
    per = 8 // bits
    last = c.shape[-1]
    padded = packed_last_dim(last, bits) * per
    if padded != last:
        c = torch.nn.functional.pad(c, (0, padded - last))
    c = c.reshape(*c.shape[:-1], padded // per, per).to(torch.int32)
    shifts = torch.arange(per, device=c.device, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack(q: torch.Tensor, bits: int, last: int) -> torch.Tensor:
    if bits == 8:
        return q
    per = 8 // bits
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    c = (q.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return c.reshape(*q.shape[:-1], q.shape[-1] * per)[..., :last].to(torch.uint8)


def quantize(
    x: torch.Tensor,
    bits: int,
    gend: int,
    groups: int,
    stochastic: bool,
    running: torch.Tensor | None,
    decay: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference quantize. Returns ``(q, scale, lo)``; updates ``running`` in place when given."""
    check_args(x, bits, gend, groups)
    lo, hi = group_range(x, gend, groups)
    if running is not None and x.numel() > 0:
        lo, hi = update_running(running, lo, hi, decay)
    scale = scale_of(lo, hi, bits)
    noise = torch.rand(x.shape, device=x.device, dtype=torch.float32) if stochastic and x.numel() else None
    c = codes(x, lo, scale, bits, gend, groups, noise)
    return pack(c, bits), scale, lo.clone()


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int, gend: int, last_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Reference dequantize: ``code * scale + lo`` in fp32, cast to ``dtype``, contiguous."""
    c = unpack(q, bits, last_dim)
    out_shape = c.shape
    if c.numel() == 0:
        return torch.empty(out_shape, dtype=dtype, device=q.device)
    g = scale.numel()
    runs = c.reshape(-1, g, math.prod(out_shape[gend:])).float()
    y = runs * scale.view(1, g, 1)
    y = y + lo.view(1, g, 1)
    return y.to(dtype).reshape(out_shape)


def pack_mask(x: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bits: element ``i`` (logical order) is bit ``i % 8`` of byte ``i // 8``, ``[ceil(n / 8)]``."""
    flat = x.detach().reshape(-1).to(torch.uint8)
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    shifts = torch.arange(8, device=x.device, dtype=torch.uint8)
    return (flat.view(-1, 8) << shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_mask(q: torch.Tensor, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a contiguous bool tensor of ``shape``."""
    n = math.prod(shape)
    shifts = torch.arange(8, device=q.device, dtype=torch.uint8)
    bits = (q.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(-1)[:n].to(torch.bool).reshape(shape)
