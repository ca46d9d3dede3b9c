"""Time the compiled quantize/dequantize kernels against the PyTorch reference on activation-sized tensors.

For each device (CPU, and CUDA when available), shape, dtype and bit width it reports the median time of the
compiled kernel and of ``actpass._reference``, the speed-up, and the logical bandwidth: bytes the op must move at
least (input read once + output written) per second. A device-to-device copy (``torch.Tensor.copy_``) of the same
input gives the bandwidth ceiling; ``frac_copy`` is the kernel's logical bandwidth as a fraction of it. Each
quantize row also has ``roundtrip_frac_copy``: the copy's time over the quantize + dequantize time, i.e. the
throughput of the round trip (tensor in, codes, tensor out) as a fraction of a copy's (issue 9's goal: >= 0.5 on
[4096, 768] fp32 and bf16 with 1 thread, that is quantize + dequantize within two copies' time). ``clone_ms`` is an
allocating copy (``x.clone()``), as the kernels allocate their outputs. On CPU every configuration is run with 1
intra-op thread and with all of them (``torch.get_num_threads()``): on a shared machine the single-thread numbers are
the stable ones. Times are medians; ``*_min`` fields keep the best run.

Usage::

    python tools/bench_kernels.py                 # CPU (+ CUDA if available), writes tools/results/kernels-<dev>.json
    python tools/bench_kernels.py --device cpu --quick

Results go to ``tools/results/kernels-<device-name>.json`` (device name from /proc/cpuinfo "model name" or the GPU
name). Nothing in the package imports this file.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import actpass.ops  # noqa: E402,F401  (defines torch.ops.actpass)
from actpass import _extension  # noqa: E402
from actpass import _reference as ref  # noqa: E402

# (name, shape, gend, groups): DeiT-S activations at batch 64, issue 9's [4096, 768] goal shape in the layouts the
# planner gives an activation of that shape (per channel; per row for a LayerNorm input), and channel sharing.
SHAPES = [
    ("act [4096,768] per channel", (4096, 768), 2, 768),
    ("act [4096,768] per row", (4096, 768), 1, -1),
    ("shared [4096,192,4] 4 ch/group", (4096, 192, 4), 2, 192),
    ("shared [1024,128,4] 4 ch/group", (1024, 128, 4), 2, 128),
    ("chan [1024,512] per channel", (1024, 512), 2, 512),
    ("mlp [64,197,384] per channel", (64, 197, 384), 3, 384),
    ("attn [64,6,197,197] per (b,h)", (64, 6, 197, 197), 2, -1),
    ("bmm [384,197,64] per head", (384, 197, 64), 1, 6),
    ("rows [12608,384] per row", (64 * 197, 384), 1, -1),
]
GOAL_SHAPES = ("act [4096,768] per channel", "act [4096,768] per row")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def device_name(device: str) -> str:
    """``cpu-<model>`` from /proc/cpuinfo, or the GPU name, lower-case with runs of other characters as ``-``."""
    if device == "cuda":
        raw = torch.cuda.get_device_name()
    else:
        raw = platform.processor() or "unknown"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    raw = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        raw = f"cpu-{raw}"
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median, min) wall time of ``fn`` in ms (CUDA events on CUDA)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def copy_gbps(device: str, nbytes: int, repeats: int) -> float:
    """Bandwidth of a same-device copy of ``nbytes`` (read + write counted, median of ``repeats``), GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda: dst.copy_(src), device, repeats, warmup=2)
    return 2 * nbytes / ms / 1e6


