"""Is a budget plan as good as its options allow? The planner's knapsack against an exact one, on real models.

For each task and budget fraction, this compiles one training step with ``actpass.mesa(budget=fraction)``, captures
the candidates the planner hands :func:`actpass.planner.solve_budget` (every storage's options: bytes, estimated
error), and solves the same multiple-choice knapsack exactly by dynamic programming over bytes (rounded up to
``--quantum`` bytes, so the exact solver never overspends). It prints and writes, per graph:

* the greedy plan's bytes and estimated error, and the exact optimum's error, both over whole storages;
* the room the greedy plan leaves, and the cheapest single change that would lower the estimated error (upgrading one
  storage to any of its options with less error): when that costs more than the room left, no plan of whole storages
  with less error fits, so an under-filled budget is the options' granularity, not the solver;
* the final plan after the split fill (``planner.split_fill``: the leading rows of a storage at its next option),
  its bytes, fill and estimated error, and the fill measured with saved-tensor hooks.

    python tools/check_budget.py --tasks hf-llama:0.25 hf-llama:0.15 hf-vit:0.25 vit:0.25
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch._functorch.config

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_planner  # noqa: E402
import suite  # noqa: E402

import actpass  # noqa: E402
from actpass import planner  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def exact_min_error(candidates: dict[str, list[planner.Option]], budget: int, quantum: int) -> float:
    """Least total squared estimated error within ``budget`` bytes, each option's bytes rounded up to ``quantum``."""
    cap = budget // quantum
    best = [0.0] * (cap + 1)  # best[b]: least error of the items so far within b quanta
    for opts in candidates.values():
        costs = [(-(-o.bytes // quantum), o.err**2) for o in opts]
        best = [min((best[b - w] + e2 for w, e2 in costs if w <= b), default=math.inf) for b in range(cap + 1)]
    return best[cap]


def cheapest_improvement(candidates: dict[str, list[planner.Option]], chosen: dict[str, planner.Option]) -> int | None:
    """Bytes added by the cheapest single-storage change that lowers the estimated error (None: nothing lowers it)."""
    steps = [o.bytes - chosen[k].bytes for k, opts in candidates.items() for o in opts if o.err < chosen[k].err]
    return min(steps) if steps else None


def check(task: str, fraction: float, quantum: int) -> list[dict]:
    captured: list[tuple[dict, int, dict]] = []  # per graph: the candidates, its budget, the planner's choice
    solve = planner.solve_budget

    def spy(candidates, budget):
        chosen, reachable = solve(candidates, budget)
        # the knapsack's own choice, and the dict the planner then fills with splits (the final plan)
        captured.append((candidates, budget, dict(chosen) if chosen is not None else None, chosen))
        return chosen, reachable

    planner.solve_budget = spy
    try:
        t = suite.task(task, 1, 0)
        inductor = bench_planner.step(t, "inductor", False)
        measured = bench_planner.step(t, actpass.mesa(budget=fraction), False)
    finally:
        planner.solve_budget = solve
    rows = []
    for i, (candidates, budget, chosen, final) in enumerate(captured):
        used = sum(o.bytes for o in chosen.values())
        greedy = math.sqrt(sum(o.err**2 for o in chosen.values()))
        final_bytes = sum(o.bytes for o in final.values())
        exact = math.sqrt(exact_min_error(candidates, budget, quantum))
        step = cheapest_improvement(candidates, chosen)
        rows.append(
            {
                "task": task,
                "fraction": fraction,
                "graph": i,
                "storages": len(candidates),
                "graph_budget": budget,
                "greedy_bytes": used,
                "greedy_fill": used / budget,
                "greedy_error": greedy,
                "exact_error": exact,
                "room_left": budget - used,
                "cheapest_improvement": step,
                "final_bytes": final_bytes,
                "final_fill": final_bytes / budget,
                "final_error": math.sqrt(sum(o.err**2 for o in final.values())),
                "splits": sum(o.split is not None for o in final.values()),
                "measured_fill": measured["bytes"] / (fraction * inductor["bytes"]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", required=True, help="TASK:FRACTION, e.g. hf-llama:0.25")
    ap.add_argument("--quantum", type=int, default=256, help="bytes per step of the exact solver")
    ap.add_argument("--out", default=str(RESULTS / "budget-check-cpu.json"))
    args = ap.parse_args(argv)
    torch._functorch.config.enable_autograd_cache = False  # a cache hit would skip the planner
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    for spec in args.tasks:
        task, _, frac = spec.partition(":")
        if not frac:
            ap.error(f"--tasks wants TASK:FRACTION, got {spec!r}")
        for r in check(task, float(frac), args.quantum):
            rows.append(r)
            step = r["cheapest_improvement"]
            print(
                f"{task} budget {r['fraction']:g} graph {r['graph']}: {r['storages']} storages, greedy "
                f"{r['greedy_bytes']:,} of {r['graph_budget']:,} B ({r['greedy_fill']:.3f}), est. error "
                f"{r['greedy_error']:.4f}, exact optimum {r['exact_error']:.4f}; room left {r['room_left']:,} B, "
                f"cheapest change that lowers the error {'none' if step is None else f'{step:,} B'}; with "
                f"{r['splits']} split(s): {r['final_bytes']:,} B ({r['final_fill']:.3f}), est. error "
                f"{r['final_error']:.4f}; measured fill {r['measured_fill']:.3f}",
                flush=True,
            )
    out = {"command": "python tools/check_budget.py " + " ".join(argv or sys.argv[1:]), "machine": suite.machine()}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["rows"] = rows
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
