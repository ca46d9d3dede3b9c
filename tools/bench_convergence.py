"""Convergence on CPU: does training with mesa reach the same loss as ``torch.compile(backend="inductor")``?

Two small real tasks, with data that ships with an installed package (nothing is downloaded):

* ``vit``: :mod:`examples.vit`'s ViT (8x8 single-channel images, patch 2, dim 64, depth 4, 4 heads) on
  scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``: 1797 images, 10 classes), with a fixed
  held-out split for accuracy;
* ``gpt``: :mod:`examples.gpt`'s GPT (byte-level, context 64, dim 128, 4 layers, 4 heads) on the Python standard
  library's source: the ``Lib/*.py`` files of this interpreter (``sysconfig.get_paths()["stdlib"]``), sorted by name
  and concatenated, the last 10% held out for a validation loss.

Each task trains once per configuration, from the same initial weights on the same batches (drawn from a generator
seeded per task, so stochastic rounding's random numbers do not shift them):

* ``inductor``: the baseline;
* ``mesa-8bit``: 8-bit, nearest rounding, per-step (dynamic) statistics;
* ``mesa-8bit-sr-running``: 8-bit, stochastic rounding, running (EMA) statistics: Mesa's setting;
* ``mesa-4bit``: 4-bit, nearest rounding, dynamic statistics.

The final loss is the mean training loss of the last 50 steps; the table gives its ratio to the baseline's (goal:
8-bit within 1%). Loss curves and results go to ``tools/results/convergence-cpu.json`` and a PNG plot.

Usage::

    pip install scikit-learn matplotlib          # benchmark-only dependencies
    python tools/bench_convergence.py            # 500 steps per run, both tasks, all configurations
    python tools/bench_convergence.py --quick    # a smoke test: 60 steps, results under *-quick.*
    python tools/bench_convergence.py --tasks gpt --configs inductor mesa-8bit --steps 1000
    python tools/bench_convergence.py --seeds 0 1 2   # paired runs per seed; the table gives the ratios' range
    python tools/bench_convergence.py --plot-only tools/results/convergence-cpu.json   # table and plot again

Results in ``tools/results/`` (each file records its command, machine, commit and uncommitted changes):

* ``convergence-cpu.json``: the default run (both tasks, seed 0, the five default configurations);
* ``convergence-cpu-ablation.json``: ``--configs inductor mesa-8bit-sr mesa-8bit-running mesa-8bit-sr-running
  mesa-4bit-sr``, which of Mesa's two choices (stochastic rounding, running statistics) moves the loss;
* ``convergence-cpu-vit-seeds.json``: ``--tasks vit --seeds 0 1 2 3``; the ViT's final training loss is small
  (~0.1) and moves by up to ~25% between runs that differ only in fp32 rounding (``eager`` vs ``inductor``), so it
  needs several seeds. GPT's does not (eager and inductor agree to 4 digits).

Step times in these files were taken on a 2-core machine shared with other jobs (and sometimes with a second run of
this script): they are not performance numbers; ``tools/bench_memory.py`` measures speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from gpt import GPT, GPTConfig  # noqa: E402
from vit import ViT, ViTConfig  # noqa: E402

RESULTS = ROOT / "tools" / "results"
TAIL = 50  # the final loss is the mean of the last TAIL steps

# name -> torch.compile backend name, or mesa options
CONFIGS: dict[str, str | dict[str, Any]] = {
    "inductor": "inductor",  # the baseline
    "eager": "eager",  # control: exact fp32 too, but other kernels, so bit-level differences from the baseline
    "mesa-8bit": {"bits": 8, "rounding": "nearest", "stats": "dynamic"},
    "mesa-8bit-sr-running": {"bits": 8, "rounding": "stochastic", "stats": "running"},
    "mesa-4bit": {"bits": 4, "rounding": "nearest", "stats": "dynamic"},
    # Ablations (not run by default): which of Mesa's two choices does what.
    "mesa-8bit-sr": {"bits": 8, "rounding": "stochastic", "stats": "dynamic"},
    "mesa-8bit-running": {"bits": 8, "rounding": "nearest", "stats": "running"},
    "mesa-4bit-sr": {"bits": 4, "rounding": "stochastic", "stats": "dynamic"},
}
DEFAULT_CONFIGS = ["inductor", "eager", "mesa-8bit", "mesa-8bit-sr-running", "mesa-4bit"]

VIT = ViTConfig(img_size=8, patch_size=2, in_chans=1, dim=64, depth=4, heads=4, num_classes=10)
GPT_CFG = GPTConfig(vocab_size=256, block_size=64, n_embd=128, n_layer=4, n_head=4)


# --- data -----------------------------------------------------------------------------------------------------------


def digits(test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: the 8x8 digits as ``(N, 1, 8, 8)`` floats standardised on the training
    split, with a fixed random split (the same for every seed)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("the vit task needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def stdlib_bytes(max_bytes: int = 4 << 20) -> Tensor:
    """Up to ``max_bytes`` of the standard library's ``Lib/*.py`` files, sorted by name, as int64 byte values."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise SystemExit(f"no *.py files under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


