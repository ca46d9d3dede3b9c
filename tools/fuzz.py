"""Random-graph gradient fuzzer for the mesa backend, with the partition-boundary oracle (issue 10).

For each seeded random model (tools/fuzzgen.py) it runs one or two training steps four ways and compares:

* ``mesa``: ``MesaBackend(config)``, the pass under test;
* ``oracle``: ``MesaBackend(config, simulate=True)``: the same partition and plan, but the forward graph hands
  backward ``dequantize(quantize(R))`` directly and the backward graph is untouched (``actpass/oracle.py``);
* ``exact``: a reference without quantization: eager PyTorch, or, where eager cannot be the reference (dropout draws
  other random numbers, low-precision autocast rounds differently, Inductor fuses), the same compile with nothing
  quantized (``include=()``);
* ``eager``: plain PyTorch, to check the exact reference itself.

Failure kinds, checked in this order (the first that applies is reported):

``invalid``      the generated program fails in eager (a generator bug, not counted as a pass failure)
``crash``        compiling or running mesa raised
``oracle``       the oracle compile raised or fell back (a tool bug)
``fallback``     mesa kept a whole graph exact because the rewrite failed (``SkipReason.REWRITE_FAILED``)
``plan``         mesa and the oracle made different plans for the same graphs
``missing_grad`` a parameter has a gradient in the reference and not in mesa, or the other way round
``nonfinite``    NaN/Inf in mesa's loss or gradients where the reference has none
``forward``      mesa's forward outputs differ from the exact forward (the oracle's outputs, which are exact)
``wiring``       mesa's gradients differ from the oracle's beyond float reassociation (``TIGHT``)
``bound``        mesa's gradients differ from the exact reference's beyond what the bit width allows (``BOUND``),
                 and keeping one named storage exact fixes it (a policy question: should it be quantized?)
``bound_spread`` the same, but no single storage is responsible (an ill-conditioned gradient amplifies all rounding)

A failing program is shrunk (blocks dropped, options simplified, sizes reduced) while the same kind of failure
persists, and written out as a standalone reproducer ``tools/results/repros/repro_<kind>_<seed>.py``.

Usage::

    python tools/fuzz.py --graphs 2000 --jobs 2                   # 8-bit, dynamic statistics, mixed precision
    python tools/fuzz.py --graphs 500 --bits 4 --jobs 2
    python tools/fuzz.py --graphs 500 --stats running --jobs 2
    python tools/fuzz.py --graphs 500 --precision bf16 --jobs 2
    python tools/fuzz.py --graphs 500 --dynamic --jobs 2
    python tools/fuzz.py --seed 1234 --graphs 1 -v                # one program, printed

Results (per-graph outcomes, failures with their programs, coverage, timing) go to ``tools/results/fuzz-*.json``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import dataclasses
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import fuzzgen  # noqa: E402
from fuzzgen import Program  # noqa: E402

RESULTS = TOOLS / "results"

# NOTE: the oracle bound. Mesa and the oracle see the same forward value of every quantized storage, hence the same
# codes; the only difference left is the backward graph around dequantize. Measured over <see report> graphs: with
# inner="eager" the per-parameter gradients agreed bit for bit (max relative difference 0.0); with Inductor <..>.
# The tolerance leaves room for Inductor reassociating the slightly different backward graphs and is still orders of
# magnitude below the quantization error (8-bit: ~1e-3..1e-2 relative), so any rewiring shows up.
TIGHT = {"fp32": 1e-5, "bf16": 1e-5, "fp16": 1e-5}
# Forward outputs against the exact forward: the oracle's user outputs are computed by the same graph without
# quantization, so they must agree to float reassociation.
FWD_TIGHT = 1e-5
# Against eager (the exact reference's own sanity check): compiled vs eager in low precision rounds differently.
FWD_EAGER = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}
# Global relative gradient error allowed against the exact reference, per bit width (see the module docstring).
BOUND = {8: 0.05, 4: 0.5, 2: 2.0}
# Running statistics after the first step: the codes use the EMA of earlier ranges and clamp what falls outside.
BOUND_RUNNING = {8: 0.5, 4: 1.0, 2: 2.0}


@dataclasses.dataclass(frozen=True)
class Setup:
    """How a program is compiled and checked (the MesaConfig fields the fuzzer varies)."""

    bits: int = 8
    stats: str = "dynamic"
    rounding: str = "nearest"
    inner: str = "eager"
    quantize_outputs: bool = False
    min_bytes: int = 0
    # Codes wherever the plan can put them (the default's 5% error target keeps part of a small program exact):
    # the fuzzer is after wiring bugs, and every quantized storage is one more place for one.
    max_error: float = 1e9
    # A byte budget as a fraction of the baseline's saved bytes (``--budget``): the knapsack then mixes exact, 8, 4
    # and 2 bits and splits storages in row ranges (plan.Part), each one more place for a wiring bug.
    budget: float | None = None

    def bound(self, later_step: bool = False) -> float:
        """The bit-width bound on the global gradient error against exact (``BOUND``; ``BOUND_RUNNING`` after step 0
        with running statistics). Infinite under a budget: the knapsack may put any storage at 2 bits (a bf16 causal
        attention at 25% measured 3,170%, its oracle alike), so budget runs check the wiring (the oracle) only."""
        if self.budget is not None:
            return math.inf
        return BOUND_RUNNING[self.bits] if self.stats == "running" and later_step else BOUND[self.bits]

    def config(self, **changes: Any):
        from actpass.config import MesaConfig

        return MesaConfig(
            bits=self.bits,
            stats=self.stats,
            rounding=self.rounding,
            inner=self.inner,
            quantize_outputs=self.quantize_outputs,
            min_bytes=self.min_bytes,
            max_error=self.max_error,
            budget=self.budget,
        ).replace(**changes)


@dataclasses.dataclass
class Outcome:
    seed: int
    summary: str
    setup: dict[str, Any]
    kind: str | None = None  # None: passed
    detail: str = ""
    errs: dict[str, float] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    coverage: dict[str, Any] = dataclasses.field(default_factory=dict)
    program: str = ""  # JSON of the program (failures only)
    # Not a field (kept out of the JSON record): mesa's plans of the run checked, for callers that inspect them
    # without compiling the program again.
    mesa_plans = ()

    @property
    def ok(self) -> bool:
        return self.kind is None


class _Fail(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


# --- running one program -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Step:
    loss: torch.Tensor
    outs: list[torch.Tensor]
    grads: dict[str, torch.Tensor]


def harness_loss(outs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The loss the harness backpropagates: the model's loss, plus a smooth function of every other output."""
    total = torch.zeros((), dtype=torch.float32)
    for o in outs:
        total = total + (o.float() if o.dim() == 0 else o.float().sin().mean())
    return total


