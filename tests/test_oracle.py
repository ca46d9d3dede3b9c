"""The partition-boundary oracle (actpass/oracle.py): it agrees with mesa bit for bit, and it catches rewiring bugs.

The bugs are injected into mesa's backward graph after ``rewrite.apply_plan``: a dequantized tensor scaled by 1%
(quantization-sized: the bit-width bound against exact eager cannot see it), two saved tensors' codes swapped, a
dequantized tensor flipped along its last dim (a wrong permutation or stride). The oracle, which runs the same
partition and plan but hands backward ``dequantize(quantize(R))`` from forward, must flag each one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx

import actpass.backend as backend_mod
from actpass.analysis import is_view_node, storage_root
from actpass.backend import MesaBackend
from actpass.oracle import fake_quantize
from actpass.plan import Decision
from actpass.state import RunningStats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz  # noqa: E402
import fuzzgen  # noqa: E402

DQ = torch.ops.actpass.dequantize.default


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _program(**changes) -> fuzzgen.Program:
    """Two identical MLP blocks and an attention block: saved tensors of equal shapes, views, per-head layouts."""
    mlp = dict(
        kind="mlp", norm="ln", act="gelu", ratio=2, gated=False, bias=True, residual=True, dropout=0.0, aux=False
    )
    attn = dict(
        kind="attn",
        norm="none",
        heads=2,
        kv_heads=2,
        head_dim=8,
        qkv="fused_unbind",
        impl="sdpa",
        mask="none",
        probs="softmax",
        merge="transpose_reshape",
        gqa="expand",
        residual=True,
        dropout=0.0,
        aux=False,
    )
    prog = fuzzgen.Program(
        seed=5,
        batch=2,
        seq=16,
        dim=16,
        stem={"kind": "features", "in": 7, "bias": True},
        blocks=[mlp, dict(mlp), attn],
        head={"kind": "out", "pool": "none", "norm": "none", "classes": 3},
    )
    for k, v in changes.items():
        setattr(prog, k, v)
    return prog


def _inject(monkeypatch, mutate) -> None:
    real = backend_mod.apply_plan

    def patched(fw, bw, plan, num_fwd_outputs, config, facts=None):
        reran = real(fw, bw, plan, num_fwd_outputs, config, facts)
        mutate(bw)
        bw.graph.lint()
        bw.recompile()
        return reran

    monkeypatch.setattr(backend_mod, "apply_plan", patched)


def _after_dequantize(bw: fx.GraphModule, make, which=lambda nodes: nodes) -> None:
    for d in which([n for n in bw.graph.nodes if n.target is DQ]):
        with bw.graph.inserting_after(d):
            new = make(bw.graph, d)
        new.meta["val"] = d.meta["val"]
        d.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)


def _scale(bw: fx.GraphModule) -> None:
    _after_dequantize(bw, lambda g, d: g.call_function(torch.ops.aten.mul.Tensor, (d, 1.01)))


def _flip(bw: fx.GraphModule) -> None:
    def first_wide(nodes):
        return [n for n in nodes if n.meta["val"].shape[-1] > 1][:1]

    _after_dequantize(bw, lambda g, d: g.call_function(torch.ops.aten.flip.default, (d, [-1])), first_wide)


def _swap(bw: fx.GraphModule) -> None:
    deqs = [n for n in bw.graph.nodes if n.target is DQ]
    for i, a in enumerate(deqs):
        for b in deqs[i + 1 :]:
            same = a.meta["val"].shape == b.meta["val"].shape and a.args[3:] == b.args[3:]
            same = same and all(
                x.meta["val"].shape == y.meta["val"].shape for x, y in zip(a.args[:3], b.args[:3], strict=True)
            )
            if same:
                # b's codes must exist where a reads them: both placeholders, so any order works.
                a.args, b.args = (*b.args[:3], *a.args[3:]), (*a.args[:3], *b.args[3:])
                return
    raise AssertionError("no two interchangeable dequantize nodes in the backward graph")


def test_oracle_matches_mesa_bit_for_bit_and_differs_from_exact():
    prog = _program()
    out = fuzz.check(prog, fuzz.Setup(inner="eager"))
    assert out.kind is None, out.detail
    assert out.errs["tight"] == 0.0
    assert out.errs["fwd"] == 0.0
    assert 1e-4 < out.errs["oracle_exact"] < 0.02  # it quantizes: 8-bit error, not zero
    assert out.coverage["decision"]["quantized"] >= 6


@pytest.mark.parametrize("mutate", [_scale, _flip, _swap], ids=["scale-1%", "flip", "swap-codes"])
def test_oracle_catches_injected_rewiring(monkeypatch, mutate):
    prog = _program()
    setup = fuzz.Setup(inner="eager")
    _inject(monkeypatch, mutate)
    out = fuzz.check(prog, setup)
    assert out.kind == "wiring", (out.kind, out.detail)


def test_scaled_dequantize_is_invisible_to_the_bit_width_bound(monkeypatch):
    """A 1% error on every dequantized tensor stays within the 8-bit bound against exact eager; the oracle sees it."""
    prog = _program()
    src = fuzzgen.source(prog)
    _inject(monkeypatch, _scale)
    cfg = fuzz.Setup(inner="eager").config()
    mesa = fuzz._train(prog, src, MesaBackend(cfg, store=RunningStats()), 1)[0]
    eager = fuzz._train(prog, src, None, 1)[0]
    oracle = fuzz._train(prog, src, MesaBackend(cfg, store=RunningStats(), simulate=True), 1)[0]
    assert fuzz._global_rel(mesa.grads, eager.grads) < fuzz.BOUND[8] / 2
    assert max(fuzz.rel(mesa.grads[k], oracle.grads[k]) for k in oracle.grads) > 1e3 * fuzz.TIGHT["fp32"]


def test_oracle_rewrites_only_forward():
    """Same plan as mesa; forward outputs carry fake_quantize values; the backward graph is left as partitioned."""
    prog = _program()
    src = fuzzgen.source(prog)
    cfg = fuzz.Setup(inner="eager").config()
    orc = MesaBackend(cfg, store=RunningStats(), simulate=True, keep_graphs=True)
    model = fuzzgen.build(prog, src)
    inp, target = fuzzgen.make_inputs(prog)
    fuzz.harness_loss(torch.compile(model, backend=orc)(inp, target)).backward()
    (fw, bw), plan = orc.graphs[0], orc.plans[0]
    fq = [n for n in fw.graph.nodes if n.target is torch.ops.actpass.fake_quantize.default]
    roots = {t.tensor_id for t in plan.tensors if t.decision is Decision.QUANTIZED}
    assert len(fq) == len(roots) >= 6
    assert not [
        n for n in bw.graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", "") == "actpass"
    ]
    views = [t for t in plan.quantized if "shares storage" in t.detail]
    assert views, "the attention block saves views of one storage (q, k, v of the fused projection)"
    # Each saved view leaves forward as the same view ops replayed on the substitute (through unbind's getitem).
    outs = next(iter(fw.graph.find_nodes(op="output"))).args[0]
    replayed = [n for n in outs if isinstance(n, fx.Node) and is_view_node(n) and storage_root(n) in fq]
    assert len(replayed) >= len(views)


@pytest.mark.parametrize("perm,chunk,row_block", [(None, 1, 1), ((0, 2, 1), 1, 1), (None, 4, 1), ((1, 0, 2), 2, 1),
                                                  (None, 1, 4), (None, 1, 8)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_is_what_mesa_stores(perm, chunk, row_block, dtype):
    """fake_quantize = the backward's dequantize(view/permute back) of the forward's quantize(permute/grouping view)."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 16).to(dtype)
    if perm:
        x = x.permute(perm).contiguous().permute([perm.index(i) for i in range(3)])  # dense, memory order = perm
    y = x.permute(perm) if perm else x
    shape = y.shape
    if chunk > 1:
        gend, groups, yq = 2, shape[-1] // chunk, y.reshape(-1, shape[-1] // chunk, chunk)
    elif row_block > 1:
        gend, groups, yq = 1, -1, y.reshape(-1, row_block * shape[-1])
    else:
        gend, groups, yq = 2, -1, y
    q, s, lo = torch.ops.actpass.quantize(yq, 8, gend, groups, False, None, 0.9)
    ref = torch.ops.actpass.dequantize(q, s, lo, 8, gend, yq.shape[-1], dtype).view(shape)
    if perm:
        ref = ref.permute([perm.index(i) for i in range(3)])
    out = fake_quantize(x, 8, gend, groups, list(perm) if perm else None, chunk, row_block, False, "", 0.9)
    assert out.dtype == x.dtype and out.stride() == x.stride()
    assert torch.equal(out, ref)
    assert not torch.equal(out, x)


