"""How the rewrite emits one quantize (forward) and one dequantize (backward): two implementations, one choice.

* ``kernels``: a call of the extension op ``actpass::quantize_saved`` / ``actpass::dequantize`` (C++/CUDA kernels,
  opaque to Inductor). Needed for running statistics (the op updates the store's buffer in place), stochastic
  rounding (its Philox stream) and ``inner="eager"`` (no compiler to fuse anything).
* ``fused``: the same math as aten ops (:mod:`actpass.fused`), which Inductor fuses into the kernels that produce
  and consume the activation.

:func:`use_fused` makes the choice once per saved storage, so forward and backward always agree.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from actpass import fused as _fused
from actpass import ops as _ops  # noqa: F401  (registers torch.ops.actpass)
from actpass.config import Codec, Inner, MesaConfig, Rounding, Stats
from actpass.plan import SavedTensor


def use_fused(config: MesaConfig, x_val: torch.Tensor) -> bool:
    """Whether the quantize of ``x_val`` (the tensor as quantized: memory order, chunk view) is emitted as aten ops.

    Args:
        config: the backend's config (``codec``, ``inner``, ``stats``, ``rounding``).
        x_val: FakeTensor of the quantized view.
    """
    if config.codec is Codec.KERNELS or config.inner is not Inner.INDUCTOR:
        return False
    # NOTE: measured with tools/bench_step.py (CPU, 1 thread, interleaved rounds on a loaded 2-core machine), mesa 8-bit
    # step / Inductor step, fused vs extension ops: fp32 vit 0.99 vs 1.09, gpt 1.02 vs 1.06, hf-gpt2 1.06 vs 1.01;
    # bf16 autocast vit 1.20 vs 1.04, gpt 1.07 vs 1.08, hf-gpt2 1.16 vs 1.14. So fp32 tensors take the fused path
    # and 16-bit ones the extension kernels (Inductor's bf16 code converts to fp32 and back around every op).
    # Re-measured on a quiet machine with the planner's plans (bench_step --precisions bf16 --variants inductor mesa8
    # mesa8-fused --rounds 7, tools/results/step-cpu-amd-epyc-quiet-bf16-fused.json): kernels / codec="fused"
    # vit 0.995 / 1.031, gpt 1.016 / 1.050, hf-gpt2 1.015 / 1.044, hf-llama 1.062 / 1.060, hf-vit 1.089 / 1.147.
    if x_val.dtype != torch.float32 and config.codec is not Codec.FUSED:
        return False
    # NOTE: bit-exact with the reference is measured on Inductor's CPU code only (tests/test_fused.py). On CUDA,
    # Triton may contract multiply-adds into FMAs (codes off by one at rounding ties): no GPU has run it yet, so CUDA
    # tensors keep the extension kernels until that is measured.
    if x_val.device.type != "cpu":
        return False
    stochastic = config.rounding is Rounding.STOCHASTIC
    return _fused.eligible(x_val, stochastic, config.stats is Stats.RUNNING)


def emit_quantize(
    graph: fx.Graph,
    x: fx.Node,
    record: SavedTensor,
    config: MesaConfig,
    names: list[str],
    fused: bool,
    after: fx.Node | None = None,
) -> list[fx.Node]:
    """Insert the quantize of ``x`` right after it; returns the ``(q, scale, lo)`` nodes, renamed to ``names``.

    Args:
        graph: the forward graph.
        x: the node to quantize (its ``meta["val"]`` a FakeTensor).
        record: the plan's record (bits, grouping, running-statistics key).
        config: the backend's config.
        names: names for the three outputs, unique in the forward and backward graphs.
        fused: :func:`use_fused`'s answer for ``x``.
        after: insert after this node instead of ``x`` (a graph input is quantized after the last input).
    """
    after = x if after is None else after
    if fused:
        outs = _fused.emit_quantize(graph, x, record.bits, record.gend, record.groups, after=after)
    else:
        stochastic = config.rounding is Rounding.STOCHASTIC
        args = (x, record.bits, record.gend, record.groups, stochastic, record.stats_key, config.decay)
        with x.meta["val"].fake_mode:
            vals = torch.ops.actpass.quantize_saved.default(x.meta["val"], *args[1:])
        with graph.inserting_before(after.next):
            qnode = graph.call_function(torch.ops.actpass.quantize_saved.default, args)
            qnode.meta["val"] = vals
            outs = []
            for i, v in enumerate(vals):
                g = graph.call_function(operator.getitem, (qnode, i))
                g.meta["val"] = v
                outs.append(g)
    for node, name in zip(outs, names, strict=True):
        node.name = name
    return outs


def emit_dequantize(
    graph: fx.Graph,
    inputs: list[fx.Node],
    record: SavedTensor,
    last_dim: int | fx.Node,
    shape: torch.Size,
    dtype: torch.dtype,
    fused: bool,
    before: fx.Node,
) -> fx.Node:
    """Insert the dequantize of ``inputs = (q, scale, lo)`` right before ``before``; returns its output node.

    Args:
        graph: the backward graph.
        inputs: the three placeholders.
        record: the plan's record.
        last_dim: the quantized view's last dimension (int, or a node computing a symbolic one).
        shape: the quantized view's shape (for the output's fake value).
        dtype: the output dtype (the saved tensor's).
        fused: :func:`use_fused`'s answer for this tensor.
        before: the node to insert before (after anything already inserted before it).
    """
    q, scale, lo = inputs
    if fused:
        return _fused.emit_dequantize(graph, q, scale, lo, record.bits, record.gend, int(last_dim), dtype, before)
    with graph.inserting_before(before):
        deq = graph.call_function(
            torch.ops.actpass.dequantize.default, (q, scale, lo, record.bits, record.gend, last_dim, dtype)
        )
    val = q.meta["val"]
    with val.fake_mode:
        deq.meta["val"] = torch.empty(shape, dtype=dtype, device=val.device)
    return deq