def steps_of(prog: Program, setup: Setup) -> int:
    return 2 if prog.dynamic or setup.stats == "running" else 1


@dataclasses.dataclass
class _Seen:
    """What a backend recorded, copied before the next ``torch._dynamo.reset()`` (which resets the backend)."""

    plans: list = dataclasses.field(default_factory=list)
    skips: list = dataclasses.field(default_factory=list)
    coverage: dict = dataclasses.field(default_factory=dict)


def _train(prog: Program, src: str, backend: Any, steps: int, seen: _Seen | None = None) -> list[_Step]:
    """Build the model, compile it with ``backend`` (None: eager), run ``steps`` forward/backward passes."""
    # NOTE: Inductor's layout optimization picks channels-last for conv operands it computes itself, not for graph
    # inputs: mesa's dequantized activation is the former, the oracle's saved tensor the latter, so the two ran the
    # conv backward in different memory formats (seed 54, fp16: conv weight gradients 4.4e-4 apart; 0 with it off).
    # It runs after the partition, so it changes no saved tensor; off for every compile here.
    # NOTE: Inductor computes fp16/bf16 pointwise chains in fp32 and rounds once at the end; the oracle's fake
    # quantize is such a chain, mesa's dequantize is an opaque kernel that rounds like eager (seed 842, fp16: mesa vs
    # oracle 2-4e-4 on the conv weight's gradient, 0 with emulate_precision_casts, 0 with inner="eager"). Emulating
    # eager's casts changes no plan and no saved tensor, only how the oracle's arithmetic rounds.
    import torch._inductor.config as inductor_config

    with inductor_config.patch(layout_optimization=False, emulate_precision_casts=True):
        return _train_steps(prog, src, backend, steps, seen)