def test_fake_quantize_half_precision():
    """bits=16 is the rewrite's cast to float16 and back (probabilities stored as half)."""
    x = torch.rand(2, 3, 5, 5).permute(0, 2, 1, 3)
    out = fake_quantize(x, 16, 0, -1, [0, 2, 1, 3], 1, 1, False, "", 0.9)
    assert out.stride() == x.stride()
    assert torch.equal(out, x.half().float())
    assert not torch.equal(out, x)


def _recompute_scaled(monkeypatch) -> None:
    """Mesa's backward rebuilds every recomputed storage 1% too large (a recipe replayed on a wrong value)."""
    from actpass import rewrite

    real = rewrite._Rewriter.replay_members

    def patched(self, members, root, y):
        if members[0].recomputed:
            with self.bw.graph.inserting_after(y):
                z = self.bw.graph.call_function(torch.ops.aten.mul.Tensor, (y, 1.01))
            z.meta["val"] = y.meta["val"]
            y = z
        return real(self, members, root, y)

    monkeypatch.setattr(rewrite._Rewriter, "replay_members", patched)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_oracle_replays_recipes(inner):
    """Recomputed storages (GELU outputs, LayerNorm affine outputs) are rebuilt in the oracle's forward from the
    substituted sources: still bit for bit with mesa, whose backward replays the same recipe on dequantized codes."""
    out = fuzz.check(_program(), fuzz.Setup(inner=inner))
    assert out.kind is None, out.detail
    assert out.errs["tight"] == 0.0
    assert out.coverage["decision"]["recomputed"] >= 2