@dataclasses.dataclass
class Task:
    name: str
    build: Any  # () -> nn.Module
    batches: list[tuple[Tensor, ...]]  # one per step, identical for every configuration
    loss: Any  # (model, batch) -> scalar loss
    evaluate: Any  # (model) -> dict of held-out metrics
    data: str  # description for the results file
    seed: int  # model initialisation and batch order


def vit_task(steps: int, batch: int, seed: int) -> Task:
    x_tr, y_tr, x_te, y_te = digits()
    g = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(steps):
        i = torch.randint(len(y_tr), (batch,), generator=g)
        batches.append((x_tr[i], y_tr[i]))

    def build() -> nn.Module:
        torch.manual_seed(seed)
        return ViT(VIT)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        logits = model(x_te)
        model.train()
        return {
            "test_accuracy": (logits.argmax(-1) == y_te).float().mean().item(),
            "test_loss": F.cross_entropy(logits, y_te).item(),
        }

    return Task(
        name="vit",
        build=build,
        batches=batches,
        loss=lambda model, b: F.cross_entropy(model(b[0]), b[1]),
        evaluate=evaluate,
        data=f"sklearn load_digits: {len(y_tr)} train / {len(y_te)} test images, batch {batch}",
        seed=seed,
    )


def gpt_task(steps: int, batch: int, seed: int) -> Task:
    text = stdlib_bytes()
    split = int(len(text) * 0.9)
    train, val = text[:split], text[split:]
    t = GPT_CFG.block_size
    offsets = torch.arange(t + 1)
    g = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(steps):
        tok = train[torch.randint(len(train) - t - 1, (batch, 1), generator=g) + offsets]
        batches.append((tok[:, :-1].contiguous(), tok[:, 1:].contiguous()))
    gv = torch.Generator().manual_seed(seed + 2)
    val_batches = []
    for _ in range(8):
        tok = val[torch.randint(len(val) - t - 1, (32, 1), generator=gv) + offsets]
        val_batches.append((tok[:, :-1].contiguous(), tok[:, 1:].contiguous()))

    def build() -> nn.Module:
        torch.manual_seed(seed)
        return GPT(GPT_CFG)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        losses = [model(idx, tgt).loss.item() for idx, tgt in val_batches]
        model.train()
        return {"val_loss": sum(losses) / len(losses)}

    return Task(
        name="gpt",
        build=build,
        batches=batches,
        loss=lambda model, b: model(*b).loss,
        evaluate=evaluate,
        data=f"stdlib Lib/*.py: {len(text)} bytes ({len(train)} train / {len(val)} val), batch {batch}",
        seed=seed,
    )


# --- training -------------------------------------------------------------------------------------------------------