def _train_steps(prog: Program, src: str, backend: Any, steps: int, seen: _Seen | None) -> list[_Step]:
    torch._dynamo.reset()
    model = fuzzgen.build(prog, src)
    fn = torch.compile(model, backend=backend) if backend is not None else model
    dtype = fuzzgen.DTYPES[prog.precision]
    out: list[_Step] = []
    for step in range(steps):
        for p in model.parameters():
            p.grad = None
        inp, target = fuzzgen.make_inputs(prog, step)
        if backend is not None:
            for d, name in ((0, "batch"), (1, "seq")):
                if name in prog.dynamic and not (name == "seq" and prog.stem["kind"] == "image"):
                    torch._dynamo.maybe_mark_dynamic(inp, d)
                    torch._dynamo.maybe_mark_dynamic(target, d)
        torch.manual_seed(prog.seed * 31 + step)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            outs = fn(inp, target)
        loss = harness_loss(outs)
        loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        out.append(_Step(loss.detach(), [o.detach().float() for o in outs], grads))
    if seen is not None:
        # torch._dynamo.reset() calls the backend's reset(), which forgets its plans: keep copies now.
        seen.plans, seen.skips = list(backend.plans), list(backend.skips)
        seen.coverage = _coverage(backend) if backend.keep_graphs else {}
        backend.graphs.clear()
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are 0; inf when only b is 0)."""
    num = (a - b).float().norm().item()
    den = b.float().norm().item()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def _global_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum((a[k] - b[k]).pow(2).sum().item() for k in b)
    den = sum(b[k].pow(2).sum().item() for k in b)
    return math.sqrt(num / den) if den else (0.0 if num == 0 else math.inf)


def _finite(s: _Step) -> bool:
    return bool(torch.isfinite(s.loss)) and all(torch.isfinite(g).all() for g in s.grads.values())


def _plan_key(plans) -> list:
    out = []
    for p in plans:
        for t in p.tensors:
            d = t.to_dict()
            d["stats_key"] = d["stats_key"].split("/", 1)[-1]  # the store name differs between the two backends
            out.append(d)
    return out


def _exact_backend(cfg):
    """The same partition with nothing quantized (``include=()``) and no budget."""
    from actpass.backend import MesaBackend
    from actpass.state import RunningStats

    return MesaBackend(cfg.replace(include=(), budget=None), store=RunningStats())


def _unmet(e: BaseException | None) -> bool:
    return "cannot be met; the smallest reachable size" in str(e)


def check(prog: Program, setup: Setup, *, src: str | None = None, want_coverage: bool = True) -> Outcome:
    """Run ``prog`` under ``setup`` and classify the result (see the module docstring)."""
    import actpass  # noqa: F401
    from actpass.backend import MesaBackend, SkipReason
    from actpass.state import RunningStats

    t0 = time.perf_counter()
    src = src or fuzzgen.source(prog)
    res = Outcome(prog.seed, prog.summary(), dataclasses.asdict(setup))
    steps = steps_of(prog, setup)
    cfg = setup.config()
    try:
        try:
            eager = _train(prog, src, None, steps)
        except Exception as e:  # noqa: BLE001
            raise _Fail("invalid", _exc(e)) from e
        # The exact reference: eager, except where eager cannot compute what the compiled graphs compute: dropout
        # (other random numbers) and Inductor in low precision (its fused kernels keep fp32 intermediates). NOTE:
        # inner="eager" runs the same aten ops as eager; measured difference of its forward outputs from eager on 40
        # programs (fp32, bf16, fp16): exactly 0.
        use_exact_compile = _use_exact_compile(prog, setup)
        exact = eager
        if use_exact_compile:
            try:
                exact = _train(prog, src, _exact_backend(cfg), steps)
            except Exception as e:  # noqa: BLE001
                raise _Fail("invalid", f"exact compile: {_exc(e)}") from e
        # A budget the program cannot meet (its masks, statistics and parameters alone pass it) is a correct
        # BudgetError, not a finding: the budget moves half-way to the baseline's size, up to 3 times.
        mesa, err = None, None
        for _ in range(4):
            mesa_be = MesaBackend(cfg, store=RunningStats(), keep_graphs=want_coverage)
            mesa_seen = _Seen()
            try:
                mesa = _train(prog, src, mesa_be, steps, mesa_seen)
                break
            except Exception as e:  # noqa: BLE001
                err = e
                if cfg.budget is None or not _unmet(e) or cfg.budget >= 0.9:
                    break
                cfg = cfg.replace(budget=(1 + cfg.budget) / 2)
                res.setup["budget"] = cfg.budget
        if mesa is None:
            e = err
            if _unmet(e):
                res.summary += " [budget unreachable: nothing to check]"
                res.coverage = {"budget": {"unreachable": 1}}
                res.seconds = time.perf_counter() - t0
                return res
            if not use_exact_compile:
                try:
                    _train(prog, src, _exact_backend(cfg), steps)
                except Exception as e2:  # noqa: BLE001 - the compile fails without the pass too: not ours
                    raise _Fail("invalid", f"exact compile: {_exc(e2)}") from e2
            raise _Fail("crash", _exc(e)) from e
        res.coverage = mesa_seen.coverage
        res.mesa_plans = tuple(mesa_seen.plans)
        failed = [s for s in mesa_seen.skips if s.reason is SkipReason.REWRITE_FAILED]
        orc_be = MesaBackend(cfg, store=RunningStats(), simulate=True)
        try:
            orc = _train(prog, src, orc_be, steps, orc_seen := _Seen())
        except Exception as e:  # noqa: BLE001
            if failed:
                raise _Fail("fallback", failed[0].detail) from e
            raise _Fail("oracle", _exc(e)) from e
        if failed:
            raise _Fail("fallback", failed[0].detail)
        ofailed = [s for s in orc_seen.skips if s.reason is SkipReason.REWRITE_FAILED]
        if ofailed:
            raise _Fail("oracle", f"simulate failed: {ofailed[0].detail}")
        mkey, okey = _plan_key(mesa_seen.plans), _plan_key(orc_seen.plans)
        if mkey != okey:
            n, m = len(mesa_seen.plans), len(orc_seen.plans)
            diff = next(
                ({k: (a[k], b[k]) for k in a if a[k] != b.get(k)} | {"tensor_id": a["tensor_id"]}
                 for a, b in zip(mkey, okey, strict=False) if a != b),
                {"count": (len(mkey), len(okey))},
            )  # fmt: skip
            raise _Fail("plan", f"mesa made {n} plans, the oracle {m}; they differ: (mesa, oracle) {diff}")
        try:
            res.errs = _compare(prog, setup, eager, exact, mesa, orc)
        except _Fail as f:
            if f.kind != "bound":
                raise
            if not use_exact_compile:
                # Eager was the reference, but a compile without quantization can compute something else: measured
                # 26% from eager on seed 311 (BatchNorm2d with batch 1, fp16 autocast). Then that is the reference.
                exact = _train(prog, src, _exact_backend(cfg), steps)
                try:
                    res.errs = _compare(prog, setup, eager, exact, mesa, orc)
                    pairs = zip(exact, eager, strict=True)
                    res.errs["exact_vs_eager"] = max(_global_rel(x.grads, e.grads) for x, e in pairs)
                    f = None
                except _Fail as f2:
                    if f2.kind != "bound":
                        raise
                    f = f2
            if f is not None:
                raise _attribute(prog, src, cfg, exact, mesa_seen.plans, steps, setup, f) from None
    except _Fail as f:
        res.kind, res.detail = f.kind, f.detail
    except Exception as e:  # noqa: BLE001 - the harness itself failed: report it as such
        res.kind, res.detail = "harness", _exc(e)
    res.seconds = time.perf_counter() - t0
    if res.kind is not None:
        res.program = prog.to_json()
    return res


def _glob_escape(s: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in s)


def _attribute(prog: Program, src: str, cfg, exact: list[_Step], plans, steps: int, setup: Setup, f: _Fail) -> _Fail:
    """Which quantized storage makes a ``bound`` failure: recompile keeping each one exact in turn (at most 40).

    Returns ``bound`` naming the storage whose exact storage alone brings the error within the bound (the policy
    should not quantize it), or ``bound_spread`` when none does (the error is spread over many storages: typically an
    ill-conditioned gradient, e.g. one normalized over 2 channels, where every rounding is amplified).
    """
    from actpass.backend import MesaBackend
    from actpass.state import RunningStats

    ids = list(dict.fromkeys(t.tensor_id for p in plans for t in p.quantized if t.bytes_after))[:40]
    results = []
    for tid in ids:
        be = MesaBackend(cfg.replace(overrides=((_glob_escape(tid), 0),)), store=RunningStats())
        try:
            m = _train(prog, src, be, steps)
        except Exception:  # noqa: BLE001 - attribution is best effort
            continue
        results.append((max(_global_rel(a.grads, b.grads) for a, b in zip(m, exact, strict=True)), tid))
    if not results:
        return f
    best, tid = min(results)
    bound = setup.bound(steps > 1)
    if best <= bound:
        return _Fail("bound", f"{f.detail}; keeping {tid} exact alone brings it to {best:.3g}")
    return _Fail("bound_spread", f"{f.detail}; no single storage responsible (best: {tid} exact -> {best:.3g})")


def _use_exact_compile(prog: Program, setup: Setup) -> bool:
    return prog.has_dropout or (setup.inner == "inductor" and prog.precision != "fp32")


def _compare(prog: Program, setup: Setup, eager: list[_Step], exact: list[_Step], mesa, orc) -> dict[str, float]:
    errs = {"tight": 0.0, "fwd": 0.0, "fwd_eager": 0.0, "mesa_exact": 0.0, "oracle_exact": 0.0}
    for i, (e, x, m, o) in enumerate(zip(eager, exact, mesa, orc, strict=True)):
        where = f"step {i}"
        if set(m.grads) != set(x.grads):
            miss = sorted(set(x.grads) ^ set(m.grads))
            raise _Fail("missing_grad", f"{where}: gradients present in only one of mesa/exact: {miss}")
        if _finite(x) and not _finite(m):
            bad = [k for k, g in m.grads.items() if not torch.isfinite(g).all()]
            raise _Fail("nonfinite", f"{where}: loss {m.loss.item()}, non-finite gradients {bad[:5]}")
        if not _finite(x):
            continue  # the reference itself overflowed: nothing to compare
        fwd = max(rel(mo, oo) for mo, oo in zip(m.outs, o.outs, strict=True))
        errs["fwd"] = max(errs["fwd"], fwd)
        if fwd > FWD_TIGHT:
            raise _Fail("forward", f"{where}: forward outputs differ from the exact forward by {fwd:.3g} (rel L2)")
        errs["fwd_eager"] = max(errs["fwd_eager"], max(rel(xo, eo) for xo, eo in zip(x.outs, e.outs, strict=True)))
        tight = {k: rel(m.grads[k], o.grads[k]) for k in o.grads}
        worst = max(tight, key=tight.get, default=None)
        if worst is not None:
            errs["tight"] = max(errs["tight"], tight[worst])
            if tight[worst] > TIGHT[prog.precision]:
                raise _Fail(
                    "wiring",
                    f"{where}: gradient of {worst} differs from the oracle's by {tight[worst]:.3g} (rel L2; "
                    f"float reassociation is < {TIGHT[prog.precision]:g}); quantization error vs exact "
                    f"{rel(o.grads[worst], x.grads[worst]):.3g}",
                )
        q, qo = _global_rel(m.grads, x.grads), _global_rel(o.grads, x.grads)
        errs["mesa_exact"], errs["oracle_exact"] = max(errs["mesa_exact"], q), max(errs["oracle_exact"], qo)
        errs[f"mesa_exact_{i}"] = q
    if setup.rounding == "stochastic" and prog.has_dropout:
        # Stochastic rounding draws from the default generator, so the unquantized compile's dropout masks differ:
        # there is no exact reference. (The oracle draws the same numbers as mesa: the tight check above holds.)
        errs["mesa_exact"] = errs["oracle_exact"] = math.nan
        return errs
    for i in range(len(mesa)):
        # Step 0 starts from a fresh store: running statistics are then the step's own ranges (dynamic).
        bound = setup.bound(i > 0)
        q = errs.get(f"mesa_exact_{i}", 0.0)
        if q > bound:
            raise _Fail(
                "bound",
                f"step {i}: global gradient error vs exact {q:.3g} > {bound} for {setup.bits}-bit {setup.stats} "
                f"statistics (oracle vs exact {errs['oracle_exact']:.3g})",
            )
    return errs


def _exc(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    tb = traceback.extract_tb(e.__traceback__)
    ours = [f for f in tb if "actpass" in f.filename]
    where = f" [{Path(ours[-1].filename).name}:{ours[-1].lineno}]" if ours else ""
    return f"{type(e).__name__}: {first[:300]}{where}"


def _coverage(backend) -> dict[str, Any]:
    """What the compiled graphs exercised: forward ops, and per saved tensor its producer/layout/decision/reason."""
    from actpass.analysis import _op_short

    cov: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for fw, _bw in backend.graphs:
        for n in fw.graph.nodes:
            if n.op == "call_function":
                cov["fw_ops"][_target_name(n.target)] += 1
    for plan in backend.plans:
        cov["graphs"]["planned"] += 1
        for t in plan.tensors:
            cov["decision"][t.decision.value] += 1
            cov["reason"][t.reason.value] += 1
            if t.recomputed:
                cov["recompute"][" > ".join(t.recompute)] += 1
                cov["recomputed_role"][t.role.value] += 1
            if t.quantized:
                cov["quantized_op"][_op_short(t.producer.split(" of ")[-1])] += 1
                cov["layout"][t.layout.value] += 1
                cov["bits"][str(t.bits)] += 1
                cov["code"][t.code] += 1
                cov["grouping"]["chunked" if t.chunk > 1 else "plain"] += 1
                if t.row_block > 1:
                    cov["grouping"]["row blocks"] += 1
                if "handed over" in t.detail:
                    cov["grouping"]["handed-over activation"] += 1
                cov["grouping"]["permuted" if t.perm else "memory-order"] += 1
                if t.split is not None and t.bytes_before:
                    cov["grouping"]["split rows " + ("exact" if t.split.bits is None else f"{t.split.bits}-bit")] += 1
                cov["grouping"]["view of the root" if "shares storage" in t.detail else "root"] += 1
                cov["grouping"]["symbolic shape" if any(isinstance(s, str) for s in t.shape) else "static"] += 1
                cov["dtype"][t.dtype] += 1
            role = getattr(t, "role", None)
            if role is not None:
                cov["role"][str(getattr(role, "value", role))] += 1
    return {k: dict(v) for k, v in cov.items()}


def _target_name(t: Any) -> str:
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t.__name__.split('.')[0]}"
    return getattr(t, "__name__", str(t))


# --- shrinking -------------------------------------------------------------------------------------------------------

# Simplest value of each block option: the shrinker tries these one at a time.
_SIMPLE = {
    "norm": "none",
    "act": "relu",
    "ratio": 1,
    "gated": False,
    "bias": True,
    "residual": True,
    "dropout": 0.0,
    "aux": False,
    "heads": 1,
    "kv_heads": 1,
    "head_dim": 8,
    "qkv": "separate",
    "impl": "matmul",
    "mask": "none",
    "probs": "softmax",
    "merge": "transpose_reshape",
    "gqa": "expand",
    "twice": False,
}


def _candidates(prog: Program, setup: Setup):
    """Smaller variants of (program, setup), most reducing first."""
    for i in reversed(range(len(prog.blocks))):
        yield dataclasses.replace(prog, blocks=prog.blocks[:i] + prog.blocks[i + 1 :]), setup
    if setup.inner != "eager":
        yield prog, dataclasses.replace(setup, inner="eager")
    for field, simple in (("quantize_outputs", False), ("rounding", "nearest"), ("stats", "dynamic")):
        if getattr(setup, field) != simple:
            yield prog, dataclasses.replace(setup, **{field: simple})
    if prog.precision != "fp32":
        yield dataclasses.replace(prog, precision="fp32"), setup
    if prog.dynamic:
        yield dataclasses.replace(prog, dynamic=()), setup
    simple_head = {"kind": "out", "pool": "none", "norm": "none", "classes": 2}
    if prog.head != simple_head:
        yield dataclasses.replace(prog, head=simple_head), setup
    for key, simple in (("pos", False), ("convs", 0), ("bn", False), ("pool", False), ("channels_last", False)):
        if key in prog.stem and prog.stem[key] != simple:
            yield dataclasses.replace(prog, stem={**prog.stem, key: simple}), setup
    if prog.batch > 1:
        yield dataclasses.replace(prog, batch=1 if prog.batch > 2 else prog.batch - 1), setup
    for n in (1, 2, 3, 4, 7, 8, 16):
        if n < prog.seq:
            yield dataclasses.replace(prog, seq=n), setup
    for c in (2, 3, 4, 7, 8, 16):
        if c < prog.dim:
            yield dataclasses.replace(prog, dim=c), setup
    for i, b in enumerate(prog.blocks):
        for key, simple in _SIMPLE.items():
            if key in b and b[key] != simple:
                blocks = [*prog.blocks]
                blocks[i] = {**b, key: simple}
                yield dataclasses.replace(prog, blocks=blocks), setup


def shrink(
    prog: Program, setup: Setup, kind: str, *, max_checks: int = 80, max_seconds: float = 900.0, log=None
) -> tuple[Program, Setup, Outcome | None]:
    """Greedily reduce ``prog``/``setup`` while the failure ``kind`` persists. Returns the smallest found."""
    t0 = time.perf_counter()
    checks = 0
    best: Outcome | None = None
    progress = True
    while progress and checks < max_checks and time.perf_counter() - t0 < max_seconds:
        progress = False
        for cand, csetup in _candidates(prog, setup):
            if checks >= max_checks or time.perf_counter() - t0 >= max_seconds:
                break
            try:
                fuzzgen.source(cand)
            except Exception:  # noqa: BLE001 - an option combination the generator cannot print
                continue
            checks += 1
            out = check(cand, csetup, want_coverage=False)
            if out.kind == kind:
                prog, setup, best = cand, csetup, out
                progress = True
                if log:
                    log(f"  shrink: {cand.summary()} {csetup.inner} -> still {kind}")
                break
    return prog, setup, best


REPRO = '''# ruff: noqa
"""Reproducer written by tools/fuzz.py (issue 10): {kind}.

    {detail}

