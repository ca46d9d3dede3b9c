"""Rewrite: apply a :class:`~actpass.plan.GraphPlan` to a partitioned forward/backward pair.

Quantized storage ``x`` (a storage root, possibly saved through views ``v1 = view(x)`` ...)::

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

Recomputed storage ``y = add(mul(n, w), b)`` (a LayerNorm affine output; ``n`` is saved anyway)::

    forward: y is no longer returned         backward: y_hat = add(mul(n_hat, w), b)   just before y's first use

The dequantize (or the replay) goes right before the first backward use, so only one rebuilt activation is alive at
a time; a storage that a replay reads is dequantized before the replay. Non-contiguous roots are permuted to memory
order before quantizing and permuted back after dequantizing, so the backward sees the original strides. Saved
views are replayed on the rebuilt root with the same view ops. A replay that reads a parameter or a storage backward
did not receive gets it as a new saved output (a parameter costs nothing: it is alive anyway). New node names are
unique in both graphs (FX would silently rename a clashing placeholder).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import NamedTuple

import torch
import torch.fx as fx
from torch._prims_common import make_contiguous_strides_for

from actpass import attention as _attention
from actpass import emit as _emit
from actpass import fused as _fused
from actpass import ops as _ops  # noqa: F401  (registers torch.ops.actpass)
from actpass.analysis import GraphFacts, StorageFacts, storage_root, view_chain
from actpass.config import Inner, MesaConfig
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


class _PartInfo(NamedTuple):
    """What backward needs of one part of a split storage (``_Rewriter.quantize_forward_split``)."""

    record: SavedTensor  # the part's own record (bits None: its rows are stored as a copy)
    val: torch.Tensor  # the part's fake value (memory order)
    qval: torch.Tensor | None  # its grouping view's fake value, if it has one (channel chunks, row blocks)
    fused: bool = False  # codes emitted as aten ops (emit.use_fused)
    transposed: bool = False  # a copy held with dims 0 and 1 swapped


class _Rewriter:
    """State of one rewrite: the two graphs, their outputs/placeholders, and how to reach forward values in backward."""

    def __init__(self, fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, config: MesaConfig) -> None:
        self.fw, self.bw, self.config = fw, bw, config
        self.fw_out = next(iter(fw.graph.find_nodes(op="output")))
        self.outs = list(self.fw_out.args[0])
        self.num_fwd_outputs = num_fwd_outputs
        self.bw_ph = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
        self.fw_nodes = {n.name: n for n in fw.graph.nodes}
        self.syms = SymSource(bw.graph)
        self.order = {n: i for i, n in enumerate(bw.graph.nodes)}
        self.replace_out: dict[str, list[fx.Node]] = {}
        self.extra_out: list[fx.Node] = []  # forward values added as saved outputs (parameters, roots of views)
        self.bw_value: dict[str, fx.Node] = {}  # forward node name -> backward node holding its value
        self.lossy: dict[fx.Node, list[str]] = {}  # backward node holding a storage rebuilt with an error -> names
        self.reran: set[str] = set()  # saved tensors read by an attention backward given a re-run forward
        self.recomputed: dict[fx.Node, list[str]] = {}  # backward node holding a replayed storage -> its names

    # ---- helpers -------------------------------------------------------------------------------------------------
    def first_use(self, names) -> fx.Node | None:
        users = [u for nm in names if nm in self.bw_ph for u in self.bw_ph[nm].users]
        if not users:
            return None
        return min(users, key=lambda u: self.order.get(u, len(self.order)))

    def saved_placeholder(self, fw_node: fx.Node) -> fx.Node:
        """The backward placeholder holding ``fw_node``'s value, adding it as a saved output if needed."""
        if fw_node.name in self.bw_value:
            return self.bw_value[fw_node.name]
        ph = self.bw_ph.get(fw_node.name)
        if ph is not None and fw_node.name not in self.replace_out:
            self.bw_value[fw_node.name] = ph
            return ph
        # A new saved output, placed after the last saved tensor on both sides (their positions must correspond).
        last_saved = [
            n
            for n in self.outs[self.num_fwd_outputs :]
            if isinstance(n, fx.Node) and n.name in self.bw_ph and isinstance(n.meta.get("val"), torch.Tensor)
        ]
        if not last_saved:
            raise RewriteError("no saved tensor to anchor a new saved output")
        anchor = self.bw_ph[last_saved[-1].name]
        anchor = max([anchor, *(self.bw_value[e.name] for e in self.extra_out)], key=lambda n: self.order.get(n, -1))
        name = _unique(f"{fw_node.name}_actpass_src", self.fw.graph, self.bw.graph)
        with self.bw.graph.inserting_after(anchor):
            p = self.bw.graph.placeholder(name)
        if p.name != name:
            raise RewriteError(f"placeholder name {name} clashed")
        p.meta["val"] = fw_node.meta["val"]
        self.order[p] = self.order.get(anchor, 0) + 0.5
        self.syms.add(p)
        self.extra_out.append(fw_node)
        self.bw_value[fw_node.name] = p
        return p

    def replay(self, nodes: list[fx.Node], env: dict[fx.Node, object]) -> None:
        """Copy forward ``nodes`` into backward at the current insertion point, arguments mapped through ``env``."""
        for n in nodes:
            args = _map(n.args, env, self.syms)
            kwargs = _map(n.kwargs, env, self.syms)
            new = self.bw.graph.call_function(n.target, tuple(args), dict(kwargs))
            new.meta.update({k: v for k, v in n.meta.items() if k != "val"})
            new.meta["val"] = _fake_call(n, args, kwargs)
            env[n] = new

    # ---- quantized storages --------------------------------------------------------------------------------------
    def memory_order(self, first: SavedTensor) -> tuple[fx.Node, fx.Node, fx.Node]:
        """``(root, x, anchor)``: the storage root of ``first``, the root in memory order (permuted if it is not
        contiguous), and the node to insert the quantize after."""
        root = storage_root(self.fw_nodes[first.name])
        graph = self.fw.graph
        x = anchor = root
        if root.op == "placeholder":  # an activation handed over as a graph input: quantize after the inputs
            anchor = list(graph.find_nodes(op="placeholder"))[-1]
        if first.perm:
            with graph.inserting_after(anchor):
                x = anchor = graph.call_function(aten.permute.default, (root, list(first.perm)))
            x.meta["val"] = root.meta["val"].permute(first.perm)
        return root, x, anchor

    def save(self, members: list[SavedTensor], outs: list[fx.Node]) -> list[fx.Node]:
        """Forward saves ``outs`` in place of the storage's members; backward gets them as placeholders where the
        first member's was (returned, in order)."""
        self.replace_out[members[0].name] = outs
        for t in members[1:]:
            self.replace_out[t.name] = []
        first_ph = self.bw_ph[members[0].name]
        new_ph = []
        for node in outs:
            with self.bw.graph.inserting_before(first_ph):
                p = self.bw.graph.placeholder(node.name)
            if p.name != node.name:
                raise RewriteError(f"placeholder name {node.name} clashed")
            p.meta["val"] = node.meta["val"]
            new_ph.append(p)
            self.syms.add(p)
        return new_ph

    def rebuilt(self, members: list[SavedTensor], root: fx.Node, y: fx.Node) -> None:
        """``y`` (in backward, before the current insertion point) holds the storage in memory order: permute it back
        to the root's strides, and rebuild every saved member from it."""
        perm = members[0].perm
        if perm:
            y = self.bw.graph.call_function(aten.permute.default, (y, inverse_perm(perm)))
            y.meta["val"] = y.args[0].meta["val"].permute(inverse_perm(perm))
        self.bw_value[root.name] = y
        if members[0].bits != 1:  # every code but the 1-bit ones (masks, two-valued tensors) rounds
            self.lossy[y] = [t.name for t in members]
        self.replay_members(members, root, y)

    def quantize_forward(self, members: list[SavedTensor]) -> tuple[fx.Node, list[fx.Node], tuple]:
        first = members[0]
        root, x, anchor = self.memory_order(first)
        rval = root.meta["val"]
        mode = _fake_mode(rval)
        graph = self.fw.graph
        qview = _qview_shape(first, x.meta["val"])
        if qview is not None:
            with graph.inserting_after(anchor):
                xv = graph.call_function(aten.view.default, (x, qview))
            xv.meta["val"] = x.meta["val"].view(qview)
            x = anchor = xv
        outs_new: list[fx.Node] = []
        fused = False
        if first.bits == 16:  # half precision: a cast, which Inductor fuses
            half = torch.ops.prims.convert_element_type.default
            with mode:
                vals = (half(x.meta["val"], torch.float16),)
            with graph.inserting_after(anchor):
                qnode = graph.call_function(half, (x, torch.float16))
            qnode.meta["val"] = vals[0]
            qnode.name = _unique(f"{root.name}_actpass_half", graph, self.bw.graph)
            outs_new.append(qnode)
        elif first.code == "sqrt":  # square-root companded codes: aten ops, whatever the inner compiler
            outs_new = _fused.emit_sqrt_quantize(graph, x, first.bits, after=anchor)
            for node, s in zip(outs_new, ("q", "s", "lo"), strict=True):
                node.name = _unique(f"{root.name}_actpass_sqrt_{s}", graph, self.bw.graph)
        elif first.code == "select":  # two values by construction: 1 bit per element says which
            # NOTE: the two values are read from the tensor (its max and min), not from the graph's constants: the
            # compiled forward may round a constant differently from eager (HF-style finfo(float32).min cast to
            # bfloat16: -inf in eager, finite under Inductor, so x == the eager value matched nothing and backward
            # saw no mask at all; tests/test_backend.py::test_additive_attention_mask_is_stored_as_one_bit).
            with mode:
                hi_v, lo_v = aten.amax.default(x.meta["val"]), aten.amin.default(x.meta["val"])
                is_hi = aten.eq.Tensor(x.meta["val"], hi_v)
                vals = (torch.ops.actpass.pack_mask.default(is_hi), hi_v, lo_v)
            with graph.inserting_after(anchor):
                hi = graph.call_function(aten.amax.default, (x,))
            with graph.inserting_after(hi):
                lo = graph.call_function(aten.amin.default, (x,))
            with graph.inserting_after(lo):
                eq = graph.call_function(aten.eq.Tensor, (x, hi))
            with graph.inserting_after(eq):
                qnode = graph.call_function(torch.ops.actpass.pack_mask.default, (eq,))
            for node, v in zip((hi, lo, eq), (hi_v, lo_v, is_hi), strict=True):
                node.meta["val"] = v
            qnode.meta["val"] = vals[0]
            outs_new = [qnode, hi, lo]
            for node, suffix in zip(outs_new, ("bits", "hi", "lo"), strict=True):
                node.name = _unique(f"{root.name}_actpass_{suffix}", graph, self.bw.graph)
        elif first.bits == 1:  # a bool mask: one packed tensor
            with mode:
                vals = (torch.ops.actpass.pack_mask.default(x.meta["val"]),)
            with graph.inserting_after(anchor):
                qnode = graph.call_function(torch.ops.actpass.pack_mask.default, (x,))
            qnode.meta["val"] = vals[0]
            qnode.name = _unique(f"{root.name}_actpass_bits", graph, self.bw.graph)
            outs_new.append(qnode)
        else:
            fused = _emit.use_fused(self.config, x.meta["val"])
            names = [_unique(f"{root.name}_actpass_{s}", graph, self.bw.graph) for s in ("q", "s", "lo")]
            outs_new = _emit.emit_quantize(graph, x, first, self.config, names, fused, after=anchor)
        return root, self.save(members, outs_new), (x.meta["val"], qview, fused)

    def dequantize_backward(self, members: list[SavedTensor], root: fx.Node, new_ph, qinfo, at: fx.Node) -> None:
        first = members[0]
        rval = root.meta["val"]
        mode = _fake_mode(rval)
        xval, qview, fused = qinfo
        graph = self.bw.graph
        with graph.inserting_before(at):
            if first.bits == 16:
                cast = torch.ops.prims.convert_element_type.default
                deq = graph.call_function(cast, (new_ph[0], rval.dtype))
                with mode:
                    deq.meta["val"] = cast(new_ph[0].meta["val"], rval.dtype)
            elif first.code == "sqrt":
                q, scale, lo = new_ph
                deq = _fused.emit_sqrt_dequantize(graph, q, scale, lo, first.bits, int(xval.shape[-1]), rval.dtype, at)
            elif first.bits == 1:  # a bool mask, or for code "select" which of its two values (max, min) it holds
                shape = [self.syms.emit(d, d) for d in xval.shape]
                bits = graph.call_function(torch.ops.actpass.unpack_mask.default, (new_ph[0], shape))
                deq = bits
                if first.code == "select":
                    deq = graph.call_function(aten.where.self, (bits, new_ph[1], new_ph[2]))
                with mode:
                    bits.meta["val"] = torch.empty(xval.shape, dtype=torch.bool, device=rval.device)
                    deq.meta["val"] = torch.empty(xval.shape, dtype=rval.dtype, device=rval.device)
            else:
                last = xval.shape[-1]
                last_arg = self.syms.emit(last, last)
                deq = _emit.emit_dequantize(graph, new_ph, first, last_arg, xval.shape, rval.dtype, fused, at)
            y = deq
            if qview is not None:  # back from the grouping view to the root's (memory-order) shape
                pshape = rval.permute(first.perm).shape if first.perm else rval.shape
                y = graph.call_function(aten.view.default, (deq, [self.syms.emit(d, d) for d in pshape]))
                y.meta["val"] = deq.meta["val"].view(pshape)
            self.rebuilt(members, root, y)

    # ---- storages split in two (planner.split_option) -------------------------------------------------------------
    def quantize_forward_split(self, members: list[SavedTensor]) -> tuple[fx.Node, list[fx.Node], tuple]:
        """Rows ``[0, k)`` of the memory-order root stored as ``split`` says (a copy, or codes), the rest as the
        record says; each part with its own statistics."""
        first = members[0]
        split = first.split
        assert split is not None
        root, x, anchor = self.memory_order(first)
        _fake_mode(root.meta["val"])
        graph = self.fw.graph
        n = int(x.meta["val"].shape[0])
        if not 0 < split.rows < n:
            raise RewriteError(f"{first.tensor_id}: split at row {split.rows} of {n}")
        part_a = dataclasses.replace(
            first,
            bits=split.bits,
            gend=split.gend,
            groups=split.groups,
            chunk=split.chunk,
            row_block=split.row_block,
            split=None,
        )
        part_b = dataclasses.replace(first, split=None)
        outs_new: list[fx.Node] = []
        info = []
        resume: fx.Node | None = None
        for i, (rec, start, end) in enumerate(((part_a, 0, split.rows), (part_b, split.rows, n))):
            # Each part's nodes go after the previous part's, so random draws (stochastic rounding) come in the order
            # the oracle makes them.
            if resume is not None:
                anchor = resume.prev
            resume = anchor.next
            with graph.inserting_after(anchor):
                xs = graph.call_function(aten.slice.Tensor, (x, 0, start, end))
            xs.meta["val"] = x.meta["val"][start:end]
            if rec.bits is None:  # exact: a copy of these rows (a slice would keep the whole storage alive)
                c, transposed = self._copy_rows(xs)
                c.name = _unique(f"{root.name}_actpass_rows{i}", graph, self.bw.graph)
                outs_new.append(c)
                info.append(_PartInfo(rec, xs.meta["val"], None, transposed=transposed))
                continue
            xq = xs
            qview = _qview_shape(rec, xs.meta["val"])
            if qview is not None:
                with graph.inserting_after(xs):
                    xq = graph.call_function(aten.view.default, (xs, qview))
                xq.meta["val"] = xs.meta["val"].view(qview)
            fused = _emit.use_fused(self.config, xq.meta["val"])
            names = [_unique(f"{root.name}_actpass_{s}{i}", graph, self.bw.graph) for s in ("q", "s", "lo")]
            outs = _emit.emit_quantize(graph, xq, rec, self.config, names, fused, after=xq)
            outs_new.extend(outs)
            info.append(_PartInfo(rec, xs.meta["val"], xq.meta["val"] if qview is not None else None, fused=fused))
        return root, self.save(members, outs_new), tuple(info)

    def _copy_rows(self, xs: fx.Node) -> tuple[fx.Node, bool]:
        """A copy of the rows ``xs`` (a slice) that Inductor keeps; whether it holds them transposed (dims 0, 1).

        NOTE: Inductor drops an ``aten.clone`` whose result has its source's shape and strides (``remove_noop_ops``),
        which a contiguous slice's clone has; the saved slice then kept the whole storage alive (HF Llama, budget 25%:
        9.7% over, measured with saved-tensor hooks). A contiguous copy of the slice with dims 0 and 1 swapped has
        other strides, so Inductor keeps it, and it stays an aten op that can fuse into the producer; backward swaps
        the dims back (a view). Where the strides cannot differ (a 1-D tensor, two dims of size 1), and with
        ``inner="eager"``, the copy is ``actpass::copy``."""
        graph, val = self.fw.graph, xs.meta["val"]
        mode = _fake_mode(val)
        swap = [1, 0, *range(2, val.dim())]
        if self.config.inner is Inner.INDUCTOR and val.dim() >= 2 and _strides_differ(val.permute(swap)):
            with graph.inserting_after(xs):
                t = graph.call_function(aten.permute.default, (xs, swap))
            with graph.inserting_after(t):
                c = graph.call_function(aten.clone.default, (t,), {"memory_format": torch.contiguous_format})
            with mode:
                t.meta["val"] = val.permute(swap)
                c.meta["val"] = t.meta["val"].clone(memory_format=torch.contiguous_format)
            return c, True
        with graph.inserting_after(xs):
            c = graph.call_function(torch.ops.actpass.copy.default, (xs,))
        with mode:
            c.meta["val"] = torch.ops.actpass.copy.default(val)
        return c, False

    def dequantize_backward_split(self, members: list[SavedTensor], root: fx.Node, new_ph, info, at: fx.Node) -> None:
        rval = root.meta["val"]
        mode = _fake_mode(rval)
        graph = self.bw.graph
        pieces: list[fx.Node] = []
        with graph.inserting_before(at):
            i = 0
            for rec, part_val, qval, fused, transposed in info:
                count = 1 if rec.bits is None else 3  # a copy of the rows, or (codes, scale, low end)
                phs = new_ph[i : i + count]
                i += count
                if rec.bits is None:
                    piece = phs[0]
                    if transposed:  # held with dims 0 and 1 swapped (_copy_rows): swap them back
                        swap = [1, 0, *range(2, part_val.dim())]
                        piece = graph.call_function(aten.permute.default, (piece, swap))
                        piece.meta["val"] = phs[0].meta["val"].permute(swap)
                    pieces.append(piece)
                    continue
                qv = qval if qval is not None else part_val
                last = qv.shape[-1]
                deq = _emit.emit_dequantize(graph, phs, rec, int(last), qv.shape, rval.dtype, fused, at)
                if qval is not None:
                    back = graph.call_function(aten.view.default, (deq, list(part_val.shape)))
                    back.meta["val"] = deq.meta["val"].view(part_val.shape)
                    deq = back
                pieces.append(deq)
            y = graph.call_function(aten.cat.default, (pieces, 0))
            with mode:
                y.meta["val"] = aten.cat.default([p.meta["val"] for p in pieces], 0)
            self.rebuilt(members, root, y)

    def replay_members(self, members: list[SavedTensor], root: fx.Node, y: fx.Node) -> None:
        """Rebuild each saved member (the root or a view of it) from ``y`` and swap it in for its placeholder."""
        for t in members:
            m = self.fw_nodes[t.name]
            env: dict[fx.Node, object] = {root: y}
            chain = view_chain(m) if m is not root else []
            self.replay(chain, env)
            ph = self.bw_ph.get(t.name)
            if ph is not None:
                ph.replace_all_uses_with(env[m] if chain else y)

    # ---- the end -------------------------------------------------------------------------------------------------
    def finish(self) -> None:
        if self.config.rerun_attention and self.lossy:
            tainted = _attention.lossy_closure(self.bw.graph, set(self.lossy))
            try:
                reran = _attention.rerun_attention_forward(self.bw.graph, set(self.lossy), tainted)
            except _attention.AttentionRewriteError as e:
                raise RewriteError(str(e)) from e
            # Named: the lossy storages the re-run attentions read, and the storages replayed from lossy ones.
            names = {**{n: v for n, v in self.recomputed.items() if n in tainted}, **self.lossy}
            for n in reran:
                for root in _attention.ancestors(n.args[1:4]) & names.keys():
                    self.reran.update(names[root])
        for ph in list(self.bw_ph.values()):
            if ph.name in self.replace_out:
                if ph.users:
                    raise RewriteError(f"placeholder {ph.name} still has users after the rewrite")
                self.bw.graph.erase_node(ph)
        new_outs: list = []
        last_saved = max(
            (
                i
                for i, n in enumerate(self.outs)
                if i >= self.num_fwd_outputs and isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)
            ),
            default=len(self.outs) - 1,
        )
        for i, n in enumerate(self.outs):
            if i >= self.num_fwd_outputs and isinstance(n, fx.Node) and n.name in self.replace_out:
                new_outs.extend(self.replace_out[n.name])
            else:
                new_outs.append(n)
            if i == last_saved:
                new_outs.extend(self.extra_out)
        self.fw_out.args = (tuple(new_outs),)
        self.fw.graph.lint()
        self.bw.graph.lint()
        self.fw.recompile()
        self.bw.recompile()


