"""Backward attention on stored q/k/v: re-run sdpa's forward so the backward's softmax is a softmax again.

A fused attention's backward (``_scaled_dot_product_flash_attention_for_cpu_backward``) does not store the
probabilities: it rebuilds them from q, k and the forward's log-sum-exp, ``P = exp(q k^T * scale - lse)``, and uses
the forward's output in ``D = rowsum(dO * out)``. With exact q/k/v both are the forward's. With q/k/v rebuilt from
codes, ``q' k'^T`` differs from ``q k^T`` and the old ``lse`` no longer normalizes it: a shift common to a whole row
(a query's rounding error dotted with the keys' shared component, large in trained models) is cancelled by a softmax
but multiplies every probability of the row by ``exp(shift)`` here, and ``out`` no longer equals ``P' v'``. Measured
on HF Llama after 150 exact training steps (one step's global gradient error, every q/k/v at 8 / 4 bits):
2.92% / 235% with the saved ``out`` and ``lse``, 0.86% / 13.6% when backward first re-runs the forward kernel on the
rebuilt q/k/v and uses its ``out`` and ``lse`` (``tools/measure_sensitivity.py``; the q/k/v role's table entries
were measured this way).

The cost is one attention forward per attention in backward (no quadratic memory: the fused kernel's own). Only
attentions whose q, k or v is lossy in backward are rewritten; with dropout the forward's mask cannot be drawn
again, so those keep the saved tensors.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

# backward op -> the forward op that computes its (out, logsumexp) from the same q, k, v and arguments.
# NOTE: only the CPU kernel for now. The CUDA flash / efficient / cuDNN variants take other argument lists (philox
# state, cumulative sequence lengths, a padded logsumexp) and no CUDA run has checked them: they keep the saved
# tensors until one does.
_CPU_FLASH = aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD_TO_FORWARD = {aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _CPU_FLASH.default}


def lossy_closure(graph: fx.Graph, lossy: set[fx.Node]) -> set[fx.Node]:
    """``lossy`` and every node of ``graph`` computed from one of them."""
    out = set(lossy)
    for n in graph.nodes:
        if n not in out and any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def rerun_attention_forward(graph: fx.Graph, lossy: set[fx.Node], tainted: set[fx.Node] | None = None) -> list[fx.Node]:
    """Give each fused-attention backward of ``graph`` whose q, k or v derives from ``lossy`` the ``out`` and
    ``logsumexp`` of its forward kernel re-run on those q, k, v (inserted right before it). Returns the rewritten
    backward nodes.

    Args:
        graph: a backward graph.
        lossy: nodes holding values rebuilt with an error (dequantized storages).
        tainted: ``lossy_closure(graph, lossy)``, if the caller has it already.
    """
    if tainted is None:
        tainted = lossy_closure(graph, lossy)
    done = []
    for n in list(graph.nodes):
        fwd = _BACKWARD_TO_FORWARD.get(n.target)  # type: ignore[arg-type]
        if fwd is None:
            continue
        grad_out, q, k, v, _out, _lse, dropout_p, is_causal, *rest = n.args
        if dropout_p != 0.0 or not any(x in tainted for x in (q, k, v)):
            continue
        kwargs = {"attn_mask": n.kwargs.get("attn_mask"), "scale": n.kwargs.get("scale")}
        with graph.inserting_before(n):
            f = graph.call_function(fwd, (q, k, v, dropout_p, is_causal), kwargs)
            out = graph.call_function(operator.getitem, (f, 0))
            lse = graph.call_function(operator.getitem, (f, 1))
        mode = _fake_mode(q, k, v)
        mask = kwargs["attn_mask"]
        with mode:
            val = fwd(
                q.meta["val"],
                k.meta["val"],
                v.meta["val"],
                dropout_p,
                is_causal,
                attn_mask=mask.meta["val"] if isinstance(mask, fx.Node) else mask,
                scale=kwargs["scale"],
            )
        f.meta["val"] = val
        out.meta["val"], lse.meta["val"] = val[0], val[1]
        n.args = (grad_out, q, k, v, out, lse, dropout_p, is_causal, *rest)
        done.append(n)
    return done


def rerun_for_substitutes(
    fw_graph: fx.Graph, bw: fx.GraphModule, lossy_fw: set[fx.Node], saved: dict[str, fx.Node]
) -> tuple[list[fx.Node], set[fx.Node]]:
    """:func:`rerun_attention_forward` where forward hands backward substitutes of its saved tensors (the oracle, the
    measuring probe): a backward placeholder is lossy when the forward value saved under its name (``saved``) is
    computed from ``lossy_fw`` (the substitutes that round). Recompiles ``bw`` if anything changed. Returns the
    rewritten backward nodes and the lossy placeholders."""
    tainted_fw = lossy_closure(fw_graph, lossy_fw)
    ph = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
    lossy = {ph[name] for name, node in saved.items() if node in tainted_fw and name in ph}
    reran = rerun_attention_forward(bw.graph, lossy)
    if reran:
        bw.graph.lint()
        bw.recompile()
    return reran, lossy


def ancestors(nodes) -> set[fx.Node]:
    """``nodes`` and every node they are computed from."""
    out: set[fx.Node] = set()
    todo = [n for n in nodes if isinstance(n, fx.Node)]
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(n.all_input_nodes)
    return out


class AttentionRewriteError(RuntimeError):
    """An attention backward that cannot be given a re-run forward (its inputs carry no fake values)."""


def _fake_mode(*nodes: fx.Node):
    for x in nodes:
        mode = getattr(x.meta.get("val"), "fake_mode", None)
        if mode is not None:
            return mode
    raise AttentionRewriteError("attention inputs carry no FakeTensor metadata")
