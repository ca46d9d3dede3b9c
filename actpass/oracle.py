"""The partition-boundary oracle: what the backward *should* receive, computed in forward.

Why not eager saved-tensor hooks. Eager autograd saves a different set of tensors than the compiled min-cut
partition (the partitioner recomputes cheap ops in backward, and Inductor decomposes ops before partitioning), so an
eager hook that quantizes "what the plan chose" quantizes other tensors: it can only bound the error, not separate a
wiring bug from rounding.

What this does instead. :class:`actpass.backend.MesaBackend` with ``simulate=True`` runs the same Dynamo graph, the
same AOTAutograd joint graph, the same min-cut partition and the same :func:`~actpass.analysis.plan_graph`, then
calls :func:`simulate_plan` instead of ``rewrite.apply_plan``. It rewrites only the FORWARD graph: for every
quantized storage root ``R`` it inserts ``R_hat = actpass::fake_quantize(R, ...)`` (permute to memory order, chunk,
reference quantize, dequantize, back to ``R``'s shape and strides, in one opaque op), and every saved tensor of that
storage (``R`` itself or a view of it) leaves the forward graph as the same view ops replayed on ``R_hat``. The
backward graph is not touched: it receives, through the partition's own placeholders, exactly the values mesa's
backward must rebuild from codes.

Why it is tight. Both compiles compute the same forward value of ``R`` (same graph up to the inserted ops), so they
see the same codes; dequantize is ``code * scale + lo`` in fp32 in both. Mesa's backward then rebuilds the saved
tensors from the codes (placeholders, dequantize, permutes, view replay, symbolic sizes: everything
``rewrite.py`` adds), the oracle's backward gets them from forward. With ``inner="eager"`` the two backward graphs run
the same aten ops on the same values, so the gradients agree bit for bit unless the rewiring is wrong; with Inductor
they can differ by how Inductor compiles the slightly different graphs (float reassociation). Measured with
tools/fuzz.py: bit for bit on every graph, with ``inner="eager"`` and with Inductor once its layout optimization is
off (with it on, Inductor ran one conv backward channels-last in mesa's graph and not in the oracle's: 4.4e-4 apart
in fp16). A wiring bug (wrong placeholder, wrong view replay, wrong permutation/strides/dtype, wrong symbolic size)
replaces a saved tensor by a different tensor: an O(1) difference, not a rounding-sized one.

What it cannot see: a mistake in what both compiles share (the partition, ``plan_graph``, ``storage_root`` and
``view_chain``) is made identically by both; the bit-width bound against the exact gradients is the check for those.

Rounding modes and statistics:

* nearest rounding: ``_reference.quantize`` (independent of the compiled kernels, which match it bit for bit);
* stochastic rounding: the dispatching ``actpass::quantize`` op (kernel or reference) at the same position in the
  forward graph as mesa's ``quantize_saved``; its seed is drawn from the default generator, so with the same seed
  and the same sequence of random ops the oracle draws the same noise as mesa;
* running statistics: the plan's ``stats_key`` names an entry in the oracle backend's own store; fed the same
  inputs, the two stores evolve identically, so every step is tight (not only the first).

Recomputed tensors (planned, see :func:`_simulate_recompute`): a saved storage rebuilt in backward from other saved
storages/parameters by a short pointwise chain is simulated by replaying that chain in forward on the substituted
(``R_hat``) sources.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from actpass import _reference
from actpass import ops as _ops  # noqa: F401  (registers torch.ops.actpass)
from actpass import state as _state
from actpass.analysis import storage_root, view_chain
from actpass.config import MesaConfig, Rounding
from actpass.plan import Decision, GraphPlan, SavedTensor
from actpass.rewrite import RewriteError, _replay_val

log = logging.getLogger(__name__)
aten = torch.ops.aten

_LIB = torch.library.Library("actpass", "FRAGMENT")  # noqa: TOR901 - same namespace as ops.py, one more op
_LIB.define(
    "fake_quantize(Tensor x, int bits, int gend, int groups, int[]? perm, int chunk, bool stochastic, str key,"
    " float decay) -> Tensor"
)


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    gend: int,
    groups: int,
    perm: list[int] | None,
    chunk: int,
    stochastic: bool,
    key: str,
    decay: float,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` with the pass's grouping, returned in ``x``'s shape, dtype and strides.

    Mirrors what mesa does to a storage root: forward ``permute(perm)`` then (``chunk > 1``) view as
    ``[rows, C / chunk, chunk]``, quantize; backward dequantize, view back, inverse permute.

    Args:
        x: the storage root's value (dense).
        bits, gend, groups, perm, chunk: the plan record's fields.
        stochastic: stochastic rounding (uses the dispatching ``actpass::quantize`` op, see the module docstring).
        key: running-statistics entry ``"<store>/<entry>"``, or "" for per-step statistics.
        decay: EMA decay of running statistics.

    Returns:
        A new tensor with ``x``'s shape, dtype and strides.
    """
    y = x.permute(perm) if perm else x
    mshape = y.shape
    if chunk > 1:
        y = y.reshape(-1, mshape[-1] // chunk, chunk)
    running = _state.lookup(key, _reference.num_groups(y.shape, gend, groups), x.device) if key else None
    if stochastic:
        q, s, lo = torch.ops.actpass.quantize.default(y, bits, gend, groups, True, running, decay)
    else:
        q, s, lo = _reference.quantize(y, bits, gend, groups, False, running, decay)
    d = _reference.dequantize(q, s, lo, bits, gend, y.shape[-1], x.dtype).view(mshape)
    if perm:
        inv = [0] * len(perm)
        for i, p in enumerate(perm):
            inv[p] = i
        d = d.permute(inv)
    out = torch.empty_like(x)  # the fake's strides (empty_like keeps a dense tensor's layout)
    out.copy_(d)
    return out


def _fake_quantize_fake(x, bits, gend, groups, perm, chunk, stochastic, key, decay):
    return torch.empty_like(x)


_LIB.impl("fake_quantize", fake_quantize, "CompositeExplicitAutograd")
torch.library.register_fake("actpass::fake_quantize", _fake_quantize_fake, lib=_LIB)


class OracleError(RewriteError):
    """The plan holds something the oracle cannot simulate (the graph is then kept exact, like a failed rewrite)."""


def simulate_plan(
    fw: fx.GraphModule, bw: fx.GraphModule, plan: GraphPlan, num_fwd_outputs: int, config: MesaConfig
) -> None:
    """Rewrite ``fw`` in place so its saved outputs carry the values mesa's backward rebuilds; ``bw`` is unchanged.

    Args:
        fw: the partitioned forward graph.
        bw: the backward graph (only checked for alignment).
        plan: the plan ``plan_graph`` made for this pair.
        num_fwd_outputs: how many leading forward outputs are the user's.
        config: the policy (rounding, decay).

    Raises:
        OracleError: on a decision the oracle does not know, or graphs that do not match the plan.
    """
    fw_out = next(iter(fw.graph.find_nodes(op="output")))
    outs = list(fw_out.args[0])
    saved_pos = {n.name: i for i, n in enumerate(outs) if i >= num_fwd_outputs and isinstance(n, fx.Node)}
    bw_ph = {n.name for n in bw.graph.find_nodes(op="placeholder")}
    fw_nodes = {n.name: n for n in fw.graph.nodes}
    stochastic = config.rounding is Rounding.STOCHASTIC

    by_root: dict[str, list[SavedTensor]] = {}
    for t in plan.tensors:
        if t.decision is Decision.QUANTIZED:
            by_root.setdefault(t.tensor_id, []).append(t)
        elif t.decision is not Decision.KEPT:
            by_root.setdefault(t.tensor_id, []).append(t)
    # Storage root -> its substitute in forward: what backward must see in place of the root.
    subst: dict[fx.Node, fx.Node] = {}
    replace: dict[str, fx.Node] = {}
    pending_recompute: list[SavedTensor] = []
    for members in by_root.values():
        first = members[0]
        for t in members:
            if t.name not in saved_pos or t.name not in bw_ph:
                raise OracleError(f"saved tensor {t.name} is not aligned between forward outputs and backward inputs")
        if first.decision is not Decision.QUANTIZED:
            pending_recompute += members
            continue
        root = storage_root(fw_nodes[first.name])
        args = (
            root,
            first.bits,
            first.gend,
            first.groups,
            list(first.perm) if first.perm else None,
            first.chunk,
            stochastic,
            first.stats_key,
            config.decay,
        )
        # Right after the root, like mesa's quantize_saved: random ops (dropout, stochastic rounding) then draw from
        # the default generator in the same order in both compiles.
        with fw.graph.inserting_after(root):
            hat = fw.graph.call_function(torch.ops.actpass.fake_quantize.default, args)
        hat.meta["val"] = _fake_quantize_fake(root.meta["val"], *args[1:])
        subst[root] = hat

    # Saved views are replayed on the substitute at the end of forward (their size arguments exist by then).
    for members in by_root.values():
        if members[0].decision is not Decision.QUANTIZED:
            continue
        for t in members:
            node = fw_nodes[t.name]
            replace[t.name] = _replay_views(fw, node, subst[storage_root(node)], fw_out)

    for t in pending_recompute:
        replace[t.name] = _simulate_recompute(fw, t, subst, fw_nodes, fw_out)

    new_outs = [
        replace.get(n.name, n) if i >= num_fwd_outputs and isinstance(n, fx.Node) else n for i, n in enumerate(outs)
    ]
    fw_out.args = (tuple(new_outs),)
    fw.graph.lint()
    fw.recompile()


def _replay_views(fw: fx.GraphModule, node: fx.Node, hat: fx.Node, fw_out: fx.Node) -> fx.Node:
    """``node``'s view chain (from its storage root) replayed on ``hat``, inserted before the output node."""
    cur = hat
    for step in view_chain(node):
        with fw.graph.inserting_before(fw_out):
            new = fw.graph.node_copy(step, lambda a, prev=step.args[0], cur=cur: cur if a is prev else a)
        new.meta["val"] = _replay_val(step, new)
        cur = new
    return cur


def _simulate_recompute(
    fw: fx.GraphModule, t: SavedTensor, subst: dict[fx.Node, fx.Node], fw_nodes: dict[str, fx.Node], fw_out: fx.Node
) -> fx.Node:
    """The value backward rebuilds for a RECOMPUTED saved tensor, computed in forward (hook for the planner's records).

    TODO(recompute): once ``plan.SavedTensor`` carries the recipe, replay it here: for each node of the recipe's
    pointwise chain in forward order, ``fw.graph.node_copy(n, lambda a: env.get(a, a))`` (inserted before
    ``fw_out``) with ``env`` starting as ``subst`` (quantized sources -> their ``fake_quantize`` substitutes; kept
    sources and parameters map to themselves), then extend ``env`` with each copy; return the copy of the chain's
    last node, with the saved node's own view chain replayed on it (:func:`_replay_views`). Recompute from a source
    that is itself recomputed needs the sources simulated first (order records topologically).
    """
    raise OracleError(f"oracle cannot simulate decision {t.decision!r} of {t.name} yet")


def replay_chain(fw: fx.GraphModule, chain: list[fx.Node], env: dict[fx.Node, fx.Node], before: fx.Node) -> fx.Node:
    """Copy ``chain`` (forward nodes, in order) before ``before``, reading inputs through ``env``; the last copy.

    The building block :func:`_simulate_recompute` needs: ``env`` maps a source node to its substitute.
    """
    last = None
    for n in chain:
        with fw.graph.inserting_before(before):
            new = fw.graph.node_copy(n, lambda a: env.get(a, a))
        if n.target is operator.getitem or not isinstance(n.meta.get("val"), torch.Tensor):
            new.meta["val"] = n.meta.get("val")
        else:
            new.meta["val"] = n.meta["val"]  # same shape, dtype and strides: the chain is pointwise on equal inputs
        env[n] = new
        last = new
    if last is None:
        raise OracleError("empty recompute chain")
    return last