def bench_device(
    device: str, bits_list: list[int], repeats: int, ref_repeats: int, stochastic: bool, threads: int | None
) -> dict:
    """One pass over SHAPES x DTYPES x bits on ``device`` (with ``threads`` intra-op threads on CPU)."""
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads() if device == "cpu" else None
    if not _extension.load_once() or not _extension.has_kernel(device):
        raise SystemExit(f"bench_kernels: no compiled {device} kernel ({_extension.status()['reason']})")
    gen = torch.Generator().manual_seed(0)
    rows = []
    copy_cache: dict[int, float] = {}
    goals = []
    for name, shape, gend, groups in SHAPES:
        base = torch.randn(shape, generator=gen)
        for dname, dtype in DTYPES.items():
            x = base.to(device=device, dtype=dtype)
            in_bytes = x.numel() * x.element_size()
            if in_bytes not in copy_cache:
                copy_cache[in_bytes] = copy_gbps(device, in_bytes, repeats)
            copy_ms = 2 * in_bytes / copy_cache[in_bytes] / 1e6
            clone_ms, _ = time_ms(x.clone, device, repeats)
            for bits in bits_list:
                q, s, lo = torch.ops.actpass.quantize(x, bits, gend, groups, stochastic, None, 0.9)
                q_bytes = q.numel() + 8 * s.numel()
                quantize_args = (x, bits, gend, groups, stochastic, None, 0.9)
                dequantize_args = (q, s, lo, bits, gend, shape[-1], dtype)
                timings = {
                    "quantize": (
                        functools.partial(torch.ops.actpass.quantize, *quantize_args),
                        functools.partial(ref.quantize, *quantize_args),
                        in_bytes + q_bytes,
                    ),
                    "dequantize": (
                        functools.partial(torch.ops.actpass.dequantize, *dequantize_args),
                        functools.partial(ref.dequantize, *dequantize_args),
                        q_bytes + in_bytes,
                    ),
                }
                op_ms = {}
                for op, (compiled, reference, nbytes) in timings.items():
                    ms, ms_min = time_ms(compiled, device, repeats)
                    op_ms[op] = ms
                    ref_ms, ref_min = time_ms(reference, device, ref_repeats)
                    gbps = nbytes / ms / 1e6
                    rows.append(
                        {
                            "op": op,
                            "shape": name,
                            "dtype": dname,
                            "bits": bits,
                            "stochastic": stochastic if op == "quantize" else False,
                            "compiled_ms": round(ms, 3),
                            "compiled_ms_min": round(ms_min, 3),
                            "reference_ms": round(ref_ms, 3),
                            "reference_ms_min": round(ref_min, 3),
                            "speedup": round(ref_ms / ms, 2),
                            "speedup_of_min": round(ref_min / ms_min, 2),
                            "bytes": nbytes,
                            "compiled_GBps": round(gbps, 2),
                            "compiled_GBps_best": round(nbytes / ms_min / 1e6, 2),
                            "copy_GBps": round(copy_cache[in_bytes], 2),
                            "copy_ms": round(copy_ms, 4),
                            "clone_ms": round(clone_ms, 4),
                            "frac_copy": round(gbps / copy_cache[in_bytes], 3),
                        }
                    )
                    r = rows[-1]
                    print(
                        f"{device:4s} t={threads} {op:10s} {name:30s} {dname} {bits}b  compiled {ms:8.2f} ms "
                        f"(min {ms_min:7.2f})  reference {ref_ms:8.2f} ms  x{r['speedup']:6.2f}  "
                        f"{gbps:6.2f} GB/s ({r['frac_copy']:.2f} of copy)",
                        flush=True,
                    )
                    if op == "dequantize":
                        roundtrip = round(copy_ms / (op_ms["quantize"] + op_ms["dequantize"]), 3)
                        rows[-2]["roundtrip_frac_copy"] = roundtrip
                        if name in GOAL_SHAPES:
                            goals.append(
                                {"shape": name, "dtype": dname, "bits": bits, "roundtrip_frac_copy": roundtrip}
                            )
                            print(f"       round trip q+dq: {roundtrip:.2f} of copy (goal >= 0.5)", flush=True)
    speedups = [r["speedup"] for r in rows]
    return {
        "threads": threads,
        "goal_rows": goals,
        "rows": rows,
        "summary": {
            "speedup_min": min(speedups),
            "speedup_median": round(statistics.median(speedups), 2),
            "speedup_max": max(speedups),
        },
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of the compiled kernel (median)")
    parser.add_argument("--ref-repeats", type=int, default=5, help="timed runs of the reference (median)")
    parser.add_argument("--stochastic", action="store_true", help="time stochastic rounding instead of nearest")
    parser.add_argument("--quick", action="store_true", help="3 runs each, first two shapes only")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "tools" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = args.ref_repeats = 3
        del SHAPES[2:]
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            print("bench_kernels: CUDA is not available", file=sys.stderr)
            return 1
        devices.remove("cuda")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for device in devices:
        load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        thread_counts = sorted({1, torch.get_num_threads()}) if device == "cpu" and not args.quick else [None]
        result = {
            "device": device_name(device),
            "device_type": device,
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "commit": _git_commit(),
            "command": " ".join(["python", *sys.argv]),
            "runs": [
                bench_device(device, args.bits, args.repeats, args.ref_repeats, args.stochastic, t)
                for t in thread_counts
            ],
            "kernels": _extension.status(),
        }
        result["loadavg_before_after"] = [load_before, os.getloadavg() if load_before else None]
        suffix = "-stochastic" if args.stochastic else ""
        out = args.out_dir / f"kernels-{result['device']}{suffix}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        for run in result["runs"]:
            s = run["summary"]
            print(
                f"{device} threads={run['threads']}: compiled vs reference speed-up (medians) "
                f"min x{s['speedup_min']:.2f} median x{s['speedup_median']:.2f} max x{s['speedup_max']:.2f}"
            )
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
