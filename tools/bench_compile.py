"""Compile time of mesa against Inductor, cold and warm, and the share of it that is the pass's own work.

For each example model and backend, a fresh Python process compiles the model and runs training steps (forward,
loss, backward; no optimizer):

* **compile time** = first step - median of the following steps (what compiling added to the first step);
* **cold**: an empty Inductor cache directory (``TORCHINDUCTOR_CACHE_DIR``); **warm**: a second process on the same
  directory (Inductor's FX-graph, AOTAutograd and C++ kernel caches filled). mesa's graphs are served from the
  AOTAutograd cache too (its key includes the partitioner's ``uuid()``, which hashes the pass's source, the config
  and what the analysis reads; the plans are restored beside the entry: ``actpass/cache.py``), so a warm mesa
  process neither partitions nor plans;
* **pass time**: ``MesaBackend.timings``, the wall time of ``analysis.plan_graph`` + ``rewrite.apply_plan`` summed
  over graphs. The goal is pass time <= 10% of the compile time mesa adds to Inductor (mesa - inductor).

actpass's C++ kernels are loaded before the clock starts (their one-time build is not compile time). Rounds
interleave the backends, so a change in machine load hits both; the load average is recorded before and after.

Usage::

    python tools/bench_compile.py                      # vit and gpt, 3 rounds, writes tools/results/compile-<cpu>.json
    python tools/bench_compile.py --models vit --rounds 1 --steps 3

It prints a table and writes JSON. It is a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"vit": "examples/vit.py", "gpt": "examples/gpt.py"}
BACKENDS = ("inductor", "mesa")


# ----------------------------------------------------------------------------------------------------------- child


def child(model_name: str, backend_name: str, steps: int) -> dict[str, Any]:
    """One process: compile, run ``steps`` training steps, return the timings (runs in a subprocess)."""
    import torch

    import actpass
    from actpass import _extension
    from actpass.modelfile import load_model_file

    _extension.load_once()  # a kernel build or load is not compile time
    torch.manual_seed(0)
    spec = load_model_file(ROOT / MODELS[model_name], device="cpu")
    backend: Any = actpass.mesa() if backend_name == "mesa" else "inductor"
    compiled = torch.compile(spec.model, backend=backend)
    times = []
    for _ in range(steps):
        for p in spec.model.parameters():
            p.grad = None
        start = time.perf_counter()
        loss = spec.loss_fn(compiled(*spec.args, **spec.kwargs))
        loss.backward()
        times.append(time.perf_counter() - start)
    steady = statistics.median(times[1:])
    from torch._dynamo.utils import counters

    out: dict[str, Any] = {
        "first_step_s": times[0],
        "steady_step_s": steady,
        "compile_s": times[0] - steady,
        "step_times_s": times,
        # which of Inductor's caches hit: fxgraph_cache_{hit,miss,bypass}, autograd_cache_{hit,miss,bypass}
        "cache_counters": {k: v for k, v in counters["inductor"].items() if "cache" in k},
    }
    if backend_name == "mesa":
        out["graphs"] = len(backend.plans)
        out["pass_s"] = sum(t.analysis_seconds + t.rewrite_seconds for t in backend.timings)
        out["analysis_s"] = sum(t.analysis_seconds for t in backend.timings)
        out["rewrite_s"] = sum(t.rewrite_seconds for t in backend.timings)
    return out


# ---------------------------------------------------------------------------------------------------------- parent


def _run_child(model: str, backend: str, steps: int, cache_dir: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir),
        # NOTE: one compile worker and one OpenMP thread: the machine's 2 cores are shared, and parallel compile
        # workers would make the numbers depend on how many cores happen to be free.
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, __file__, "--child", model, backend, "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"bench_compile: {model}/{backend} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{"))
    return json.loads(line)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = re.search(r"model name\s*:\s*(.+)", text).group(1)  # type: ignore[union-attr]
    except (OSError, AttributeError):
        pass
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "actpass"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of cold+warm per backend")
    parser.add_argument("--steps", type=int, default=4, help="training steps per process (the first compiles)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default tools/results/compile-<cpu>.json)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.steps)))
        return 0
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step compiles, the others are the steady state)")

    import torch

    runs: list[dict[str, Any]] = []
    load_before = _loadavg()
    start = time.time()
    for r in range(args.rounds):
        for model in args.models:
            for backend in BACKENDS:
                with tempfile.TemporaryDirectory(prefix="bench_compile_") as cache:
                    for state in ("cold", "warm"):
                        load = _loadavg()
                        result = _run_child(model, backend, args.steps, Path(cache))
                        result.update(model=model, backend=backend, state=state, round=r, loadavg_before=load)
                        runs.append(result)
                        pass_s = f", pass {result['pass_s']:.3f} s" if "pass_s" in result else ""
                        print(
                            f"round {r} {model:4s} {backend:8s} {state}: compile {result['compile_s']:6.2f} s, "
                            f"step {result['steady_step_s'] * 1e3:7.1f} ms{pass_s}  (load {load})",
                            flush=True,
                        )
    summary = []
    for model in args.models:
        for state in ("cold", "warm"):
            key = (model, state)
            sel = {b: [x for x in runs if (x["model"], x["state"]) == key and x["backend"] == b] for b in BACKENDS}
            ind, mesa = _median(sel["inductor"], "compile_s"), _median(sel["mesa"], "compile_s")
            pass_s = _median(sel["mesa"], "pass_s")
            added = None if ind is None or mesa is None else mesa - ind
            summary.append(
                {
                    "model": model,
                    "state": state,
                    "inductor_compile_s": ind,
                    "mesa_compile_s": mesa,
                    "added_s": added,
                    "pass_s": pass_s,
                    "analysis_s": _median(sel["mesa"], "analysis_s"),
                    "rewrite_s": _median(sel["mesa"], "rewrite_s"),
                    "pass_share_of_added": None if not added or added <= 0 or pass_s is None else pass_s / added,
                }
            )
    print()
    print(f"{'model':6s} {'state':5s} {'inductor':>9s} {'mesa':>9s} {'added':>9s} {'pass':>8s} {'pass/added':>10s}")
    for s in summary:
        share = s["pass_share_of_added"]
        print(
            f"{s['model']:6s} {s['state']:5s} {s['inductor_compile_s']:8.2f}s {s['mesa_compile_s']:8.2f}s "
            f"{s['added_s']:+8.2f}s {s['pass_s']:7.3f}s {'n/a' if share is None else f'{share:.1%}':>10s}"
        )
    result = {
        "benchmark": "bench_compile",
        "command": " ".join([Path(sys.executable).name, "tools/bench_compile.py", *(argv or sys.argv[1:])]),
        "commit": _git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "settings": {"TORCHINDUCTOR_COMPILE_THREADS": 1, "OMP_NUM_THREADS": 1, "steps": args.steps},
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "wall_s": round(time.time() - start, 1),
        "summary": summary,
        "runs": runs,
    }
    out = args.out or ROOT / "tools" / "results" / f"compile-cpu-{_cpu_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
