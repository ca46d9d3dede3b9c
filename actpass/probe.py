"""Runtime-switchable fake quantization of the saved tensors of a compiled model, for measurements.

:class:`ProbeBackend` partitions and analyses graphs exactly as the mesa backend does, then rewrites only the
*forward* graph: every storage the planner could touch is routed through ``actpass_probe::qdq(x, r, key)`` before
it is saved, where ``key`` is its tensor id. What the op returns is looked up at run time in :data:`SPECS`:

* no entry / ``None``: ``x`` itself (exact);
* ``"recompute"``: ``r``, the storage rebuilt from its recipe's (probed) sources, as mesa's backward would;
* a callable: ``spec(x)``, e.g. :func:`qdq_fn` (reference quantize -> dequantize with a layout).

So one compilation serves any number of policies: set :data:`SPECS`, run a step, compare gradients. Numerically
this is what mesa computes: backward sees ``dequantize(quantize(x))`` (or the replayed recipe) in place of ``x``,
from the same forward values. Memory is not saved (the exact tensors stay alive): it is a measuring instrument.

Used by ``tools/measure_sensitivity.py`` and the policy search of ``tools/bench_convergence.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from actpass import attention as _attention
from actpass import ops as _ops  # noqa: F401
from actpass.analysis import GraphFacts, StorageFacts, gather_facts, view_chain
from actpass.backend import MesaBackend, activation_inputs
from actpass.plan import SavedTensor
from actpass.planner import Option, plan_graph

SPECS: dict[str, Any] = {}

_LIB = torch.library.Library("actpass_probe", "DEF")  # noqa: TOR901
_LIB.define("qdq(Tensor x, Tensor r, str key) -> Tensor")


def _qdq_impl(x: torch.Tensor, r: torch.Tensor, key: str) -> torch.Tensor:
    spec = SPECS.get(key)
    if spec is None:
        y = x
    elif isinstance(spec, str):
        if spec != "recompute":
            raise ValueError(f"unknown probe spec {spec!r} for {key}")
        y = r
    else:
        y = spec(x)
    out = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)
    out.copy_(y)
    return out


def _qdq_fake(x: torch.Tensor, r: torch.Tensor, key: str) -> torch.Tensor:
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)


_LIB.impl("qdq", _qdq_impl, "CompositeExplicitAutograd")
torch.library.register_fake("actpass_probe::qdq", _qdq_fake, lib=_LIB)


def qdq_fn(f: StorageFacts, opt: Option, zero_preserve: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """Quantize -> dequantize ``f``'s root exactly as the planner's option ``opt`` would store it."""
    if opt.bits == 1:  # a bool mask packed to bits: lossless
        return lambda x: x
    if opt.bits == 16:  # half precision
        return lambda x: x.to(torch.float16).to(x.dtype)
    if getattr(opt, "code", "uniform") == "sqrt":  # square-root companded codes (actpass.fused)
        from actpass import fused

        def companded(x: torch.Tensor) -> torch.Tensor:
            q, s, lo = fused.sqrt_quantize_math(x, opt.bits)
            return fused.sqrt_dequantize_math(q, s, lo, opt.bits, x.shape[-1], x.dtype)

        return companded
    perm = f.perm

    def fn(x: torch.Tensor) -> torch.Tensor:
        y = x.permute(perm) if perm else x
        pshape = y.shape
        if opt.chunk > 1:
            y = y.reshape(-1, pshape[-1] // opt.chunk, opt.chunk)
        elif opt.row_block > 1:
            y = y.reshape(-1, opt.row_block * pshape[-1])
        y = y.contiguous()
        if zero_preserve:
            q, s, lo = torch.ops.actpass.quantize(y, opt.bits, opt.gend, opt.groups, False, None, 0.9)
            d = torch.ops.actpass.dequantize(q, s, lo, opt.bits, opt.gend, y.shape[-1], x.dtype)
        else:
            d = _qdq_no_zero_preserve(y, opt.bits, opt.gend, opt.groups).to(x.dtype)
        d = d.reshape(pshape)
        if perm:
            inv = [0] * len(perm)
            for i, p in enumerate(perm):
                inv[p] = i
            d = d.permute(inv)
        return d

    return fn


def split_qdq_fn(t: SavedTensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A split storage (``t.split``) as backward rebuilds it: memory order, the leading rows as the split says
    (exact or codes of their own), the rest as the record says, concatenated and permuted back (the oracle's
    ``_split_hat``, run eagerly, on the same ``oracle.split_parts``)."""
    from actpass import oracle  # also registers actpass::fake_quantize
    from actpass.rewrite import inverse_perm

    def fn(x: torch.Tensor) -> torch.Tensor:
        y = x.permute(t.perm) if t.perm else x
        pieces = []
        for start, end, args in oracle.split_parts(t, y.shape[0]):
            ys = y[start:end].contiguous()
            pieces.append(ys if args is None else torch.ops.actpass.fake_quantize(ys, *args, False, "", 0.9))
        d = torch.cat(pieces, 0)
        return d.permute(inverse_perm(t.perm)) if t.perm else d

    return fn


