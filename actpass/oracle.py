"""The partition-boundary oracle: what the backward *should* receive, computed in forward.

Why not eager saved-tensor hooks. Eager autograd saves a different set of tensors than the compiled min-cut
partition (the partitioner recomputes cheap ops in backward, and Inductor decomposes ops before partitioning), so an
eager hook that quantizes "what the plan chose" quantizes other tensors: it can only bound the error, not separate a
wiring bug from rounding.

What this does instead. :class:`actpass.backend.MesaBackend` with ``simulate=True`` runs the same Dynamo graph, the
same AOTAutograd joint graph, the same min-cut partition, the same :func:`~actpass.analysis.gather_facts` and
:func:`~actpass.planner.plan_graph`, then calls :func:`simulate_plan` instead of ``rewrite.apply_plan``. It rewrites
only the FORWARD graph, and hands backward, through the partition's own placeholders, exactly the values mesa's
backward must rebuild. Per decision of a saved storage with root ``R``:

* quantized to 8/4/2 bits: ``R_hat = actpass::fake_quantize(R, ...)`` (permute to memory order, the grouping view of
  channel chunks ``[rows, C/chunk, chunk]`` or row blocks ``[rows/row_block, row_block*C]``, quantize, dequantize,
  view back, inverse permute: one opaque op, in ``R``'s shape, dtype and strides);
* 16 bits (half precision): the same op casts to float16 and back;
* square-root companded codes (``code="sqrt"``): ``actpass::fake_quantize_sqrt``, the same math eagerly;
* 1 bit (a bool mask packed to bits, or a two-valued float mask, ``code='select'``; lossless): nothing; backward
  must see the mask itself;
* recomputed: the storage's recipe (``analysis.Recipe``: a short pointwise chain) replayed at the end of forward on
  its sources as backward has them: the ``R_hat`` of quantized sources, kept sources and parameters as they are;
* kept: nothing.

Every saved tensor of a storage (``R`` itself or a view of it) then leaves the forward graph as the same view ops
replayed on the substitute. The backward graph is touched in one way only: a fused attention whose q, k or v it
receives lossy gets its forward re-run on them (``actpass.attention``, as mesa's backward does; which inputs are lossy
is read off the oracle's own forward graph).

Why it is tight. Both compiles compute the same forward value of ``R`` (same graph up to the inserted ops), so they
see the same codes; dequantize is ``code * scale + lo`` in fp32 in both, and a recipe replays the same aten ops on
the same values. Mesa's backward rebuilds the saved tensors itself (placeholders, dequantize, permutes, grouping
views, view replay, recipes, symbolic sizes: everything ``rewrite.py`` adds); the oracle's backward gets them from
forward. With ``inner="eager"`` the two backward graphs run the same aten ops on the same values, so the gradients
agree bit for bit unless the rewiring is wrong; with Inductor they can differ by how Inductor compiles the slightly
different graphs (float reassociation, and fp32 intermediates kept inside fused low-precision kernels). A wiring bug
(wrong placeholder, wrong view replay, wrong permutation/strides/dtype, wrong symbolic size, a recipe replayed on the
wrong source) replaces a saved tensor by a different tensor: an O(1) difference, not a rounding-sized one.

What it cannot see: a mistake in what both compiles share (the partition, the facts and the plan, ``storage_root``,
``view_chain`` and the recipes themselves) is made identically by both; the bit-width bound against the exact
gradients is the check for those.

Rounding modes and statistics:

* nearest rounding: ``_reference.quantize`` (independent of the compiled kernels and of the fused aten ops, which
  match it bit for bit);
* stochastic rounding: the dispatching ``actpass::quantize`` op (kernel or reference) at the same position in the
  forward graph as mesa's ``quantize_saved`` (right after the root; after the last graph input for an activation
  handed over by a graph break); its seed is drawn from the default generator, so with the same seed and the same
  sequence of random ops the oracle draws the same noise as mesa;
* running statistics: the plan's ``stats_key`` names an entry in the oracle backend's own store; fed the same
  inputs, the two stores evolve identically, so every step is tight (not only the first).
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from actpass import _reference
from actpass import attention as _attention
from actpass import fused as _fused
from actpass import ops as _ops  # noqa: F401  (registers torch.ops.actpass)
from actpass import state as _state
from actpass.analysis import GraphFacts, StorageFacts, storage_root, view_chain
from actpass.config import MesaConfig, Rounding
from actpass.plan import Decision, GraphPlan, SavedTensor
from actpass.rewrite import RewriteError, _fake_call, inverse_perm

log = logging.getLogger(__name__)
aten = torch.ops.aten

_LIB = torch.library.Library("actpass", "FRAGMENT")  # noqa: TOR901 - same namespace as ops.py, one more op
_LIB.define(
    "fake_quantize(Tensor x, int bits, int gend, int groups, int[]? perm, int chunk, int row_block, bool stochastic,"
    " str key, float decay) -> Tensor"
)


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    gend: int,
    groups: int,
    perm: list[int] | None,
    chunk: int,
    row_block: int,
    stochastic: bool,
    key: str,
    decay: float,
) -> torch.Tensor:
    """What mesa's backward rebuilds from a quantized storage root, returned in ``x``'s shape, dtype and strides.

    Mirrors ``rewrite._Rewriter``: forward ``permute(perm)``, then the grouping view (``chunk > 1``:
    ``[rows, C / chunk, chunk]``; ``row_block > 1``: ``[rows / row_block, row_block * C]``), quantize; backward
    dequantize, view back, inverse permute. ``bits=16`` is a cast to float16 and back.

    Args:
        x: the storage root's value (dense).
        bits, gend, groups, perm, chunk, row_block: the plan record's fields.
        stochastic: stochastic rounding (uses the dispatching ``actpass::quantize`` op, see the module docstring).
        key: running-statistics entry ``"<store>/<entry>"``, or "" for per-step statistics.
        decay: EMA decay of running statistics.

    Returns:
        A new tensor with ``x``'s shape, dtype and strides.
    """
    y = x.permute(perm) if perm else x
    mshape = y.shape
    if bits == 16:
        d = y.to(torch.float16).to(x.dtype)
    else:
        if chunk > 1:
            y = y.reshape(-1, mshape[-1] // chunk, chunk)
        elif row_block > 1:
            y = y.reshape(-1, row_block * mshape[-1])
        running = _state.lookup(key, _reference.num_groups(y.shape, gend, groups), x.device) if key else None
        if stochastic:
            q, s, lo = torch.ops.actpass.quantize.default(y, bits, gend, groups, True, running, decay)
        else:
            q, s, lo = _reference.quantize(y, bits, gend, groups, False, running, decay)
        d = _reference.dequantize(q, s, lo, bits, gend, y.shape[-1], x.dtype).view(mshape)
    if perm:
        d = d.permute(inverse_perm(perm))
    out = torch.empty_like(x)  # the fake's strides (empty_like keeps a dense tensor's layout)
    out.copy_(d)
    return out


def _fake_quantize_fake(x, bits, gend, groups, perm, chunk, row_block, stochastic, key, decay):
    return torch.empty_like(x)


_LIB.impl("fake_quantize", fake_quantize, "CompositeExplicitAutograd")
torch.library.register_fake("actpass::fake_quantize", _fake_quantize_fake, lib=_LIB)

_LIB.define("fake_quantize_sqrt(Tensor x, int bits) -> Tensor")


def fake_quantize_sqrt(x: torch.Tensor, bits: int) -> torch.Tensor:
    """What mesa's backward rebuilds from square-root companded codes (``fused.sqrt_quantize_math``), in ``x``'s
    shape, dtype and strides: the same functions mesa traces into its graphs, run eagerly."""
    q, s, lo = _fused.sqrt_quantize_math(x, bits)
    out = torch.empty_like(x)
    out.copy_(_fused.sqrt_dequantize_math(q, s, lo, bits, x.shape[-1], x.dtype))
    return out


_LIB.impl("fake_quantize_sqrt", fake_quantize_sqrt, "CompositeExplicitAutograd")
torch.library.register_fake("actpass::fake_quantize_sqrt", lambda x, bits: torch.empty_like(x), lib=_LIB)


class OracleError(RewriteError):
    """The plan holds something the oracle cannot simulate (the graph is then kept exact, like a failed rewrite)."""


def simulate_plan(
    fw: fx.GraphModule,
    bw: fx.GraphModule,
    plan: GraphPlan,
    num_fwd_outputs: int,
    config: MesaConfig,
    facts: GraphFacts | None = None,
) -> set[str]:
    """Rewrite ``fw`` in place so its saved outputs carry the values mesa's backward rebuilds; ``bw`` changes only
    where a fused attention re-runs its forward on lossy q/k/v.

    Args:
        fw: the partitioned forward graph.
        bw: the backward graph (checked for alignment; attention re-runs, see the module doc).
        plan: the plan ``planner.plan_graph`` made for this pair.
        num_fwd_outputs: how many leading forward outputs are the user's.
        config: the policy (rounding, decay).
        facts: the facts the plan was made from (the recipes of recomputed storages).

    Returns:
        The saved tensors (names) of the storages whose substitutes feed an attention given a re-run forward.

    Raises:
        OracleError: on a decision the oracle does not know, or graphs that do not match the plan.
    """
    fw_out = next(iter(fw.graph.find_nodes(op="output")))
    outs = list(fw_out.args[0])
    saved = {n.name for i, n in enumerate(outs) if i >= num_fwd_outputs and isinstance(n, fx.Node)}
    bw_ph = {n.name for n in bw.graph.find_nodes(op="placeholder")}
    fw_nodes = {n.name: n for n in fw.graph.nodes}
    stochastic = config.rounding is Rounding.STOCHASTIC
    storage_of: dict[str, StorageFacts] = {f.tensor_id: f for f in facts.storages} if facts is not None else {}

    by_root: dict[str, list[SavedTensor]] = {}
    for t in plan.tensors:
        if t.quantized or t.recomputed:
            if t.name not in saved or t.name not in bw_ph:
                raise OracleError(f"saved tensor {t.name} is not aligned between forward outputs and backward inputs")
            by_root.setdefault(t.tensor_id, []).append(t)
        elif t.decision is not Decision.KEPT:
            raise OracleError(f"oracle cannot simulate decision {t.decision!r} of {t.name}")

    # Storage root -> its substitute in forward: what backward must see in place of the root.
    subst: dict[fx.Node, fx.Node] = {}
    last_input = list(fw.graph.find_nodes(op="placeholder"))[-1:]
    for members in by_root.values():
        first = members[0]
        if not first.quantized:
            continue
        root = storage_root(fw_nodes[first.name])
        if first.bits == 1:
            continue  # a bool mask packed to bits: lossless, backward must see the mask itself
        if first.bits not in (2, 4, 8, 16):
            raise OracleError(f"oracle cannot simulate {first.bits}-bit storage of {first.name}")
        anchor = last_input[0] if root.op == "placeholder" and last_input else root
        if first.split is not None:
            subst[root] = _split_hat(fw, root, first, anchor, stochastic, config.decay)
            continue
        if first.code == "sqrt":
            op, args = torch.ops.actpass.fake_quantize_sqrt.default, (root, first.bits)
        else:
            op = torch.ops.actpass.fake_quantize.default
            args = (
                root,
                first.bits,
                first.gend if first.gend is not None else 0,
                first.groups if first.groups is not None else -1,
                list(first.perm) if first.perm else None,
                first.chunk,
                first.row_block,
                stochastic,
                first.stats_key,
                config.decay,
            )
        # Where mesa's quantize_saved goes: right after the root (after the last graph input for a handed-over
        # activation), so random ops (dropout, stochastic rounding) draw from the default generator in the same order.
        with fw.graph.inserting_after(anchor):
            hat = fw.graph.call_function(op, args)
        hat.meta["val"] = torch.empty_like(root.meta["val"])  # the fakes of both ops: x's shape, dtype and strides
        subst[root] = hat

    # Recomputed storages: their recipes replayed on the sources as backward has them. The planner never recomputes
    # from a recomputed storage, so one pass in forward order suffices.
    for tid, members in by_root.items():
        if not members[0].recomputed:
            continue
        f = storage_of.get(tid)
        if f is None or f.recipe is None:
            raise OracleError(f"{tid} is planned for recompute but has no recipe")
        env: dict[fx.Node, fx.Node] = {}
        for s in f.recipe.sources:
            src = fw_nodes[s]
            env[src] = subst.get(src, src)
        root = fw_nodes[f.root]
        if root in env:
            raise OracleError(f"{tid}: the recipe reads the storage it rebuilds")
        subst[root] = replay_chain(fw, [fw_nodes[n] for n in f.recipe.nodes], env, fw_out)

    # Saved tensors leave forward as their view chains replayed on the substitute (their size arguments exist by then).
    replace: dict[str, fx.Node] = {}
    for members in by_root.values():
        for t in members:
            node = fw_nodes[t.name]
            root = storage_root(node)
            if root not in subst:
                continue  # lossless
            replace[t.name] = subst[root] if node is root else _replay_views(fw, node, subst[root], fw_out)

    new_outs = [
        replace.get(n.name, n) if i >= num_fwd_outputs and isinstance(n, fx.Node) else n for i, n in enumerate(outs)
    ]
    fw_out.args = (tuple(new_outs),)
    fw.graph.lint()
    fw.recompile()

    # A fused attention whose q/k/v backward receives lossy re-runs its forward there (config.rerun_attention): which
    # saved tensors are lossy is read off this forward graph (computed from a fake_quantize or cast substitute).
    if config.rerun_attention:
        hats = {subst.get(storage_root(fw_nodes[m[0].name])) for m in by_root.values() if m[0].quantized}
        reran, lossy = _attention.rerun_for_substitutes(fw.graph, bw, {h for h in hats if h is not None}, replace)
        if reran:
            by_name = {t.name: t.tensor_id for t in plan.tensors}
            tids = {by_name[n.name] for r in reran for n in _attention.ancestors(r.args[1:4]) & lossy}
            return {t.name for t in plan.tensors if t.tensor_id in tids and (t.quantized or t.recomputed)}
    return set()


def split_parts(t: SavedTensor, n: int) -> list[tuple[int, int, tuple | None]]:
    """The two parts of a split storage (``t.split``) with ``n`` rows in memory order: ``(start, end, args)``, with
    ``args`` the part's ``(bits, gend, groups, perm, chunk, row_block)`` for ``actpass::fake_quantize`` (perm None:
    the rows are already in memory order), or None for rows stored exactly."""
    split = t.split
    assert split is not None
    out = []
    for bits, gend, groups, chunk, row_block, start, end in (
        (split.bits, split.gend, split.groups, split.chunk, split.row_block, 0, split.rows),
        (t.bits, t.gend, t.groups, t.chunk, t.row_block, split.rows, n),
    ):
        args = None if bits is None else (bits, gend or 0, -1 if groups is None else groups, None, chunk, row_block)
        out.append((start, end, args))
    return out


def _split_hat(fw: fx.GraphModule, root: fx.Node, t: SavedTensor, anchor: fx.Node, stochastic: bool, decay: float):
    """A split storage (``t.split``) as backward rebuilds it: memory order, the leading rows as the split says (exact
    or fake-quantized), the rest as the record says, concatenated and permuted back; inserted after ``anchor``."""
    assert t.split is not None
    g = fw.graph
    rval = root.meta["val"]
    nodes: list[fx.Node] = []

    def add(target, args) -> fx.Node:
        with g.inserting_after(nodes[-1] if nodes else anchor):
            node = g.call_function(target, args)
        with rval.fake_mode:
            node.meta["val"] = target(*fx.node.map_arg(args, lambda a: a.meta["val"]))
        nodes.append(node)
        return node

    x = add(aten.permute.default, (root, list(t.perm))) if t.perm else root
    xval = rval.permute(t.perm) if t.perm else rval
    n = int(xval.shape[0])
    pieces = []
    for start, end, args in split_parts(t, n):
        xs = add(aten.slice.Tensor, (x, 0, start, end))
        pieces.append(
            xs if args is None else add(torch.ops.actpass.fake_quantize.default, (xs, *args, stochastic, "", decay))
        )
    hat = add(aten.cat.default, (pieces, 0))
    if t.perm:
        hat = add(aten.permute.default, (hat, inverse_perm(t.perm)))
    return hat


def _replay_views(fw: fx.GraphModule, node: fx.Node, hat: fx.Node, fw_out: fx.Node) -> fx.Node:
    """``node``'s view chain (from its storage root) replayed on ``hat``, inserted before the output node."""
    return replay_chain(fw, view_chain(node), {storage_root(node): hat}, fw_out)


def replay_chain(fw: fx.GraphModule, chain: list[fx.Node], env: dict[fx.Node, fx.Node], before: fx.Node) -> fx.Node:
    """Copy ``chain`` (forward nodes, in order) before ``before``, reading inputs through ``env``; the last copy.

    Each copy's fake value is recomputed on its new inputs (``rewrite._fake_call``), so strides follow them.
    """
    last = None
    for n in chain:
        with fw.graph.inserting_before(before):
            new = fw.graph.node_copy(n, lambda a: env.get(a, a))
        new.meta["val"] = _fake_call(n, new.args, new.kwargs)
        env[n] = new
        last = new
    if last is None:
        raise OracleError("empty chain to replay")
    return last
