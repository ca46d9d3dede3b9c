"""Which code keeps a trained model's gradient for the tensors 8-bit uniform codes cannot store (issue 8)?

The planner keeps HF GPT-2's softmax probabilities and attention scores exact at the default ``max_error`` because
8-bit uniform codes for them trained worse (tools/results/convergence-cpu-maxerror.json). This measures, on the
training suite's models after ``--steps`` exact training steps (where the error model's worst case comes from), the
one-step global relative gradient error when only one role's storages are stored with another code, through the
probe backend (actpass/probe.py: mesa's partition and analysis, saved tensors routed through a quantize -> dequantize
chosen at run time), everything else exact:

* ``uniform8`` / ``uniform4``: the planner's own option for the role (its layout, the reference quantizer);
* ``sqrt8`` / ``sqrt4``: per row, uniform codes of ``sqrt(x - min)`` over ``[0, sqrt(max - min)]``, decoded as
  ``min + (q * scale) ** 2`` (companding: fine steps near the row minimum, where most probabilities are; 8 bytes of
  statistics per row as the uniform per-row layout; zeros stay zeros when the row holds one);
* ``ssqrt8`` / ``ssqrt4`` / ``scbrt8`` / ``scbrt4`` (``--roles act-in``, activation inputs): per channel, uniform
  codes of ``sign(x) |x| ** (1/2)`` (or ``** (1/3)``) decoded by the inverse power: fine steps near zero, where
  GELU's derivative changes fastest (tools/results/probe-codes-actin-cpu.json: no consistent gain, not shipped);
* ``e4m3`` / ``e5m2``: float8 after scaling each row's absolute maximum to the format's largest value (4 bytes/row);
* ``float16`` / ``bfloat16``: casts (2 bytes per element).

Usage::

    python tools/probe_codes.py --tasks hf-gpt2 hf-vit --steps 150

Writes ``tools/results/probe-codes-cpu.json``. A code here is a measurement, not a planner option: what the
planner ships is decided by training runs (tools/bench_convergence.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure_sensitivity as ms  # noqa: E402
import suite  # noqa: E402

from actpass import planner  # noqa: E402
from actpass import probe as _probe  # noqa: E402
from actpass.plan import Role  # noqa: E402

ROLES = ("probs", "scores", "logits")
# Roles whose storages are activation inputs (GELU/SiLU): the companded per-channel codes below are probed as well.
CHANNEL_ROLES = ("act-in",)
_F8 = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}


def sqrt_codes(bits: int):
    """Companded per-row codes: uniform codes of sqrt(x - row min)."""
    top = 2**bits - 1

    def fn(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        lo = xf.amin(dim=-1, keepdim=True)
        y = (xf - lo).clamp_min(0).sqrt()
        hi = y.amax(dim=-1, keepdim=True)
        scale = hi / top
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.floor(y * inv + 0.5).clamp(0, top)
        return (lo + (q * scale) ** 2).to(x.dtype)

    return fn


def signed_power_codes(bits: int, power: float):
    """Companded per-channel codes (last dim): uniform codes of ``sign(x) |x| ** power`` between the channel's ends,
    decoded by the inverse power: fine steps near zero, where an activation's derivative changes fastest."""
    top = 2**bits - 1

    def fn(x: torch.Tensor) -> torch.Tensor:
        xf = x.float().reshape(-1, x.shape[-1])
        y = xf.sign() * xf.abs().pow(power)
        lo, hi = y.amin(dim=0, keepdim=True), y.amax(dim=0, keepdim=True)
        scale = (hi - lo) / top
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.floor((y - lo) * inv + 0.5).clamp(0, top)
        z = lo + q * scale
        return (z.sign() * z.abs().pow(1.0 / power)).reshape(x.shape).to(x.dtype)

    return fn


def scaled_float8(name: str):
    dtype, largest = _F8[name]

    def fn(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        m = xf.abs().amax(dim=-1, keepdim=True)
        s = torch.where(m > 0, largest / m, torch.ones_like(m))
        return ((xf * s).to(dtype).float() / s).to(x.dtype)

    return fn


def cast(dtype: torch.dtype):
    return lambda x: x.to(dtype).to(x.dtype)


def codes_for(f, bits_planner, cfg) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for b in (8, 4):
        o = planner.quantized_option(f, b, cfg, 0.0)
        out[f"uniform{b}"] = _probe.qdq_fn(f, o) if o is not None else None
        if f.role.value in CHANNEL_ROLES:
            out[f"ssqrt{b}"] = signed_power_codes(b, 0.5)
            out[f"scbrt{b}"] = signed_power_codes(b, 1 / 3)
        else:
            out[f"sqrt{b}"] = sqrt_codes(b)
    out["e4m3"] = scaled_float8("e4m3")
    out["e5m2"] = scaled_float8("e5m2")
    out["float16"] = cast(torch.float16)
    out["bfloat16"] = cast(torch.bfloat16)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", choices=list(suite.TASKS), default=["hf-gpt2", "hf-vit", "hf-bert"])
    ap.add_argument(
        "--roles", nargs="+", default=list(ROLES), help=f"roles to probe (also: {', '.join(CHANNEL_ROLES)})"
    )
    ap.add_argument("--steps", type=int, default=150, help="exact training steps before the measured step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=suite.ROOT / "tools" / "results" / "probe-codes-cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "command": "python tools/probe_codes.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": suite.machine(),
        "steps": args.steps,
        "tasks": {},
    }
    for name in args.tasks:
        t0 = time.perf_counter()
        p = ms.Probe(name, seed=args.seed, train_steps=args.steps)
        totals = p.totals()
        cfg = p.backend.config
        task: dict[str, Any] = {}
        for role in args.roles:
            fs = [(g, f) for g, f in p.storages() if f.role is Role(role) and f.fixed is None]
            if not fs:
                continue
            share = sum(planner._numel(f) / totals[g] for g, f in fs)
            per = [codes_for(f, 8, cfg) for _g, f in fs]
            row: dict[str, Any] = {"storages": [f.tensor_id for _g, f in fs], "share": share, "error": {}}
            for code in per[0]:
                if any(c[code] is None for c in per):
                    continue
                specs = {f.tensor_id: c[code] for (_g, f), c in zip(fs, per, strict=True)}
                row["error"][code] = p.error(specs)
                print(f"{name:13s} {role:7s} {code:9s} {row['error'][code]:9.4%}  (share {share:.3f})", flush=True)
            task[role] = row
        task["seconds"] = round(time.perf_counter() - t0, 1)
        results["tasks"][name] = task
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