def _qdq_no_zero_preserve(x: torch.Tensor, bits: int, gend: int, groups: int) -> torch.Tensor:
    """The reference quantizer without the zero-preserving rule (plain round-to-nearest affine codes)."""
    from actpass import _reference

    lo, hi = _reference.group_range(x, gend, groups)
    scale = _reference.scale_of(lo, hi, bits)
    runs, g = _reference._as_runs(x.float(), gend, groups)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    c = torch.floor((runs - lo.view(1, g, 1)) * inv.view(1, g, 1) + 0.5).clamp_(0, 2**bits - 1)
    return (c * scale.view(1, g, 1) + lo.view(1, g, 1)).reshape(x.shape)


class ProbeBackend(MesaBackend):
    """Mesa's partition and analysis, with the saved tensors routed through :data:`SPECS` (see the module doc).

    Attributes:
        facts: one :class:`~actpass.analysis.GraphFacts` per compiled graph pair.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.facts: list[GraphFacts] = _Unpickled()
        # Never through AOTAutograd's cache: an entry is keyed by the pass and the config, not by this subclass, so a
        # hit would serve mesa's real rewrite (and this backend would record no facts).
        self.keep_graphs = True

    def _rewrite(self, fw, bw, num_fwd_outputs, *, is_body, key_prefix, input_names=None, **_kw):  # noqa: D401
        facts = gather_facts(fw, num_fwd_outputs, bw, activation_inputs=activation_inputs(input_names))
        self.facts.append(facts)
        self.plans.append(plan_graph(facts, self.config, graph_id=len(self.plans)))
        if is_body:
            return
        graph = fw.graph
        nodes = {n.name: n for n in graph.nodes}
        out = next(iter(graph.find_nodes(op="output")))
        outs = list(out.args[0])
        probed: dict[fx.Node, fx.Node] = {}
        replaced: dict[str, fx.Node] = {}
        storages = sorted(facts.storages, key=lambda s: s.position)
        for f in storages:
            if f.fixed is not None:
                continue
            root = nodes[f.root]
            anchor = root
            r = root
            if f.recipe is not None:
                env: dict[fx.Node, fx.Node] = {}
                for s in f.recipe.sources:
                    src = nodes[s]
                    env[src] = probed.get(src, src)
                for name in f.recipe.nodes:
                    n = nodes[name]
                    with graph.inserting_after(anchor):
                        new = graph.call_function(n.target, _remap(n.args, env), _remap(n.kwargs, env))
                    new.meta.update(n.meta)
                    env[n] = new
                    anchor = new
                r = env[root]
            with graph.inserting_after(anchor):
                p = graph.call_function(torch.ops.actpass_probe.qdq.default, (root, r, f.tensor_id))
            p.meta["val"] = root.meta["val"]
            probed[root] = p
            anchor = p
            for m in f.members:
                mnode = nodes[m]
                if mnode is root:
                    replaced[m] = p
                    continue
                env2: dict[fx.Node, fx.Node] = {root: p}
                for step in view_chain(mnode):
                    with graph.inserting_after(anchor):
                        new = graph.call_function(step.target, _remap(step.args, env2), _remap(step.kwargs, env2))
                    new.meta.update(step.meta)
                    env2[step] = new
                    anchor = new
                replaced[m] = env2[mnode]
        out.args = (
            tuple(
                replaced.get(n.name, n) if i >= num_fwd_outputs and isinstance(n, fx.Node) else n
                for i, n in enumerate(outs)
            ),
        )
        graph.lint()
        fw.recompile()
        if self.config.rerun_attention:
            # As mesa's backward does where q/k/v are lossy (actpass.attention): every probed storage may be.
            _attention.rerun_for_substitutes(graph, bw, set(probed.values()), replaced)

    def storages(self, graph: int = 0) -> list[StorageFacts]:
        """The probed storages of compiled graph ``graph``."""
        return [f for f in self.facts[graph].storages if f.fixed is None]


class _Unpickled(list):
    """A list that pickles and deep-copies as empty: Inductor hashes its config, which holds the partitioner and so
    this backend; the facts hold FX nodes with fake tensors, which cannot be pickled."""

    def __reduce__(self):
        return (list, ())

    def __deepcopy__(self, memo):
        return []


def _remap(a, env):
    if isinstance(a, (list, tuple)):
        return type(a)(_remap(x, env) for x in a)
    if isinstance(a, dict):
        return {k: _remap(v, env) for k, v in a.items()}
    if isinstance(a, fx.Node):
        return env.get(a, a)
    return a


def step_error(
    specs: dict[str, Any], grads: Callable[[], dict[str, torch.Tensor]], exact: dict[str, torch.Tensor]
) -> float:
    """Run ``grads()`` (one step, returning parameter gradients) under ``specs`` and return its
    :func:`global_rel_err` against ``exact``; :data:`SPECS` is empty again afterwards."""
    SPECS.clear()
    SPECS.update(specs)
    try:
        return global_rel_err(grads(), exact)
    finally:
        SPECS.clear()


def global_rel_err(g: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """``||g - ref|| / ||ref||`` over every parameter gradient."""
    num = sum(float((g[k].float() - ref[k].float()).pow(2).sum()) for k in ref)
    den = sum(float(ref[k].float().pow(2).sum()) for k in ref)
    return math.sqrt(num / den) if den else 0.0


__all__ = ["SPECS", "ProbeBackend", "global_rel_err", "qdq_fn", "step_error"]
