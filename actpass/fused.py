"""Quantize and dequantize as aten ops that Inductor fuses into the surrounding kernels.

The extension ops (``actpass::quantize_saved`` / ``actpass::dequantize``) are opaque to Inductor: each call re-reads
the activation from memory, runs as its own kernel and blocks fusion around it. Here the same math as
``_reference.py`` (nearest rounding, per-step statistics) is traced into aten ops with Inductor's decomposition
table and spliced into the partitioned forward/backward graphs in place of those calls, so that Inductor can:

* fold the group min/max into a reduction kernel next to (or fused with) the producer, and the code computation and
  packing into one pointwise kernel;
* inline dequantize (unpack, ``code * scale + lo``, cast) into the kernel that consumes the activation in backward
  (a pointwise or reduction consumer; before a matmul it is one pointwise kernel writing the operand).

Only for per-step statistics with nearest rounding: running statistics update a buffer in place (the extension op
does that inside its kernel) and stochastic rounding draws its own Philox stream. See :func:`eligible`.

Numerics. The traced ops are those of ``_reference.py`` (an fp32 subtract, multiply and add, ``floor``, a true
division for the scale); Inductor's CPU code is compiled with ``-ffp-contract=off`` and lowers ``a / b`` to a
division, so codes and values are bit-identical to the reference on CPU (``tests/test_fused.py`` checks this). On
CUDA, Triton may contract the multiply-add of dequantize into an FMA: values may then differ from the reference in
the last bit (never the codes, whose arithmetic is a subtract, a multiply and an add of 0.5 rounded by floor, where
an FMA of ``(x - lo) * inv + 0.5`` can move a value that lies within one rounding of a half-integer to the
neighbouring code; measured bound on GPU: not yet measured).
"""

from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.fx as fx

from actpass import _reference

aten = torch.ops.aten


# Runs up to this long are laid out as columns: statistics reduce over rows first (a column reduction Inductor
# vectorises along the row) and then fold R adjacent columns; codes use per-column parameters. Viewing a
# [rows, C/4, 4] channel-sharing tensor as it is made Inductor vectorise along its last dim of 4 (16-lane masked
# vectors, 4 lanes used): the GPT-2 MLP's backward kernel took 14.5 ms instead of ~1 ms.
_MAX_COLUMN_RUN = 16


def _layout(shape, gend: int, groups: int) -> tuple[int, int, int]:
    g = _reference.num_groups(shape, gend, groups)
    r = math.prod(shape[gend:])
    return math.prod(shape) // (g * r), g, r


def _per_column(v: torch.Tensor, g: int, r: int) -> torch.Tensor:
    """A per-group ``[G]`` vector as a per-column ``[1, G * R]`` one (each value repeated R times), materialised.

    NOTE: as a plain expand/reshape, Inductor inlines it as a load at index ``c // R``, which its CPU code cannot
    vectorise: the whole codes loop went scalar (2.7 ms for a [512, 256, 4] quantize against 0.1 ms). ``as_strided``
    is one of the ops whose input Inductor realises, so the loop reads a contiguous [G * R] buffer instead.
    """
    if r == 1:
        return v.view(1, g)
    if g == 1:
        # One group: a broadcast scalar. (The reshape below is then a view of the expand, not a copy, and as_strided
        # read R elements of a one-element buffer: garbage statistics in Inductor's code, tools/fuzz.py seed 181.)
        return v.view(1, 1).expand(1, r)
    e = v.view(g, 1).expand(g, r).reshape(1, g * r)
    return torch.as_strided(e, (1, g * r), (g * r, 1))


def _clamp_codes(c: torch.Tensor, levels: float) -> torch.Tensor:
    """NaN -> 0 and the clamp to [0, L], as comparisons (isnan does not vectorise in Inductor's CPU code)."""
    c = torch.where(c >= 0.0, c, torch.zeros_like(c))
    return torch.where(c <= levels, c, torch.full_like(c, levels))