def apply_plan(
    fw: fx.GraphModule,
    bw: fx.GraphModule,
    plan: GraphPlan,
    num_fwd_outputs: int,
    config: MesaConfig,
    facts: GraphFacts | None = None,
) -> set[str]:
    """Rewrite ``fw`` and ``bw`` in place as ``plan`` says. Raises :class:`RewriteError` on a contract mismatch.

    Args:
        facts: the facts the plan was made from; needed when the plan recomputes storages (their recipes).

    Returns:
        The saved tensors (names) whose rebuilt values feed an attention backward that re-runs its forward
        (``actpass.attention``, ``config.rerun_attention``).
    """
    rw = _Rewriter(fw, bw, num_fwd_outputs, config)
    by_root: dict[str, list[SavedTensor]] = {}
    for t in plan.tensors:
        if t.quantized or t.recomputed:
            if t.name not in rw.bw_ph or not any(
                isinstance(o, fx.Node) and o.name == t.name for o in rw.outs[num_fwd_outputs:]
            ):
                raise RewriteError(f"saved tensor {t.name} is not aligned between forward outputs and backward inputs")
            by_root.setdefault(t.tensor_id, []).append(t)
    storage_of: dict[str, StorageFacts] = {}
    if facts is not None:
        for f in facts.storages:
            storage_of[f.tensor_id] = f

    # Recomputed storages: drop them from the saved outputs; note what their recipes read.
    recomputed: list[tuple[list[SavedTensor], StorageFacts]] = []
    needed_by: dict[str, list[str]] = {}  # source root name -> tensor ids of recomputed storages reading it
    for tid, members in by_root.items():
        if not members[0].recomputed:
            continue
        f = storage_of.get(tid)
        if f is None or f.recipe is None:
            raise RewriteError(f"{tid} is planned for recompute but has no recipe")
        for t in members:
            rw.replace_out[t.name] = []
        recomputed.append((members, f))
        for s in f.recipe.sources:
            needed_by.setdefault(s, []).append(tid)

    # Where each recomputed storage is first needed in backward.
    need: dict[str, fx.Node | None] = {}
    for members, f in recomputed:
        need[f.tensor_id] = rw.first_use([t.name for t in members])

    def earliest(nodes):
        nodes = [n for n in nodes if n is not None]
        return min(nodes, key=lambda u: rw.order.get(u, len(rw.order))) if nodes else None

    # Quantized storages: quantize in forward; dequantize before the first use (or the first replay that reads it).
    for members in by_root.values():
        if not members[0].quantized:
            continue
        split = members[0].split is not None
        root, new_ph, qinfo = (rw.quantize_forward_split if split else rw.quantize_forward)(members)
        at = earliest([rw.first_use([t.name for t in members]), *(need[r] for r in needed_by.get(root.name, []))])
        if at is None:
            continue
        (rw.dequantize_backward_split if split else rw.dequantize_backward)(members, root, new_ph, qinfo, at)

    # Recomputed storages: replay the recipe just before the first use.
    for members, f in recomputed:
        at = need[f.tensor_id]
        if at is None:
            continue
        nodes = [rw.fw_nodes[n] for n in f.recipe.nodes]
        env: dict[fx.Node, object] = {}
        for s in f.recipe.sources:
            src = rw.fw_nodes[s]
            if s in rw.bw_value:
                env[src] = rw.bw_value[s]
            else:
                env[src] = rw.saved_placeholder(src)
        with bw.graph.inserting_before(at):
            rw.replay(nodes, env)
            root = rw.fw_nodes[f.root]
            rw.replay_members(members, root, env[root])  # type: ignore[arg-type]
            rw.recomputed[env[root]] = [t.name for t in members]  # type: ignore[index]
    rw.finish()
    return rw.reran