def train(task: Task, config: str, lr: float, log_every: int) -> dict[str, Any]:
    """Train a fresh model of ``task`` on its batches with ``config``; the loss of every step and held-out metrics."""
    import actpass

    torch._dynamo.reset()
    model = task.build().train()
    spec = CONFIGS[config]
    options = spec if isinstance(spec, dict) else None
    if options is None:
        backend: Any = spec
        compiled = model if spec == "eager" else torch.compile(model, backend=spec)
    else:
        backend = actpass.mesa(store=actpass.RunningStats(), **options)  # a fresh store: no statistics carried over
        compiled = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses: list[float] = []
    first = 0.0
    t0 = time.perf_counter()
    for step, b in enumerate(task.batches):
        ts = time.perf_counter()
        loss = task.loss(compiled, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 0:
            first = time.perf_counter() - ts
        if log_every and (step + 1) % log_every == 0:
            print(f"  {task.name} {config:22s} step {step + 1:5d}  loss {losses[-1]:.4f}", flush=True)
    total = time.perf_counter() - t0
    n = len(losses)
    result: dict[str, Any] = {
        "seed": task.seed,
        "losses": [round(v, 5) for v in losses],
        "final_loss": sum(losses[-TAIL:]) / len(losses[-TAIL:]),
        "first_step_s": first,  # includes compilation
        "step_ms": (total - first) / max(n - 1, 1) * 1e3,
        **task.evaluate(model),
    }
    if not all(math.isfinite(v) for v in losses):
        result["non_finite_steps"] = sum(not math.isfinite(v) for v in losses)
    if options is not None:
        plans = backend.plans
        result["plans"] = {
            "graphs": len(plans),
            "saved_tensors": sum(len(p.tensors) for p in plans),
            "quantized": sum(len(p.quantized) for p in plans),
            "saved_bytes_before": sum(p.saved_bytes_before for p in plans),
            "saved_bytes_after": sum(p.saved_bytes_after for p in plans),
            "rewrite_failed": [s.detail for s in backend.skips if s.reason.value == "rewrite failed"],
        }
    return result


# --- reporting ------------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD").strip()
    # Uncommitted changes to the pass or the kernels at the time of the run (the results depend on them).
    dirty = [
        line[3:] for line in git("status", "--porcelain", "--", "actpass", "csrc").splitlines() if line[:2].strip()
    ]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


HELD_OUT = ("test_accuracy", "test_loss", "val_loss")


def aggregate(runs: list[dict[str, Any]], base: dict[str, Any] | None) -> dict[str, Any]:
    """Mean over seeds of one configuration's runs; ratios are paired (same seed, same batches) with the baseline."""
    out: dict[str, Any] = {"runs": runs}
    out["final_loss"] = sum(r["final_loss"] for r in runs) / len(runs)
    for k in HELD_OUT:
        if k in runs[0]:
            out[k] = sum(r[k] for r in runs) / len(runs)
    for k in ("step_ms", "first_step_s"):
        out[k] = sum(r[k] for r in runs) / len(runs)
    if base is not None:
        ratios = [r["final_loss"] / b["final_loss"] for r, b in zip(runs, base["runs"], strict=True)]
        out["ratio_per_seed"] = ratios
        out["ratio"] = sum(ratios) / len(ratios)
    if "plans" in runs[0]:
        out["plans"] = runs[0]["plans"]
    return out


def table(results: dict[str, Any]) -> str:
    lines = []
    seeds = results["seeds"]
    for task, rows in results["tasks"].items():
        lines.append(f"\n{task}: {results['task_data'][task]}; mean over seeds {seeds}" if len(seeds) > 1 else "")
        if len(seeds) == 1:
            lines[-1] = f"\n{task}: {results['task_data'][task]}; seed {seeds[0]}"
        header = (
            f"{'config':22s} {'final loss':>10s} {'ratio':>7s} {'ratio range':>15s} {'held-out':>24s} "
            f"{'ms/step':>8s} {'1st step s':>10s}"
        )
        lines += [header, "-" * len(header)]
        for name, r in rows.items():
            ratio = f"{r['ratio']:.4f}" if "ratio" in r else "-"
            spread = (
                f"{min(r['ratio_per_seed']):.4f}..{max(r['ratio_per_seed']):.4f}"
                if "ratio_per_seed" in r and len(seeds) > 1
                else ""
            )
            if "test_accuracy" in r:
                held = f"acc {r['test_accuracy']:.4f} loss {r['test_loss']:.3f}"
            else:
                held = f"val loss {r['val_loss']:.4f}"
            timing = f"{r['step_ms']:8.1f} {r['first_step_s']:10.1f}"
            lines.append(f"{name:22s} {r['final_loss']:10.4f} {ratio:>7s} {spread:>15s} {held:>24s} {timing}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, (task, rows) in zip(axes[0], tasks.items(), strict=True):
        for name, r in rows.items():
            y = torch.tensor([run["losses"] for run in r["runs"]]).mean(0)  # mean curve over seeds
            k = min(25, len(y))
            smooth = y.unfold(0, k, 1).mean(-1)  # moving average over k steps
            x = torch.arange(k, len(y) + 1)
            label = f"{name} ({r['final_loss']:.4f})"
            ax.plot(x.numpy(), smooth.numpy(), label=label, lw=1.2, ls="--" if name == "inductor" else "-")
        seeds = results["seeds"]
        over = f", mean of seeds {seeds}" if len(seeds) > 1 else ""
        ax.set_title(f"{task}: training loss (moving average of 25 steps{over})", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        curves = [v for r in rows.values() for run in r["runs"] for v in run["losses"][25:]]
        if curves and max(curves) > 5 * min(curves):  # log scale where the loss falls by orders of magnitude
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(title=f"final = mean of last {TAIL} steps", fontsize=8)
    fig.suptitle(f"actpass mesa vs inductor, CPU ({results['machine']['cpu']}, torch {results['machine']['torch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=("vit", "gpt"), default=["vit", "gpt"])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS)
    p.add_argument("--steps", type=int, default=500, help="training steps per run (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="60 steps, outputs named *-quick.*: a smoke test")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and configuration")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--log-every", type=int, default=100, help="print the loss every N steps (0: never)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: tools/results/convergence-cpu.json)")
    p.add_argument(
        "--plot-only", type=Path, metavar="JSON", help="print the table and redraw the plot of a results file"
    )
    args = p.parse_args(argv)
    if args.plot_only:
        results = json.loads(args.plot_only.read_text())
        print(table(results))
        plot(results, args.plot_only.with_suffix(".png"))
        return results
    steps = 60 if args.quick else args.steps
    if steps < TAIL and not args.quick:
        p.error(f"--steps must be at least {TAIL}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or RESULTS / f"convergence-cpu{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    builders = {"vit": lambda seed: vit_task(steps, 64, seed), "gpt": lambda seed: gpt_task(steps, 16, seed)}
    lrs = {"vit": 1e-3, "gpt": 1e-3}
    results: dict[str, Any] = {
        "command": " ".join(["python", "tools/bench_convergence.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "steps": steps,
        "seeds": args.seeds,
        "configs": {name: CONFIGS[name] for name in args.configs},
        "final_loss": f"mean training loss of the last {TAIL} steps",
        "models": {"vit": dataclasses.asdict(VIT), "gpt": dataclasses.asdict(GPT_CFG)},
        "lr": lrs,
        "task_data": {},
        "tasks": {},
    }
    print(
        f"{results['machine']['cpu']}, {results['machine']['cores']} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {steps} steps per run"
    )
    t_all = time.perf_counter()
    for name in args.tasks:
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.configs}
        for seed in args.seeds:
            task = builders[name](seed)
            results["task_data"][name] = task.data
            for config in args.configs:
                t0 = time.perf_counter()
                r = train(task, config, lrs[name], args.log_every)
                runs[config].append(r)
                took = time.perf_counter() - t0
                print(f"{name} seed {seed} {config}: final loss {r['final_loss']:.4f} ({took:.0f} s)", flush=True)
        base = runs["inductor"] if "inductor" in runs else None
        results["tasks"][name] = {
            c: aggregate(rs, {"runs": base} if base is not None and c != "inductor" else None) for c, rs in runs.items()
        }
        out.write_text(json.dumps(results, indent=1))  # partial results survive an interrupted run
    results["total_s"] = time.perf_counter() - t_all
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\ntotal {results['total_s']:.0f} s; wrote {out}")
    plot(results, out.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()