Program (seed {seed}): {summary}
Setup: {setup}
Run: python {name}   (exit status 1 while the failure reproduces)
"""

import math
import sys

import torch
import torch._inductor.config
import torch.nn as nn
import torch.nn.functional as F

from actpass.backend import MesaBackend, SkipReason
from actpass.config import MesaConfig
from actpass.state import RunningStats

PROGRAM = {program!r}
CONFIG = {config!r}
PRECISION = {precision!r}  # autocast dtype around the forward ("fp32": none)
DYNAMIC = {dynamic!r}  # dims marked dynamic: 0 = batch, 1 = sequence
STEPS = {steps}
EXACT_COMPILE = {exact_compile}  # reference: the unquantized compile (True) or eager (False)


{model_src}

def make_inputs(step):
{inputs_src}

def train(backend):
    torch._inductor.config.layout_optimization = False  # see tools/fuzz.py: conv layouts differ otherwise
    torch._inductor.config.emulate_precision_casts = True  # see tools/fuzz.py: fp16 chains round like eager
    torch._dynamo.reset()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed({seed})
        model = Model().train()
    {channels_last}fn = torch.compile(model, backend=backend) if backend is not None else model
    results = []
    for step in range(STEPS):
        for p in model.parameters():
            p.grad = None
        inp, target = make_inputs(step)
        if backend is not None:
            for d in DYNAMIC:
                torch._dynamo.maybe_mark_dynamic(inp, d)
                torch._dynamo.maybe_mark_dynamic(target, d)
        torch.manual_seed({seed} * 31 + step)
        dtype = {{"bf16": torch.bfloat16, "fp16": torch.float16}}.get(PRECISION)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            outs = fn(inp, target)
        loss = sum(o.float() if o.dim() == 0 else o.float().sin().mean() for o in outs)
        loss.backward()
        grads = {{n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}}
        results.append((loss.detach(), [o.detach().float() for o in outs], grads))
    return results


def rel(a, b):
    den = b.norm().item()
    return (a - b).norm().item() / den if den else (0.0 if (a - b).norm().item() == 0 else math.inf)


def main():
    config = MesaConfig.from_dict(CONFIG)
    # The exact reference: eager, or where eager draws other random numbers or rounds differently, the same compile
    # with nothing quantized.
    exact = train(MesaBackend(config.replace(include=(), budget=None), store=RunningStats()) if EXACT_COMPILE else None)
    mesa_be = MesaBackend(config, store=RunningStats())
    mesa = train(mesa_be)
    plans, skips = list(mesa_be.plans), list(mesa_be.skips)  # the next compile's torch._dynamo.reset() clears them
    oracle_be = MesaBackend(config, store=RunningStats(), simulate=True)
    oracle = train(oracle_be)
    failed = False
    for s in skips:
        if s.reason is SkipReason.REWRITE_FAILED:
            print("mesa fell back to exact storage:", s.detail)
            failed = True
    for plan in plans:
        for t in plan.tensors:
            print(f"  {{t.name:24s}} {{t.decision.value:9s}} {{str(t.shape):20s}} {{t.detail}}")
    for i, ((xl, xo, xg), (ml, mo, mg), (ol, oo, og)) in enumerate(zip(exact, mesa, oracle)):
        print(f"step {{i}}: loss exact {{xl.item():.6g}} mesa {{ml.item():.6g}} oracle {{ol.item():.6g}}")
        if set(mg) != set(xg):
            print("  missing gradients:", sorted(set(mg) ^ set(xg)))
            failed = True
            continue
        fwd = max(rel(a, b) for a, b in zip(mo, oo))
        print(f"  forward outputs vs exact forward: {{fwd:.3g}}")
        failed |= fwd > {fwd_tight}
        for k in xg:
            t, q = rel(mg[k], og[k]), rel(og[k], xg[k])
            bad = t > {tight} or not torch.isfinite(mg[k]).all()
            failed |= bad
            print(f"  {{k:32s}} mesa-vs-oracle {{t:.3g}}  oracle-vs-exact {{q:.3g}}{{'   <-- FAIL' if bad else ''}}")
        num = sum((mg[k] - xg[k]).pow(2).sum() for k in xg)
        den = sum(xg[k].pow(2).sum() for k in xg)
        glob = (num / den).sqrt().item() if den else 0.0
        # Running statistics after the first step clamp to earlier ranges: a looser bound.
        bound = {bound_running} if i > 0 and CONFIG.get("stats") == "running" else {bound}
        if CONFIG.get("rounding") == "stochastic" and EXACT_COMPILE:
            bound = math.inf  # stochastic rounding shifts the dropout masks: no exact reference
        print(f"  global gradient error mesa vs exact: {{glob:.3g}} (bound {{bound}})")
        failed |= glob > bound
    print("FAILED" if failed else "passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
'''


def _inputs_src(prog: Program) -> str:
    """Source of ``make_inputs(step)`` equivalent to ``fuzzgen.make_inputs`` for this program."""
    st = prog.stem
    lines = [f"    g = torch.Generator().manual_seed({prog.seed} * 7919 + step)"]
    b = f"{prog.batch} + step" if "batch" in prog.dynamic else f"{prog.batch}"
    n = f"{prog.seq} + 3 * step" if "seq" in prog.dynamic else f"{prog.seq}"
    lines.append(f"    b, n = {b}, {n}")
    if st["kind"] == "tokens":
        lines.append(f"    inp = torch.randint(0, {st['vocab']}, (b, n), generator=g)")
        classes = st["vocab"] if prog.head["kind"] == "tied" else prog.head["classes"]
    elif st["kind"] == "features":
        lines.append(f"    inp = torch.randn(b, n, {st['in']}, generator=g)")
        classes = prog.head["classes"]
    else:
        lines.append(f"    inp = torch.randn(b, 3, {st['size']}, {st['size']}, generator=g)")
        if st["channels_last"]:
            lines.append("    inp = inp.to(memory_format=torch.channels_last)")
        lines.append(f"    n = {fuzzgen.stream_len(prog)}")
        classes = prog.head["classes"]
    lines.append(f"    target = torch.randint(0, {classes}, (b, n), generator=g)")
    lines.append("    return inp, target")
    return "\n".join(lines) + "\n"


def write_repro(prog: Program, setup: Setup, out: Outcome, directory: Path) -> Path:
    """Write a standalone reproducer for ``out``'s failure; returns its path."""
    # the budget the check ended with (an unreachable one is raised half-way to the baseline's size)
    setup = dataclasses.replace(setup, budget=out.setup.get("budget", setup.budget))
    directory.mkdir(parents=True, exist_ok=True)
    name = f"repro_{out.kind}_{prog.seed}.py"
    path = directory / name
    dims = []
    if "batch" in prog.dynamic:
        dims.append(0)
    if "seq" in prog.dynamic and prog.stem["kind"] != "image":
        dims.append(1)
    cfg = setup.config().to_dict()
    from actpass.config import MesaConfig

    default = MesaConfig().to_dict()
    cfg = {k: v for k, v in cfg.items() if v != default[k] or k in ("bits", "inner")}
    cl = prog.stem["kind"] == "image" and prog.stem["channels_last"]
    text = REPRO.format(
        kind=out.kind,
        detail=out.detail.replace('"""', "'''"),
        seed=prog.seed,
        summary=prog.summary(),
        setup=dataclasses.asdict(setup),
        name=name,
        program=prog.to_json(),
        config=cfg,
        precision=prog.precision,
        dynamic=tuple(dims),
        steps=steps_of(prog, setup),
        exact_compile=_use_exact_compile(prog, setup),
        model_src=fuzzgen.source(prog),
        inputs_src=_inputs_src(prog),
        channels_last="model = model.to(memory_format=torch.channels_last)\n    " if cl else "",
        fwd_tight=FWD_TIGHT,
        tight=TIGHT[prog.precision],
        bound=f"float({str(setup.bound())!r})",  # float('inf') under a budget
        bound_running=f"float({str(setup.bound(True))!r})",
    )
    path.write_text(text)
    return path


