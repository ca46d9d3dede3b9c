"""The planner's memory and one-step error goals, on the training suite's models (``tools/suite.py``).

For each task, one training step (step 0 of seed 0: the same weights and batch for every configuration):

* **saved bytes**, measured with saved-tensor hooks (``actpass.measure.SavedTensorCounter``: parameters and inputs
  left out), for ``torch.compile(backend="inductor")`` and for mesa with ``bits=8``, ``bits=4``, ``bits=2`` and
  budgets of 25%, 15% and 10% of inductor's bytes, in fp32; inductor and mesa 8-bit under bf16 autocast;
* **one-step gradient error**, global relative L2, against eager in the same precision, with inductor's own error
  beside it (under bf16 the baseline's own error is the yardstick: issue 8 asks for at most 3x). Under bf16 both
  are also given against eager in fp32: inductor's error there is what bf16 autocast itself costs the gradient,
  while against eager bf16 it is only fusion's reordering of the same roundings;
* for budgets: the measured bytes against the budget asked for, and the planner's **estimated error** next to the
  measured one.

Usage::

    python tools/bench_planner.py                         # every task; tools/results/planner-cpu.json
    python tools/bench_planner.py --tasks hf-gpt2 vit --configs bits8 bits4

Goals (issue 8): 8-bit >= 3.7x smaller than inductor in fp32 and >= 2.2x under bf16, error <= 1% (fp32) and <= 3x
inductor's own (bf16); 4-bit >= 7x with error <= 3%; 2-bit or a budget of a tenth >= 10x with error <= 6%; budgets
measured within 2% under what was asked, estimated error within 2x of the measured one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402

import actpass  # noqa: E402
from actpass.measure import SavedTensorCounter, exclusions  # noqa: E402

RESULTS = suite.ROOT / "tools" / "results"
CONFIGS: dict[str, dict[str, Any]] = {
    "bits8": {},
    "bits4": {"bits": 4},
    "bits2": {"bits": 2},
    "budget25": {"budget": 0.25},
    "budget15": {"budget": 0.15},
    "budget10": {"budget": 0.10},
    "bits8-bf16": {},
    "bits4-bf16": {"bits": 4},
    "bits8-fused-bf16": {"codec": "fused"},  # aten ops for the 16-bit tensors too (auto: the extension kernels)
    # the 8-bit error target (MesaConfig.max_error, default 0.05) loosened or tightened: how much size each step buys
    "bits8-err005": {"max_error": 0.005},  # the default before the convergence suite chose 0.05
    "bits8-err01": {"max_error": 0.01},
    "bits8-err02": {"max_error": 0.02},
    "bits8-err05": {"max_error": 0.05},
    "bits8-codes": {"max_error": 1e9},
    "bits8-err02-bf16": {"max_error": 0.02},
    "bits8-codes-bf16": {"max_error": 1e9},
}


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in b)
    den = sum(float(b[k].float().pow(2).sum()) for k in b)
    return math.sqrt(num / den) if den else 0.0


def step(t: suite.Task, backend: Any, bf16: bool) -> dict[str, Any]:
    """One step of a fresh model: measured saved bytes, gradients, plans."""
    torch._dynamo.reset()
    model = t.build()
    compiled = model if backend == "eager" else torch.compile(model, backend=backend)
    batch = t.batches[0]
    torch.manual_seed(t.seed)
    t0 = time.perf_counter()
    with SavedTensorCounter(exclusions(model, batch)) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = t.loss(compiled, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    res = counter.result()
    return {"bytes": res.total, "eager_bytes": res.eager_bytes, "grads": grads, "seconds": time.perf_counter() - t0}


def run_task(name: str, configs: list[str], log) -> dict[str, Any]:
    t = suite.task(name, 1, 0)
    out: dict[str, Any] = {"data": t.data}
    refs = {}
    # fp32 runs whenever anything runs: fp32 eager is also the bf16 configurations' second yardstick (the gradient
    # bf16 training approximates)
    precisions = {False} | {c.endswith("-bf16") for c in configs}
    for bf16 in (False, True):
        if bf16 not in precisions:
            continue
        tag = "bf16" if bf16 else "fp32"
        eager = step(t, "eager", bf16)
        ind = step(t, "inductor", bf16)
        refs[tag] = (eager, ind)
        out[f"inductor-{tag}"] = {"bytes": ind["bytes"], "error": _rel(ind["grads"], eager["grads"])}
        msg = f"{name} inductor {tag}: {ind['bytes']:,} B, error vs eager {out[f'inductor-{tag}']['error']:.3%}"
        if bf16:
            out["inductor-bf16"]["error_vs_fp32"] = _rel(ind["grads"], refs["fp32"][0]["grads"])
            msg += f", vs fp32 eager {out['inductor-bf16']['error_vs_fp32']:.3%}"
        log(msg)
    for c in configs:
        tag = "bf16" if c.endswith("-bf16") else "fp32"
        eager, ind = refs[tag]
        be = actpass.mesa(**CONFIGS[c])
        try:
            r = step(t, be, tag == "bf16")
        except Exception as e:  # noqa: BLE001 - a benchmark records what failed and goes on
            msg = str(e).splitlines()
            out[c] = {"failed": next((m for m in msg if "actpass" in m), msg[0] if msg else repr(e))}
            log(f"{name} {c}: FAILED {out[c]['failed']}")
            continue
        plans = be.plans
        row: dict[str, Any] = {
            "bytes": r["bytes"],
            "smaller": ind["bytes"] / max(r["bytes"], 1),
            "error_vs_eager": _rel(r["grads"], eager["grads"]),
            "error_vs_inductor": _rel(r["grads"], ind["grads"]),
            "estimated_error": math.sqrt(sum(p.est_error**2 for p in plans)),
            "planned_before": sum(p.saved_bytes_before for p in plans),
            "planned_after": sum(p.saved_bytes_after for p in plans),
            "quantized": sum(len(p.quantized) for p in plans),
            "recomputed": sum(len(p.recomputed) for p in plans),
            "bits": sorted({t.bits for p in plans for t in p.quantized}),
            "rewrite_failed": [s.detail for s in be.skips if s.reason.value == "rewrite failed"],
        }
        budget = CONFIGS[c].get("budget")
        if budget is not None:
            # A fraction of what the baseline's compiled graphs save (MesaConfig.budget); bytes saved outside them (a
            # loss computed in eager after the compiled model: 2,564 B on vit) are not the pass's, on either side.
            asked = budget * (ind["bytes"] - ind["eager_bytes"])
            row["budget_bytes"] = asked
            row["eager_bytes"] = r["eager_bytes"]
            row["fill"] = (r["bytes"] - r["eager_bytes"]) / asked  # goal: in [0.98, 1.0]
        if tag == "bf16":
            # Two yardsticks for "inductor's own bf16 error": against eager in bf16 (what fusion changes: the same
            # roundings in another order), and against eager in fp32 (what bf16 autocast itself costs the gradient).
            row["error_vs_inductor_own"] = row["error_vs_eager"] / max(out["inductor-bf16"]["error"], 1e-12)
            row["error_vs_fp32"] = _rel(r["grads"], refs["fp32"][0]["grads"])
            row["error_vs_fp32_ratio"] = row["error_vs_fp32"] / max(out["inductor-bf16"]["error_vs_fp32"], 1e-12)
        out[c] = row
        extra = f", fill {row['fill']:.3f}" if "fill" in row else ""
        if tag == "bf16":
            extra += (
                f", {row['error_vs_inductor_own']:.2f}x inductor's vs eager bf16, vs fp32 eager "
                f"{row['error_vs_fp32']:.3%} ({row['error_vs_fp32_ratio']:.2f}x inductor's)"
            )
        log(
            f"{name} {c}: {r['bytes']:,} B ({row['smaller']:.2f}x smaller), error vs eager {row['error_vs_eager']:.3%} "
            f"(estimated {row['estimated_error']:.3%}){extra}"
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=list(suite.TASKS), default=list(suite.TASKS))
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "planner-cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "command": " ".join(["python tools/bench_planner.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": suite.machine(),
        "configs": {c: CONFIGS[c] for c in args.configs},
        "tasks": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.tasks:
        results["tasks"][name] = run_task(name, args.configs, lambda m: print(m, flush=True))
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
