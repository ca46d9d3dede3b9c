"""What reading integer codes costs inside an Inductor CPU kernel (issue 9).

A kernel-level profile of HF Llama's fp32 step on an AVX2-only EPYC
(``torch._inductor.config.cpp.enable_kernel_profile``) put most of mesa's extra step time in Inductor's own kernels
(49.7 ms against 28.2 ms per step), the largest difference in the MLP's backward kernel (SiLU backward reading the
dequantized gate and up projections: 6.85 ms against 2.20 ms), although the two kernels do the same arithmetic apart
from one multiply-add per input. This benchmark
separates the parts: the same SiLU-backward-shaped pointwise kernel ([512, 688], Llama's MLP at the benchmark size),
compiled by Inductor, on fp32 inputs, on fp32 inputs through the same per-column affine arithmetic, and on 8-bit codes
of those inputs (uint8, and widened to int32) with mesa's per-column dequantize; plus the dequantize alone against an
fp32 copy of the same size. Medians of ``--reps`` calls, 1 thread.

    python tools/bench_code_loads.py --out tools/results/code-loads-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from actpass import _reference


def _tail(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor):
    s = torch.sigmoid(a)
    return a * s * b, g * b * s * (1 + a * (1 - s))


def _codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-column 8-bit codes of ``x`` by the project's reference quantizer (channel groups): codes, scale, lo."""
    cols = x.shape[-1]
    lo, hi = _reference.group_range(x, x.dim(), cols)
    scale = _reference.scale_of(lo, hi, 8)
    return _reference.codes(x, lo, scale, 8, x.dim(), cols, None), scale, lo


def cases(rows: int, cols: int) -> dict:
    """name -> (function, inputs). Every variant computes on the same values (up to 8-bit rounding): the SiLU of
    code values in [0, 255] would put exp() in its denormal range and time that instead (an earlier version did)."""
    torch.manual_seed(0)
    g, fa, fb = torch.randn(rows, cols), torch.randn(rows, cols), torch.randn(rows, cols)
    (ca, sa, la), (cb, sb, lb) = _codes(fa), _codes(fb)
    one, zero = torch.ones(cols), torch.zeros(cols)  # the dequantize's arithmetic on fp32 inputs, same values

    def dequantized_tail(a, b, g):  # mesa's per-column dequantize, then the kernel
        return _tail(a.float() * sa + la, b.float() * sb + lb, g)

    return {
        "fp32": (lambda a, b, g: _tail(a, b, g), (fa, fb, g)),
        "fp32, per-column affine": (lambda a, b, g: _tail(a * one + zero, b * one + zero, g), (fa, fb, g)),
        "uint8, per-column affine (mesa's dequantize)": (dequantized_tail, (ca, cb, g)),
        "int32, per-column affine": (dequantized_tail, (ca.int(), cb.int(), g)),
        "uint8, dequantize only": (lambda a, b, g: (a.float() * sa + la, b.float() * sb + lb), (ca, cb, g)),
        "fp32, copy only": (lambda a, b, g: (a * 1.0, b * 1.0), (fa, fb, g)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=688)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for name, (fn, inputs) in cases(args.rows, args.cols).items():
        torch._dynamo.reset()
        compiled = torch.compile(fn)
        for _ in range(3):
            compiled(*inputs)
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            compiled(*inputs)
            ts.append(time.perf_counter() - t0)
        results[name] = round(sorted(ts)[len(ts) // 2] * 1e3, 4)
        print(f"  {name:45s} {results[name]:8.3f} ms", flush=True)
    base = results["fp32"]
    out = {
        "benchmark": "bench_code_loads",
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "shape": [args.rows, args.cols],
        "median_ms": results,
        "ratio_to_fp32": {k: round(v / base, 3) for k, v in results.items()},
    }
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