def inverse_perm(perm) -> list[int]:
    """The permutation that undoes ``perm`` (``x.permute(perm).permute(inverse_perm(perm))`` is ``x``)."""
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _strides_differ(val: torch.Tensor) -> bool:
    """Whether ``val``'s strides differ from a contiguous tensor's of its shape (so a contiguous clone is no no-op)."""
    return tuple(val.stride()) != tuple(make_contiguous_strides_for(val.shape))


def _qview_shape(t: SavedTensor, val: torch.Tensor) -> list[int] | None:
    """The grouping view a quantized storage is reshaped to before quantizing (channel chunks, row blocks)."""
    if t.chunk > 1:
        c = val.shape[-1]
        return [-1, c // t.chunk, t.chunk]
    if t.row_block > 1:
        return [-1, t.row_block * val.shape[-1]]
    return None


def _map(a, env: dict[fx.Node, object], syms: SymSource):
    if isinstance(a, (list, tuple)):
        return type(a)(_map(x, env, syms) for x in a)
    if isinstance(a, dict):
        return {k: _map(v, env, syms) for k, v in a.items()}
    if isinstance(a, fx.Node):
        if a in env:
            return env[a]
        if not isinstance(a.meta.get("val"), torch.SymInt) or not syms.can_emit(a):
            raise RewriteError(f"replayed op reads {a.name}, which backward does not have")
        return syms.emit(a, a.meta.get("val"))
    if isinstance(a, torch.SymInt):
        return syms.emit(a, a)
    return a


def _val(a):
    if isinstance(a, (list, tuple)):
        return type(a)(_val(x) for x in a)
    if isinstance(a, dict):
        return {k: _val(v) for k, v in a.items()}
    if isinstance(a, fx.Node):
        return a.meta["val"]
    return a


def _fake_call(step: fx.Node, args, kwargs):
    """The fake value of ``step`` replayed on new (fake) inputs, so strides follow the new inputs."""
    sval = step.meta.get("val")
    if step.target is operator.getitem:
        return _val(args[0])[args[1]]
    vals = sval if isinstance(sval, (list, tuple)) else [sval]
    mode = next((getattr(v, "fake_mode", None) for v in vals if isinstance(v, torch.Tensor)), None)
    if mode is None:
        mode = next((getattr(v, "fake_mode", None) for v in _flat(_val(args)) if isinstance(v, torch.Tensor)), None)
    if mode is None:
        raise RewriteError(f"cannot find the fake mode to replay {step.name}")
    with mode:
        return step.target(*_val(args), **_val(kwargs))


def _flat(x) -> list:
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in _flat(v)]
    return [x]
