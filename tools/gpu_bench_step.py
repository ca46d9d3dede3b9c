"""GPU training-step benchmark: ``torch.compile(backend="inductor")`` against ``backend="mesa"``.

Two models, built inline in plain PyTorch (``--models examples`` uses ``examples/vit.py`` / ``examples/gpt.py``
instead):

* ``deit_s``: DeiT-S-like ViT, batch 128, 224x224 images, patch 16, dim 384, depth 12, 6 heads, 1000 classes;
* ``gpt2_s``: GPT-2-small-like LM, sequence 1024, dim 768, 12 layers, 12 heads, vocabulary 50257, batch 8.

Each step is ``zero_grad -> forward under bf16 autocast -> loss -> backward -> AdamW step``. For each backend it
reports ``peak_bytes`` (``torch.cuda.max_memory_allocated`` over one whole step, after ``reset_peak_memory_stats``)
and ``step_ms`` (median over ``--steps`` steps after ``--warmup`` steps, timed with CUDA events), then the largest
batch that completes a step when the allocator is capped with ``torch.cuda.set_per_process_memory_fraction``
(doubling, then bisection; ``--no-batch-search`` skips it).

Usage (on a GPU machine, with actpass installed so that ``backend="mesa"`` resolves)::

    python tools/gpu_bench_step.py                         # both models -> tools/results/gpu-step-<gpu>.json
    python tools/gpu_bench_step.py --model deit_s --steps 20 --memory-fraction 0.25
    python tools/gpu_bench_step.py --smoke-cpu             # tiny models on CPU: checks the harness, no numbers

Without CUDA (and without ``--smoke-cpu``) it exits at once with a one-line message. Nothing in the package imports
this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------------------
# Models (inline, plain PyTorch).


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    img: int = 224
    patch: int = 16
    dim: int = 384
    depth: int = 12
    heads: int = 6
    classes: int = 1000
    mlp_ratio: int = 4


@dataclasses.dataclass(frozen=True)
class GPTSpec:
    seq: int = 1024
    dim: int = 768
    layers: int = 12
    heads: int = 12
    vocab: int = 50257
    mlp_ratio: int = 4


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, causal: bool, eps: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, heads, causal)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, s: ViTSpec) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, s.dim, s.patch, s.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, s.dim))
        self.pos = nn.Parameter(torch.randn(1, (s.img // s.patch) ** 2 + 1, s.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(s.dim, s.heads, s.mlp_ratio, False, 1e-6) for _ in range(s.depth))
        self.norm = nn.LayerNorm(s.dim, eps=1e-6)
        self.head = nn.Linear(s.dim, s.classes)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        x = self.embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return F.cross_entropy(self.head(self.norm(x[:, 0])).float(), labels)


class GPT(nn.Module):
    def __init__(self, s: GPTSpec) -> None:
        super().__init__()
        self.tok = nn.Embedding(s.vocab, s.dim)
        self.pos = nn.Embedding(s.seq, s.dim)
        self.blocks = nn.ModuleList(Block(s.dim, s.heads, s.mlp_ratio, True, 1e-5) for _ in range(s.layers))
        self.norm = nn.LayerNorm(s.dim)
        self.head = nn.Linear(s.dim, s.vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as GPT-2
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    batch: int  # the batch the step is timed at
    build: Callable[[], nn.Module]  # model on CPU, fp32
    inputs: Callable[[int, str], tuple[Tensor, ...]]  # (batch, device) -> forward args; forward returns the loss
    batch_quantum: int  # granularity of the largest-batch bisection


def _vit_inputs(s: ViTSpec) -> Callable[[int, str], tuple[Tensor, ...]]:
    def make(batch: int, device: str) -> tuple[Tensor, ...]:
        g = torch.Generator(device=device).manual_seed(0)
        images = torch.randn(batch, 3, s.img, s.img, device=device, generator=g)
        return images, torch.randint(s.classes, (batch,), device=device, generator=g)

    return make


def _gpt_inputs(s: GPTSpec) -> Callable[[int, str], tuple[Tensor, ...]]:
    def make(batch: int, device: str) -> tuple[Tensor, ...]:
        g = torch.Generator(device=device).manual_seed(0)
        tokens = torch.randint(s.vocab, (batch, s.seq + 1), device=device, generator=g)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    return make


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build()

    return make


def inline_workloads(tiny: bool = False) -> dict[str, Workload]:
    vit = ViTSpec(img=32, patch=8, dim=64, depth=2, heads=4, classes=10) if tiny else ViTSpec()
    gpt = GPTSpec(seq=64, dim=64, layers=2, heads=4, vocab=128) if tiny else GPTSpec()
    return {
        "deit_s": Workload("deit_s", 4 if tiny else 128, _seeded(lambda: ViT(vit)), _vit_inputs(vit), 8),
        "gpt2_s": Workload("gpt2_s", 2 if tiny else 8, _seeded(lambda: GPT(gpt)), _gpt_inputs(gpt), 1),
    }


def _load_example(name: str):
    path = ROOT / "examples" / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"gpu_bench_step: {path} not found (use --models inline)")
    spec = importlib.util.spec_from_file_location(f"_bench_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def example_workloads() -> dict[str, Workload]:
    """The same two models from ``examples/`` (presets ``deit_small`` and ``gpt2_small``)."""
    vit, gpt = _load_example("vit"), _load_example("gpt")
    vit_cfg = vit.PRESETS["deit_small"]

    class ViTLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = vit.build_model("deit_small")

        def forward(self, images: Tensor, labels: Tensor) -> Tensor:
            return F.cross_entropy(self.model(images).float(), labels)

    class GPTLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = gpt.build_model("gpt2_small")

        def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
            return self.model(idx, targets).loss

    s_vit = ViTSpec(img=vit_cfg.img_size, classes=vit_cfg.num_classes)
    s_gpt = GPTSpec(seq=gpt.PRESETS["gpt2_small"].block_size, vocab=gpt.PRESETS["gpt2_small"].vocab_size)
    return {
        "deit_s": Workload("deit_s", 128, ViTLoss, _vit_inputs(s_vit), 8),
        "gpt2_s": Workload("gpt2_s", 8, GPTLoss, _gpt_inputs(s_gpt), 1),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Harness.


def resolve_backend(name: str):
    """``"mesa"`` through the torch_dynamo_backends entry point, or actpass.backend when it is not installed."""
    if name != "mesa":
        return name
    import torch._dynamo

    if "mesa" in torch._dynamo.list_backends():
        return "mesa"
    sys.path.insert(0, str(ROOT))
    from actpass.backend import mesa_backend

    return mesa_backend


def _cleanup(device: str) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class Run:
    """One model + optimizer + compiled step on one device."""

    def __init__(self, wl: Workload, backend: str, batch: int, device: str, precision: torch.dtype) -> None:
        self.device, self.precision = device, precision
        self.model = wl.build().to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.inputs = wl.inputs(batch, device)
        self.compiled = torch.compile(self.model, backend=resolve_backend(backend), dynamic=False)

    def step(self) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device, dtype=self.precision):
            loss = self.compiled(*self.inputs)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def peak_bytes(self) -> int | None:
        """Peak allocated bytes over one whole step (None off CUDA)."""
        self.sync()
        if self.device != "cuda":
            self.step()
            return None
        torch.cuda.reset_peak_memory_stats()
        self.step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())

    def step_ms(self, steps: int) -> float:
        times = []
        for _ in range(steps):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                self.step()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def measure(wl: Workload, backend: str, device: str, precision: torch.dtype, warmup: int, steps: int) -> dict:
    run = Run(wl, backend, wl.batch, device, precision)
    t0 = time.perf_counter()
    loss = run.step()  # compiles
    run.sync()
    compile_s = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        run.step()
    out = {"peak_bytes": run.peak_bytes(), "step_ms": round(run.step_ms(steps), 3)}
    out["first_step_s"] = round(compile_s, 1)
    out["loss_first_step"] = float(loss)
    del run
    _cleanup(device)
    return out


def fits(wl: Workload, backend: str, batch: int, device: str, precision: torch.dtype) -> bool:
    """Whether two training steps at ``batch`` complete without running out of memory."""
    run = None
    try:
        run = Run(wl, backend, batch, device, precision)
        run.step()
        run.step()
        run.sync()
        return True
    except Exception as e:  # OOM, possibly wrapped by the compiler (e.g. during autotuning)
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            return False
        raise
    finally:
        del run
        _cleanup(device)


def largest_batch(wl: Workload, backend: str, device: str, precision: torch.dtype, cap: int, max_trials: int) -> dict:
    """Doubling from the benchmark batch, then bisection to ``wl.batch_quantum``; at most ``max_trials`` trials."""
    trials: list[tuple[int, bool]] = []

    def trial(b: int) -> bool:
        ok = fits(wl, backend, b, device, precision)
        trials.append((b, ok))
        print(f"  {wl.name} {backend}: batch {b} {'fits' if ok else 'OOM'}", flush=True)
        return ok

    good, bad = 0, None
    b = wl.batch
    while len(trials) < max_trials and b <= cap:
        if trial(b):
            good, b = b, b * 2
        else:
            bad = b
            break
    if good == 0 and bad is not None:  # the benchmark batch itself does not fit: search downwards
        lo, hi = 0, bad
    else:
        lo, hi = good, bad
    while hi is not None and hi - lo > wl.batch_quantum and len(trials) < max_trials:
        mid = (lo + hi) // 2 // wl.batch_quantum * wl.batch_quantum or max(1, (lo + hi) // 2)
        if mid in (lo, hi):
            break
        if trial(mid):
            lo = mid
        else:
            hi = mid
    return {"largest_batch": lo, "first_failing_batch": hi, "capped_at": cap if hi is None else None, "trials": trials}


def device_name() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["deit_s", "gpt2_s", "all"], default="all")
    parser.add_argument("--models", choices=["inline", "examples"], default="inline", help="where the models come from")
    parser.add_argument("--warmup", type=int, default=3, help="steps before measuring (the first one compiles)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--memory-fraction", type=float, default=0.5, help="allocator cap for the batch search")
    parser.add_argument("--batch-cap", type=int, default=4096, help="largest batch the search tries")
    parser.add_argument("--max-trials", type=int, default=8, help="batch-search trials per model and backend")
    parser.add_argument("--no-batch-search", action="store_true")
    parser.add_argument("--smoke-cpu", action="store_true", help="tiny models on CPU, to check the harness only")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default tools/results/gpu-step-<gpu>.json)")
    args = parser.parse_args(argv)

    if args.smoke_cpu:
        device, precision, workloads = "cpu", torch.bfloat16, inline_workloads(tiny=True)
        args.warmup, args.steps, args.no_batch_search = 3, 3, True
    else:
        if not torch.cuda.is_available():
            print(
                "gpu_bench_step: CUDA is not available: this benchmark needs a GPU (nothing was run)", file=sys.stderr
            )
            return 2
        device, precision = "cuda", torch.bfloat16
        workloads = inline_workloads() if args.models == "inline" else example_workloads()
    names = list(workloads) if args.model == "all" else [args.model]

    results = []
    for name in names:
        wl = workloads[name]
        entry = {
            "device": device_name() if device == "cuda" else "cpu (smoke)",
            "torch": torch.__version__,
            "model": name,
            "models_from": args.models,
            "batch": wl.batch,
            "precision": "bf16-autocast",
        }
        for backend, key in (("inductor", "baseline"), ("mesa", "mesa")):
            print(f"{name}: {key} (backend={backend}) ...", flush=True)
            entry[key] = measure(wl, backend, device, precision, args.warmup, args.steps)
            print(f"  {entry[key]}", flush=True)
        base, mesa = entry["baseline"], entry["mesa"]
        if base["peak_bytes"] and mesa["peak_bytes"]:
            entry["peak_reduction"] = round(1 - mesa["peak_bytes"] / base["peak_bytes"], 4)
        entry["step_time_ratio"] = round(mesa["step_ms"] / base["step_ms"], 3)
        if not args.no_batch_search:
            torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
            try:
                entry["batch_search"] = {"memory_fraction": args.memory_fraction}
                for backend, key in (("inductor", "baseline"), ("mesa", "mesa")):
                    found = largest_batch(wl, backend, device, precision, args.batch_cap, args.max_trials)
                    entry["batch_search"][key] = found
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0)
        results.append(entry)

    def gib(v: int | None) -> str:
        return "n/a" if v is None else f"{v / 2**30:.2f} GiB"

    for e in results:
        b, m = e["baseline"], e["mesa"]
        line = (
            f"{e['model']:7s} batch {e['batch']:4d}  peak {gib(b['peak_bytes'])} -> {gib(m['peak_bytes'])}"
            f"  step {b['step_ms']:.1f} -> {m['step_ms']:.1f} ms"
        )
        if "batch_search" in e:
            bs = e["batch_search"]
            line += f"  largest batch {bs['baseline']['largest_batch']} -> {bs['mesa']['largest_batch']}"
        print(line)
    out = args.out or ROOT / "tools" / "results" / (
        "gpu-step-smoke-cpu.json" if args.smoke_cpu else f"gpu-step-{device_name()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(math.isfinite(e[k]["loss_first_step"]) for e in results for k in ("baseline", "mesa")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