def quantize_math(
    x: torch.Tensor, bits: int, gend: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_reference.quantize`` for nearest rounding and per-step statistics, written for tracing.

    Args:
        x: contiguous float tensor with static shape.
        bits, gend, groups: as ``actpass::quantize``.

    Returns:
        ``(q, scale, lo)``, bit for bit what the reference returns.
    """
    a, g, r = _layout(x.shape, gend, groups)
    levels = float(2**bits - 1)
    columns = r <= _MAX_COLUMN_RUN
    if columns:
        xs = x.float().reshape(a, g * r)
        # amin/amax propagate NaN (as the reference's explicit NaN check does); min/max do not depend on the order.
        lo = torch.amin(torch.amin(xs, dim=0).view(g, r), dim=1)
        hi = torch.amax(torch.amax(xs, dim=0).view(g, r), dim=1)
    else:
        xs = x.float().reshape(a, g, r)
        lo = torch.amin(xs, dim=(0, 2))
        hi = torch.amax(xs, dim=(0, 2))
    scale = (hi - lo) / torch.full_like(hi, levels)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    lo_b = _per_column(lo, g, r) if columns else lo.view(1, g, 1)
    inv_b = _per_column(inv, g, r) if columns else inv.view(1, g, 1)
    c = torch.floor((xs - lo_b) * inv_b + 0.5)
    c = _clamp_codes(c, levels)
    # Zero-preserving rule: c is an integer >= 0 here, so "code 0 becomes 1" is a max with the 0/1 condition.
    c = torch.maximum(c, ((xs > lo_b) & (lo_b == 0)).to(torch.float32))
    c = c.to(torch.uint8).reshape(x.shape)
    return _pack(c, bits), scale, lo


def _pack(c: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return c
    per = 8 // bits
    last = c.shape[-1]
    padded = _reference.packed_last_dim(last, bits) * per
    if padded != last:
        c = torch.nn.functional.pad(c, (0, padded - last))
    c = c.reshape(*c.shape[:-1], padded // per, per).to(torch.int32)
    out = c[..., 0]
    for k in range(1, per):  # an unrolled OR: a sum over a size-per dim would be a reduction
        out = out | (c[..., k] << (k * bits))
    return out.to(torch.uint8)


def dequantize_math(
    q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int, gend: int, last_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """``_reference.dequantize``, written for tracing: ``code * scale + lo`` in fp32, cast to ``dtype``."""
    c = _unpack(q, bits, last_dim)
    shape = c.shape
    a, g, r = _layout(shape, gend, -1 if scale.numel() == math.prod(shape[:gend]) else scale.numel())
    if r <= _MAX_COLUMN_RUN:
        y = c.reshape(a, g * r).float() * _per_column(scale, g, r)
        y = y + _per_column(lo, g, r)
    else:
        y = c.reshape(a, g, r).float() * scale.view(1, g, 1)
        y = y + lo.view(1, g, 1)
    return y.to(dtype).reshape(shape)


# --------------------------------------------------------------------------------- companded (square-root) codes
# NOTE: softmax probabilities of a trained model are mostly tiny with a few near 1, and uniform codes over a row's
# range round every probability under max/510 to zero. Codes of sqrt(x - row min) step finely near the minimum.
# Measured on the training suite after 150 exact steps (tools/probe_codes.py, tools/results/probe-codes-cpu.json),
# one-step gradient error with only the probabilities coded: HF GPT-2 8-bit uniform per row 191%, square-root 0.065%
# (bf16 casts: 0.089%); 4-bit 4173% vs 1.0%; HF BERT 8-bit 0.0195% vs 0.0035%, 4-bit 0.79% vs 0.076%. Same bytes:
# one code per element and a (scale, low end) pair per row. Signed tensors (scores, logits) measured worse with it.
# Numerics: no result depends on a sqrt. A first guess of each code uses one, then the code is corrected against the
# decision thresholds ((k - 0.5) / L)**2 * range, which are IEEE divisions and products; decoding is
# lo + (code / L)**2 * range. So the codes and values are the same in eager (inner="eager", the oracle) and in
# Inductor's code: computing the scale from a sqrt, as first written, differed in its last bit between the two (3 of
# 594 values) and moved a 4-bit code by one step (tools/fuzz.py --bits 4 seed 20174, 7.5e-5 from the oracle).


def _div(a: torch.Tensor, levels: float, like: torch.Tensor) -> torch.Tensor:
    # A true division by L (a tensor, so it is not folded into a product with 1/L, which rounds differently).
    return a / torch.full_like(like, levels)


def sqrt_quantize_math(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Square-root companded codes along the last dim. Per row, ``lo = min`` and ``range = max - lo``; code ``k``
    stands for ``lo + (k / L)**2 * range`` (``L = 2**bits - 1``), and ``x`` gets the largest ``k`` whose threshold
    ``((k - 0.5) / L)**2 * range`` is at most ``x - lo`` (round to nearest in the square root). The specification:
    the oracle runs it eagerly, the rewrite traces it into aten ops for any inner compiler.

    Returns:
        ``(q, range, lo)``: uint8 codes (packed at 4/2 bits like the uniform codes), and fp32 ``range`` and ``lo`` of
        shape ``x.shape[:-1]``. A row holding a zero at its minimum decodes it to exactly zero.
    """
    levels = float(2**bits - 1)
    xf = x.float()
    lo = torch.amin(xf, dim=-1, keepdim=True)
    v = xf - lo
    rng = torch.amax(v, dim=-1, keepdim=True)
    inv = torch.where(rng > 0, 1.0 / rng, torch.zeros_like(rng))
    c = torch.floor(torch.sqrt(v * inv) * levels + 0.5)  # a guess, within one step of the code
    c = _clamp_codes(c, levels)

    def threshold(k: torch.Tensor) -> torch.Tensor:
        h = _div(k - 0.5, levels, rng)
        return h * h * rng

    c = _clamp_codes(c + (threshold(c + 1.0) <= v).to(torch.float32) - (threshold(c) > v).to(torch.float32), levels)
    return _pack(c.to(torch.uint8), bits), rng.squeeze(-1), lo.squeeze(-1)


def _unpack(q: torch.Tensor, bits: int, last_dim: int) -> torch.Tensor:
    if bits == 8:
        return q
    per = 8 // bits
    parts = [(q >> (k * bits)) & (2**bits - 1) for k in range(per)]
    return torch.stack(parts, dim=-1).reshape(*q.shape[:-1], q.shape[-1] * per)[..., :last_dim]


def sqrt_dequantize_math(
    q: torch.Tensor, rng: torch.Tensor, lo: torch.Tensor, bits: int, last_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`sqrt_quantize_math`: ``lo + (code / L)**2 * range`` in fp32, cast to ``dtype``."""
    r = rng.unsqueeze(-1)
    h = _div(_unpack(q, bits, last_dim).float(), float(2**bits - 1), r)
    return (h * h * r + lo.unsqueeze(-1)).to(dtype)


def emit_sqrt_quantize(graph: fx.Graph, x: fx.Node, bits: int, after: fx.Node | None = None) -> list[fx.Node]:
    """Insert :func:`sqrt_quantize_math` of ``x`` after ``after`` (default ``x``); returns ``(q, scale, lo)``."""
    val = x.meta["val"]
    with val.fake_mode:
        sub = _trace(functools.partial(sqrt_quantize_math, bits=bits), (val,), ("sqrt-q", bits))
    return _splice(graph, sub, [x], (after if after is not None else x).next)


def emit_sqrt_dequantize(
    graph: fx.Graph, q: fx.Node, scale: fx.Node, lo: fx.Node, bits: int, last_dim: int, dtype, before: fx.Node
) -> fx.Node:
    """Insert :func:`sqrt_dequantize_math` before ``before``; returns the output node."""
    vals = (q.meta["val"], scale.meta["val"], lo.meta["val"])
    fn = functools.partial(sqrt_dequantize_math, bits=bits, last_dim=last_dim, dtype=dtype)
    with vals[0].fake_mode:
        sub = _trace(fn, vals, ("sqrt-dq", bits, last_dim, dtype))
    (out,) = _splice(graph, sub, [q, scale, lo], before)
    return out


def _static(val: torch.Tensor) -> bool:
    return all(isinstance(s, int) for s in val.shape)


def eligible(val: torch.Tensor, stochastic: bool, running: bool) -> bool:
    """Whether a saved tensor (its quantized view's fake value) can take the fused path.

    Per-step statistics, nearest rounding, static shape, non-empty.
    """
    return not stochastic and not running and _static(val) and val.numel() > 0


@functools.lru_cache(maxsize=1)
def _decompositions() -> dict:
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


# Traced subgraphs per fake mode (one compile) and signature: a model's layers quantize tensors of the same few
# shapes, and make_fx with the decomposition table costs ~0.1 s per trace (~4 s of a GPT-2-like compile before).
_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _trace(fn, args: tuple[torch.Tensor, ...], key: tuple) -> fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = args[0].fake_mode
    per_mode = _TRACES.setdefault(mode, {})
    sig = (key, *((tuple(a.shape), tuple(a.stride()), a.dtype, a.device) for a in args))
    gm = per_mode.get(sig)
    if gm is None:
        gm = per_mode[sig] = make_fx(fn, decomposition_table=_decompositions())(*args)
    return gm


def _splice(graph: fx.Graph, sub: fx.GraphModule, inputs: list[fx.Node], before: fx.Node) -> list[fx.Node]:
    """Copy ``sub``'s nodes into ``graph`` before ``before``, its placeholders bound to ``inputs``; its outputs."""
    env: dict[fx.Node, fx.Node] = {}
    phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(inputs):
        raise RuntimeError(f"actpass.fused: traced graph has {len(phs)} inputs, expected {len(inputs)}")
    env.update(zip(phs, inputs, strict=True))
    outs: list[fx.Node] = []
    with graph.inserting_before(before):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                outs = [env[a] for a in (n.args[0] if isinstance(n.args[0], (list, tuple)) else [n.args[0]])]
                continue
            if n.op == "get_attr":
                raise RuntimeError("actpass.fused: traced graph holds a constant tensor")
            new = graph.node_copy(n, lambda a: env[a])
            env[n] = new
    return outs


def emit_quantize(
    graph: fx.Graph, x: fx.Node, bits: int, gend: int, groups: int, after: fx.Node | None = None
) -> list[fx.Node]:
    """Insert the aten quantize of ``x`` right after it (or after ``after``); returns the ``(q, scale, lo)`` nodes
    (``meta["val"]`` set).

    Args:
        graph: the forward graph.
        x: the node to quantize (contiguous, static shape; its ``meta["val"]`` is a FakeTensor).
        bits, gend, groups: the plan's grouping.
        after: the node to insert after (default ``x``).
    """
    val = x.meta["val"]
    with val.fake_mode:
        fn = functools.partial(quantize_math, bits=bits, gend=gend, groups=groups)
        sub = _trace(fn, (val,), ("q", bits, gend, groups))
    return _splice(graph, sub, [x], (after if after is not None else x).next)


def emit_dequantize(
    graph: fx.Graph,
    q: fx.Node,
    scale: fx.Node,
    lo: fx.Node,
    bits: int,
    gend: int,
    last_dim: int,
    dtype: torch.dtype,
    before: fx.Node,
) -> fx.Node:
    """Insert the aten dequantize of ``(q, scale, lo)`` before ``before``; returns the output node."""
    vals = (q.meta["val"], scale.meta["val"], lo.meta["val"])
    mode = vals[0].fake_mode
    fn = functools.partial(dequantize_math, bits=bits, gend=gend, last_dim=last_dim, dtype=dtype)
    with mode:
        sub = _trace(fn, vals, ("dq", bits, gend, last_dim, dtype))
    (out,) = _splice(graph, sub, [q, scale, lo], before)
    return out