# --- the run ---------------------------------------------------------------------------------------------------------


def setup_for(seed: int, args: argparse.Namespace) -> Setup:
    """The setup of graph ``seed``: the CLI's bits/stats/rounding; inner compiler and output policy by seed."""
    import random

    rng = random.Random(seed * 1_000_003 + 17)
    inner = "inductor" if rng.random() < args.inductor_share else "eager"
    return Setup(
        bits=args.bits,
        stats=args.stats,
        rounding=args.rounding,
        inner=inner,
        quantize_outputs=rng.random() < 0.2,
        min_bytes=0 if rng.random() < 0.85 else 4096,
        max_error=getattr(args, "max_error", 1e9),
        budget=getattr(args, "budget", None),
    )


def program_for(seed: int, args: argparse.Namespace) -> Program:
    dynamic = True if args.dynamic else None
    return fuzzgen.generate(seed, precision=args.precision, dynamic=dynamic)


def _worker_init() -> None:
    torch.set_num_threads(1)
    import torch._inductor.config as icfg

    icfg.compile_threads = 1
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("torch").setLevel(logging.ERROR)
    logging.getLogger("actpass").setLevel(logging.ERROR)


class _Timeout(Exception):
    pass


def _alarm(_sig, _frame):
    raise _Timeout()


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Generate, check and (on failure) shrink one program; a JSON-able dict."""
    prog, setup = program_for(seed, args), setup_for(seed, args)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.timeout)
    try:
        out = check(prog, setup)
    except _Timeout:
        out = Outcome(seed, prog.summary(), dataclasses.asdict(setup), "timeout", f"over {args.timeout} s")
        out.program = prog.to_json()
    finally:
        signal.alarm(0)
    rec = dataclasses.asdict(out)
    if out.kind is not None and out.kind not in ("timeout", "invalid") and args.shrink:
        signal.alarm(args.timeout * 4)
        try:
            sprog, ssetup, sout = shrink(prog, setup, out.kind, max_checks=args.shrink_checks)
        except _Timeout:
            sprog, ssetup, sout = prog, setup, None
        finally:
            signal.alarm(0)
        final = sout or out
        path = write_repro(sprog, ssetup, final, Path(args.out_dir) / "repros")
        rec["repro"] = str(path)
        rec["shrunk"] = {"summary": sprog.summary(), "setup": dataclasses.asdict(ssetup), "detail": final.detail}
    return rec


def _merge_coverage(total: dict[str, collections.Counter], cov: dict[str, dict[str, int]]) -> None:
    for k, v in cov.items():
        total.setdefault(k, collections.Counter()).update(v)


def _program_coverage(prog: Program, total: dict[str, collections.Counter]) -> None:
    c = total.setdefault("program", collections.Counter())
    c[f"stem={prog.stem['kind']}"] += 1
    c[f"precision={prog.precision}"] += 1
    c[f"dynamic={'+'.join(prog.dynamic) or 'none'}"] += 1
    c[f"head={prog.head['kind']}"] += 1
    for b in prog.blocks:
        c[f"block={b['kind']}"] += 1
        for key in ("variant", "impl", "mask", "qkv", "probs", "merge", "act", "norm"):
            if key in b:
                c[f"{b['kind']}.{key}={b[key]}"] += 1
        if b["kind"] == "attn" and b["kv_heads"] != b["heads"]:
            c[f"attn.gqa={b['gqa']}"] += 1
        if b.get("dropout", 0) > 0:
            c["dropout"] += 1
        if b.get("aux"):
            c["output also saved"] += 1
    for d in (prog.dim, prog.seq):
        if d in (1, 3, 7, 197):
            c[f"odd dim {d}"] += 1


def _run_pool(seeds: list[int], args: argparse.Namespace, done) -> None:
    """Check ``seeds`` in ``args.jobs`` worker processes; SIGTERM/Ctrl-C stops the workers too.

    A fresh pool per 50 programs per worker bounds the memory a worker accumulates over thousands of compiles.
    (Not ``max_tasks_per_child``: with it the pool hung for good once both workers retired, Python 3.11.7.)
    """

    def interrupt(_sig, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    ctx = mp.get_context("spawn")
    chunk = 50 * args.jobs
    for start in range(0, len(seeds), chunk):
        ex = cf.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init)
        try:
            futs = {ex.submit(run_seed, s, args): s for s in seeds[start : start + chunk]}
            for fut in cf.as_completed(futs):
                try:
                    done(fut.result())
                except Exception as e:  # noqa: BLE001 - a worker died: record it as a failure of that seed
                    s = futs[fut]
                    prog = program_for(s, args)
                    rec = dataclasses.asdict(Outcome(s, prog.summary(), dataclasses.asdict(setup_for(s, args))))
                    rec.update(kind="harness", detail=f"worker died: {_exc(e)}", program=prog.to_json())
                    done(rec)
        except BaseException:
            for proc in list((ex._processes or {}).values()):
                proc.terminate()
            print("interrupted: partial results are in the JSON written every 25 programs", flush=True)
            os._exit(130)  # the executor's exit hook would wait for its manager thread
        ex.shutdown(wait=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--graphs", type=int, default=100, help="number of random programs")
    ap.add_argument("--seed", type=int, default=0, help="first program seed (programs use seed, seed+1, ...)")
    ap.add_argument("--bits", type=int, default=8, choices=(8, 4, 2))
    ap.add_argument("--stats", default="dynamic", choices=("dynamic", "running"))
    ap.add_argument("--rounding", default="nearest", choices=("nearest", "stochastic"))
    ap.add_argument(
        "--max-error",
        type=float,
        default=1e9,
        help="MesaConfig.max_error (default: %(default)g, codes wherever they fit; 0.05 is the shipped default)",
    )
    ap.add_argument("--precision", default=None, choices=fuzzgen.PRECISIONS, help="force a precision (default mix)")
    ap.add_argument(
        "--budget", type=float, default=None, help="MesaConfig.budget as a fraction of the baseline's saved bytes"
    )
    ap.add_argument("--dynamic", action="store_true", help="mark batch and/or sequence dims dynamic in every program")
    # NOTE: 2% Inductor. Measured per program on the shared 2-core machine (load 3-6 from other jobs): inner="eager"
    # median 2-6 s (eager run + mesa + oracle compiles), Inductor 35-330 s (C++ kernels compiled per graph).
    ap.add_argument("--inductor-share", type=float, default=0.02, help="share of programs compiled with Inductor")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per program before it counts as a timeout")
    ap.add_argument("--no-shrink", dest="shrink", action="store_false", help="do not shrink failures")
    ap.add_argument("--shrink-checks", type=int, default=60, help="at most this many re-runs per shrink")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the JSON and reproducers go")
    ap.add_argument("--name", default=None, help="JSON file name (default from the options)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each program's source and result")
    args = ap.parse_args(argv)

    seeds = list(range(args.seed, args.seed + args.graphs))
    name = args.name or (
        f"fuzz-b{args.bits}-{args.stats}-{args.rounding}-{args.precision or 'mix'}"
        f"{'-dynamic' if args.dynamic else ''}{f'-budget{args.budget:g}' if args.budget else ''}"
        f"-n{args.graphs}-s{args.seed}.json"
    )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    coverage: dict[str, collections.Counter] = {}

    summary: dict[str, Any] = {}

    def write_summary(complete: bool) -> Path:
        wall = time.perf_counter() - t0
        recs = sorted(records, key=lambda r: r["seed"])
        fails = [r for r in recs if r["kind"] is not None and r["kind"] != "invalid"]
        invalid = [r for r in recs if r["kind"] == "invalid"]
        tights = [r["errs"]["tight"] for r in recs if r["errs"]]
        by_inner: dict[str, list[float]] = collections.defaultdict(list)
        for r in recs:
            by_inner[r["setup"]["inner"]].append(r["seconds"])
        summary.clear()
        summary.update(
            {
                "command": "python tools/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "complete": complete,
                "torch": torch.__version__,
                "graphs": len(recs),
                "failures": len(fails),
                "invalid_programs": len(invalid),
                "by_kind": dict(collections.Counter(r["kind"] for r in fails)),
                "wall_seconds": round(wall, 1),
                "jobs": args.jobs,
                "loadavg": os.getloadavg(),
                "seconds_per_graph": {k: round(sum(v) / len(v), 2) for k, v in by_inner.items()},
                "graphs_per_inner": {k: len(v) for k, v in by_inner.items()},
                "max_tight": max(tights, default=0.0),
                "bounds": {"tight": TIGHT, "fwd_tight": FWD_TIGHT, "bound": BOUND, "bound_running": BOUND_RUNNING},
                "coverage": {k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in sorted(coverage.items())},
                "failures_detail": fails + invalid,
                "outcomes": [{k: r[k] for k in ("seed", "summary", "setup", "kind", "errs", "seconds")} for r in recs],
            }
        )
        path = out_dir / name
        path.write_text(json.dumps(summary, indent=1, default=str))
        return path

    def done(rec: dict[str, Any]) -> None:
        records.append(rec)
        _merge_coverage(coverage, rec.pop("coverage", {}) or {})
        _program_coverage(program_for(rec["seed"], args), coverage)
        status = "ok" if rec["kind"] is None else f"FAIL {rec['kind']}: {rec['detail']}"
        nfail = sum(r["kind"] not in (None,) for r in records)
        print(
            f"[{len(records)}/{len(seeds)} {time.perf_counter() - t0:6.0f}s fail={nfail}] seed {rec['seed']} "
            f"{rec['setup']['inner']:8s} {rec['seconds']:5.1f}s tight={rec['errs'].get('tight', float('nan')):.2g} "
            f"q={rec['errs'].get('oracle_exact', float('nan')):.2g} {status}",
            flush=True,
        )
        if "repro" in rec:
            print(f"    shrunk to {rec['shrunk']['summary']}: {rec['repro']}", flush=True)
        if len(records) % 25 == 0:
            write_summary(complete=False)  # partial results survive an interrupted run

    if args.verbose:
        for s in seeds:
            print(fuzzgen.source(program_for(s, args)))
    if args.jobs <= 1:
        _worker_init()
        for s in seeds:
            done(run_seed(s, args))
    else:
        _run_pool(seeds, args, done)
    path = write_summary(complete=True)
    fails, wall = summary["failures"], summary["wall_seconds"]
    print(
        f"\n{len(records)} graphs, {fails} failures {summary['by_kind']}, "
        f"{summary['invalid_programs']} invalid programs, "
        f"{wall:.0f} s wall with {args.jobs} jobs; max mesa-vs-oracle difference {summary['max_tight']:.3g}"
    )
    print(f"results: {path}")
    cov = summary["coverage"]
    keys = ("decision", "reason", "layout", "grouping", "quantized_op", "bits", "dtype", "role", "recompute",
            "recomputed_role", "program")  # fmt: skip
    for key in keys:
        if key in cov:
            print(f"  {key}: {cov[key]}")
    if "fw_ops" in cov:
        print(f"  forward-graph ops ({len(cov['fw_ops'])} distinct): {', '.join(cov['fw_ops'])}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
