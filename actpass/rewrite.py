"""Rewrite: apply a :class:`~actpass.plan.GraphPlan` to a partitioned forward/backward pair.

For a saved tensor ``x`` (a storage root, possibly saved through views ``v1 = view(x)`` ...)::

    forward before                          forward after
      x = aten.gelu(a)                        x = aten.gelu(a)
      ...                                     x_q = actpass.quantize_saved(x, 8, 3, 768, False, "", 0.9)
      return (out, x, ...)                    x_actpass_q, x_actpass_s, x_actpass_lo = x_q[0], x_q[1], x_q[2]
                                              return (out, x_actpass_q, x_actpass_s, x_actpass_lo, ...)

    backward before                         backward after
      x = placeholder                         x_actpass_q, x_actpass_s, x_actpass_lo = placeholder x3
      ...                                     ...            (other work: x is not materialised yet)
      y = aten.mm(g, x)                       x_hat = actpass.dequantize(x_actpass_q, ..., torch.float32)
                                              y = aten.mm(g, x_hat)

The dequantize goes right before the first backward use, so only one dequantized activation is alive at a time.
Non-contiguous roots are permuted to memory order before quantizing and permuted back after dequantizing, so the
backward sees the original strides. Saved views are replayed on the dequantized root with the same view ops.
New node names are unique in both graphs (FX would silently rename a clashing placeholder).
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from actpass import emit as _emit
from actpass import ops as _ops  # noqa: F401  (registers torch.ops.actpass)
from actpass.analysis import storage_root, view_chain
from actpass.config import MesaConfig
from actpass.plan import GraphPlan, SavedTensor
from actpass.symbols import SymSource

log = logging.getLogger(__name__)
aten = torch.ops.aten


class RewriteError(RuntimeError):
    """The graphs do not have the shape the plan expects; the caller falls back to the unmodified graphs."""


def _unique(base: str, *graphs: fx.Graph) -> str:
    taken = set()
    for g in graphs:
        taken |= {n.name for n in g.nodes}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _fake_mode(val: torch.Tensor):
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        raise RewriteError("saved tensor has no FakeTensor metadata")
    return mode


def apply_plan(
    fw: fx.GraphModule, bw: fx.GraphModule, plan: GraphPlan, num_fwd_outputs: int, config: MesaConfig
) -> None:
    """Rewrite ``fw`` and ``bw`` in place as ``plan`` says. Raises :class:`RewriteError` on a contract mismatch."""
    fw_out = next(iter(fw.graph.find_nodes(op="output")))
    outs = list(fw_out.args[0])
    saved_pos = {n.name: i for i, n in enumerate(outs) if i >= num_fwd_outputs and isinstance(n, fx.Node)}
    bw_ph = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
    fw_nodes = {n.name: n for n in fw.graph.nodes}
    syms = SymSource(bw.graph)
    order = {n: i for i, n in enumerate(bw.graph.nodes)}

    by_root: dict[str, list[SavedTensor]] = {}
    for t in plan.tensors:
        if t.quantized:
            by_root.setdefault(t.tensor_id, []).append(t)

    replace_out: dict[str, list[fx.Node]] = {}
    for _tid, members in by_root.items():
        first = members[0]
        for t in members:
            if t.name not in saved_pos or t.name not in bw_ph:
                raise RewriteError(f"saved tensor {t.name} is not aligned between forward outputs and backward inputs")
        member_nodes = [fw_nodes[t.name] for t in members]
        root = storage_root(member_nodes[0])
        rval = root.meta["val"]
        _fake_mode(rval)  # a RewriteError without FakeTensor metadata

        # ---- forward: quantize right after the root is produced ----
        base = root.name
        x = root
        if first.perm:
            with fw.graph.inserting_after(x):
                x = fw.graph.call_function(aten.permute.default, (root, list(first.perm)))
            x.meta["val"] = rval.permute(first.perm)
        if first.chunk > 1:
            c = x.meta["val"].shape[-1]
            with fw.graph.inserting_after(x):
                xv = fw.graph.call_function(aten.view.default, (x, [-1, c // first.chunk, first.chunk]))
            xv.meta["val"] = x.meta["val"].view(-1, c // first.chunk, first.chunk)
            x = xv
        names = [_unique(f"{base}_actpass_{s}", fw.graph, bw.graph) for s in ("q", "s", "lo")]
        fused = _emit.use_fused(config, x.meta["val"])
        outs_new = _emit.emit_quantize(fw.graph, x, first, config, names, fused)
        fq, fs, flo = (n.meta["val"] for n in outs_new)
        replace_out[first.name] = outs_new
        for t in members[1:]:
            replace_out[t.name] = []

        # ---- backward: new placeholders, dequantize before the first use ----
        first_ph = bw_ph[first.name]
        new_ph = []
        for nm, v in zip(names, (fq, fs, flo), strict=True):
            with bw.graph.inserting_before(first_ph):
                p = bw.graph.placeholder(nm)
            if p.name != nm:
                raise RewriteError(f"placeholder name {nm} clashed")
            p.meta["val"] = v
            new_ph.append(p)
            syms.add(p)
        users = [u for t in members for u in bw_ph[t.name].users]
        if not users:
            for t in members:
                bw.graph.erase_node(bw_ph[t.name])
            continue
        first_use = min(users, key=lambda u: order.get(u, len(order)))
        with bw.graph.inserting_before(first_use):
            last = x.meta["val"].shape[-1]
            last_arg = syms.emit(last, last)
            shape = x.meta["val"].shape
            deq = _emit.emit_dequantize(bw.graph, new_ph, first, last_arg, shape, rval.dtype, fused, first_use)
            y = deq
            if first.chunk > 1:  # back from [rows, C/chunk, chunk] to the root's (memory-order) shape
                pshape = rval.permute(first.perm).shape if first.perm else rval.shape
                y = bw.graph.call_function(aten.view.default, (deq, [syms.emit(d, d) for d in pshape]))
                y.meta["val"] = deq.meta["val"].view(pshape)
            if first.perm:
                inv = [0] * len(first.perm)
                for i, p in enumerate(first.perm):
                    inv[p] = i
                y = bw.graph.call_function(aten.permute.default, (y, inv))
                y.meta["val"] = y.args[0].meta["val"].permute(inv)
            for t, m in zip(members, member_nodes, strict=True):
                cur = y
                for step in view_chain(m):
                    new_args = [cur]
                    for a in step.args[1:]:
                        new_args.append(_map_arg(a, syms))
                    cur = bw.graph.call_function(step.target, tuple(new_args), dict(step.kwargs))
                    cur.meta.update({k: v for k, v in step.meta.items() if k != "val"})
                    cur.meta["val"] = _replay_val(step, cur)
                ph = bw_ph[t.name]
                ph.replace_all_uses_with(cur)
                bw.graph.erase_node(ph)

    new_outs: list = []
    for i, n in enumerate(outs):
        if i >= num_fwd_outputs and isinstance(n, fx.Node) and n.name in replace_out:
            new_outs.extend(replace_out[n.name])
        else:
            new_outs.append(n)
    fw_out.args = (tuple(new_outs),)
    fw.graph.lint()
    bw.graph.lint()
    fw.recompile()
    bw.recompile()


def _map_arg(a, syms: SymSource):
    if isinstance(a, (list, tuple)):
        return type(a)(_map_arg(x, syms) for x in a)
    if isinstance(a, fx.Node):
        return syms.emit(a, a.meta.get("val"))
    if isinstance(a, torch.SymInt):
        return syms.emit(a, a)
    return a


def _replay_val(step: fx.Node, new: fx.Node):
    """Recompute the replayed view's fake value from its (fake) input, so strides come from the dequantized root."""
    src = new.args[0]
    sval = src.meta["val"] if isinstance(src, fx.Node) else src
    if step.target is operator.getitem:
        return sval[new.args[1]]
    args = [sval] + [(_val(a)) for a in new.args[1:]]
    mode = getattr(step.meta["val"], "fake_mode", None) if isinstance(step.meta["val"], torch.Tensor) else None
    if mode is None:
        vals = step.meta["val"]
        mode = getattr(vals[0], "fake_mode", None) if isinstance(vals, (list, tuple)) else None
    with mode:
        return step.target(*args, **step.kwargs)


def _val(a):
    if isinstance(a, (list, tuple)):
        return type(a)(_val(x) for x in a)
    if isinstance(a, fx.Node):
        return a.meta["val"]
    return a