def test_oracle_catches_a_wrong_recompute(monkeypatch):
    _recompute_scaled(monkeypatch)
    out = fuzz.check(_program(), fuzz.Setup(inner="eager"))
    assert out.kind == "wiring", (out.kind, out.detail)


def test_recompute_simulated_from_dequantized_sources():
    """The oracle's replayed GELU reads the fake_quantize substitute of its source, not the exact value."""
    prog = _program()
    src = fuzzgen.source(prog)
    orc = MesaBackend(fuzz.Setup(inner="eager").config(), store=RunningStats(), simulate=True, keep_graphs=True)
    model = fuzzgen.build(prog, src)
    inp, target = fuzzgen.make_inputs(prog)
    fuzz.harness_loss(torch.compile(model, backend=orc)(inp, target)).backward()
    (fw, _bw), plan = orc.graphs[0], orc.plans[0]
    outs = next(iter(fw.graph.find_nodes(op="output"))).args[0]
    rec = list(plan.recomputed)
    assert rec
    fq = torch.ops.actpass.fake_quantize.default
    by_name = {n.name: n for n in fw.graph.nodes}
    saved = {n.name: n for n in outs if isinstance(n, fx.Node)}
    for t in rec:
        node = by_name[t.name]
        assert t.name not in saved, "the recomputed storage itself is not what backward receives"
        replayed = [n for n in outs if isinstance(n, fx.Node) and n.target is node.target and n is not node]
        assert any(any(isinstance(a, fx.Node) and a.target is fq for a in n.args) for n in replayed)


def test_running_statistics_stay_tight_over_steps():
    """Running statistics: mesa and the oracle each own a fresh store and see the same inputs: tight on step 2 too."""
    out = fuzz.check(_program(), fuzz.Setup(inner="eager", stats="running"))
    assert out.kind is None, out.detail
    assert out.errs["tight"] == 0.0


def test_stochastic_rounding_is_tight():
    """Stochastic rounding draws its seed from the default generator at the same point in both forward graphs."""
    out = fuzz.check(_program(), fuzz.Setup(inner="eager", rounding="stochastic"))
    assert out.kind is None, out.detail
    assert out.errs["tight"] == 0.0
    assert out.errs["oracle_exact"] > 0


def test_recompute_without_recipe_is_refused(monkeypatch):
    """A recomputed storage whose recipe the oracle is not given keeps the graph exact (a failed rewrite, recorded),
    never a guess."""
    from actpass import oracle

    real = oracle.simulate_plan

    def without_facts(fw, bw, plan, n, config, facts=None):
        return real(fw, bw, plan, n, config)

    monkeypatch.setattr(oracle, "simulate_plan", without_facts)
    prog = _program()
    orc = MesaBackend(fuzz.Setup(inner="eager").config(), store=RunningStats(), simulate=True)
    with pytest.warns(UserWarning, match="has no recipe"):
        fuzz._train(prog, fuzzgen.source(prog), orc, 1)
    assert [s for s in orc.skips if "has no recipe" in s.detail]


def _half_probabilities(monkeypatch) -> None:
    """Make float16 free for probabilities, so a tiny max_error plans them as float16 (the planner does so where
    8-bit codes are estimated too coarse) and everything else but 1-bit masks exact. Callers also take
    the no_plan_cache fixture, so no plan made under the patch is kept."""
    import dataclasses

    from actpass import planner

    real = planner.half_option

    def half(f, config, share):
        o = real(f, config, share)
        return dataclasses.replace(o, err=0.0) if o is not None else None

    monkeypatch.setattr(planner, "half_option", half)


def _matmul_attention() -> fuzzgen.Program:
    prog = _program()
    prog.blocks = [*prog.blocks[:2], {**prog.blocks[2], "impl": "matmul", "dropout": 0.1}]
    return prog


def test_half_precision_and_bit_masks_are_tight(monkeypatch, no_plan_cache):
    """bits=16 (probabilities cast to float16 and back) and bits=1 (dropout masks packed): bit for bit."""
    _half_probabilities(monkeypatch)
    out = fuzz.check(_matmul_attention(), fuzz.Setup(inner="eager", max_error=1e-12))
    assert out.kind is None, out.detail
    assert out.errs["tight"] == 0.0
    assert out.coverage["bits"].get("16", 0) >= 1 and out.coverage["bits"].get("1", 0) >= 1, out.coverage["bits"]


def test_oracle_catches_a_wrong_half_cast(monkeypatch, no_plan_cache):
    """A float16 probability rebuilt 1% too large in mesa's backward is caught as wiring."""
    _half_probabilities(monkeypatch)
    cast = torch.ops.prims.convert_element_type.default

    def scale_half(bw: fx.GraphModule) -> None:
        ups = [n for n in bw.graph.nodes if n.target is cast and n.args[0].meta["val"].dtype == torch.float16]
        assert ups
        for d in ups:
            with bw.graph.inserting_after(d):
                new = bw.graph.call_function(torch.ops.aten.mul.Tensor, (d, 1.01))
            new.meta["val"] = d.meta["val"]
            d.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)

    _inject(monkeypatch, scale_half)
    out = fuzz.check(_matmul_attention(), fuzz.Setup(inner="eager", max_error=1e-12))
    assert out.kind == "wiring", (out.kind, out.detail)


def test_sqrt_codes_of_probabilities_are_tight_and_checked():
    """Softmax probabilities get square-root companded codes; the oracle replays the same math (bit for bit with
    mesa), and a decode 1% off in mesa's backward is caught as wiring."""
    out = fuzz.check(_matmul_attention(), fuzz.Setup(inner="eager"))
    assert out.kind is None, out.detail
    assert out.errs["tight"] == 0.0
    assert out.coverage["code"].get("sqrt", 0) >= 1, out.coverage["code"]


def test_oracle_catches_a_wrong_sqrt_decode(monkeypatch):
    from actpass import fused as fused_mod

    real = fused_mod.sqrt_dequantize_math

    def off(*args, **kwargs):
        return real(*args, **kwargs) * 1.01

    # Mesa's backward traces the decode when the graph is rewritten; the oracle's forward calls it eagerly through
    # actpass::fake_quantize_sqrt, which keeps the real one.
    import actpass.oracle as oracle_mod

    monkeypatch.setattr(fused_mod, "sqrt_dequantize_math", off)
    monkeypatch.setattr(oracle_mod, "_fused", _RealSqrt(fused_mod, real))
    out = fuzz.check(_matmul_attention(), fuzz.Setup(inner="eager"))
    assert out.kind == "wiring", (out.kind, out.detail)


class _RealSqrt:
    """actpass.fused as the oracle sees it, with the true decode."""

    def __init__(self, mod, real) -> None:
        self._mod, self.sqrt_dequantize_math = mod, real

    def __getattr__(self, name):
        return getattr(self._mod, name)


# Fractions where TinyLM's whole storages leave room, so the fill splits one (at 10% the current error model's whole
# storages fill 99.96% and nothing is split).
@pytest.mark.parametrize("fraction", [0.3, 0.2, 0.15])
def test_split_storages_match_the_oracle_bit_for_bit(fraction):
    """Budget fills split a storage in row ranges (plan.Part: exact rows + codes, or wider + narrower codes); mesa's
    backward (two parts, each dequantized, concatenated) and the oracle's forward (slices fake-quantized, concatenated)
    must agree exactly, and differ from a plan without the split."""
    import copy

    from _models import TinyLM

    from actpass.config import MesaConfig

    torch.manual_seed(0)
    model = TinyLM(dim=128, depth=2)
    idx = torch.randint(0, 64, (8, 64))

    def run(be):
        torch._dynamo.reset()
        m = copy.deepcopy(model)
        torch.compile(m, backend=be)(idx, idx).backward()
        return {k: p.grad for k, p in m.named_parameters()}, list(be.plans)

    cfg = MesaConfig(budget=fraction, inner="eager")
    mesa, plans = run(MesaBackend(cfg, store=RunningStats()))
    oracle, _ = run(MesaBackend(cfg, store=RunningStats(), simulate=True))
    splits = [t for p in plans for t in p.tensors if t.split is not None and t.bytes_before]
    assert splits, "the budget is filled by a split storage"
    assert all(torch.equal(mesa[k], oracle[k]) for k in oracle)
    # The same graphs with the split's leading rows stored like the rest are not bit-identical: the split mattered.
    import actpass.planner as planner_mod

    real = planner_mod.split_option
    try:
        planner_mod.split_option = lambda *a, **k: None
        import torch._functorch.config as fconfig

        with fconfig.patch(enable_autograd_cache=False):
            whole, _ = run(MesaBackend(cfg, store=RunningStats()))
    finally:
        planner_mod.split_option = real
    assert any(not torch.equal(mesa[k], whole[k]) for k in whole)
