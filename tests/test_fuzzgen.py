"""The fuzzer's random-model generator (tools/fuzzgen.py) and its shrinker and reproducer writer (tools/fuzz.py)."""

from __future__ import annotations

import collections
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import fuzz  # noqa: E402
import fuzzgen  # noqa: E402


def _eager_step(prog: fuzzgen.Program, step: int = 0) -> torch.Tensor:
    model = fuzzgen.build(prog)
    inp, target = fuzzgen.make_inputs(prog, step)
    dtype = fuzzgen.DTYPES[prog.precision]
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        outs = model(inp, target)
    loss = fuzz.harness_loss(outs)
    loss.backward()
    return loss.detach()


def test_same_seed_same_program_and_parameters():
    a, b = fuzzgen.generate(123), fuzzgen.generate(123)
    assert a == b and fuzzgen.source(a) == fuzzgen.source(b)
    assert fuzzgen.Program.from_json(a.to_json()) == a
    ma, mb = fuzzgen.build(a), fuzzgen.build(b)
    for (na, pa), (nb, pb) in zip(ma.named_parameters(), mb.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    assert all(torch.equal(x, y) for x, y in zip(fuzzgen.make_inputs(a), fuzzgen.make_inputs(b), strict=True))
    assert len({fuzzgen.source(fuzzgen.generate(s)) for s in range(20)}) == 20


def test_coverage_of_the_op_mix():
    """Over 300 seeds every block kind and every listed variant appears."""
    seen: collections.Counter = collections.Counter()
    for seed in range(300):
        p = fuzzgen.generate(seed)
        seen[f"stem={p.stem['kind']}"] += 1
        seen[f"precision={p.precision}"] += 1
        seen["dynamic" if p.dynamic else "static"] += 1
        seen[f"head={p.head['kind']}"] += 1
        for d in (p.dim, p.seq, p.stem.get("in")):
            seen[f"dim={d}"] += 1
        for b in p.blocks:
            seen[b["kind"]] += 1
            for key in ("impl", "mask", "qkv", "probs", "merge", "variant", "norm", "act"):
                if key in b:
                    seen[f"{key}={b[key]}"] += 1
            if b["kind"] == "attn":
                seen[f"head_dim={b['head_dim']}"] += 1
                if b["kv_heads"] != b["heads"]:
                    seen["gqa"] += 1
            if b.get("dropout", 0) > 0:
                seen["dropout"] += 1
            if b.get("aux"):
                seen["aux"] += 1
    want = [
        *fuzzgen.BLOCK_KINDS,
        "stem=tokens",
        "stem=features",
        "stem=image",
        "precision=fp32",
        "precision=bf16",
        "precision=fp16",
        "dynamic",
        "head=tied",
        "head=ce",
        "head=mse",
        "head=out",
        "gqa",
        "dropout",
        "aux",
    ]
    want += [f"impl={i}" for i in ("sdpa", "matmul", "bmm", "baddbmm", "einsum")]
    want += [
        f"mask={m}"
        for m in ("none", "causal_flag", "causal_bool", "additive_inf", "additive_finfo", "pad_bool", "pad_additive")
    ]
    want += [f"probs={p}" for p in ("softmax", "softmax_f32", "log_softmax")]
    want += [f"norm={n}" for n in ("ln", "ln_noaffine", "rms", "rms_manual", "bn")]
    want += [f"act={a}" for a in ("gelu", "gelu_tanh", "silu", "relu", "relu_", "tanh")]
    want += [
        f"variant={v}"
        for v in (
            "split_cat",
            "narrow_cat",
            "chunk_stack",
            "stack_unbind",
            "group_view",
            "expand_param",
            "expand_token",
            "strided_slice",
            "permute_contiguous",
            "transposed_act",
            "token_mix",
            "mul_add",
            "slice_assign",
            "clone_iadd",
            "act_",
            "masked_fill",
            "where",
            "softmax_inf",
            "mul_bool",
            "no_grad_gate",
            "detach",
        )
    ]
    want += ["dim=1", "dim=3", "dim=7", "dim=197", "head_dim=1", "head_dim=3", "head_dim=7"]
    missing = [w for w in want if not seen[w]]
    assert not missing, missing


def test_forced_options():
    assert all(fuzzgen.generate(s, precision="bf16").precision == "bf16" for s in range(10))
    assert all(fuzzgen.generate(s, dynamic=True).dynamic for s in range(10))
    assert not any(fuzzgen.generate(s, dynamic=False).dynamic for s in range(10))


@pytest.mark.parametrize("start", range(0, 120, 20))
def test_programs_build_and_train_in_eager(start):
    for seed in range(start, start + 20):
        prog = fuzzgen.generate(seed)
        for step in range(2 if prog.dynamic else 1):
            loss = _eager_step(prog, step)
            assert torch.isfinite(loss), (seed, prog.summary())


def test_shrink_candidates_stay_valid():
    """Every variant the shrinker proposes still builds and trains (it drops blocks, options, sizes)."""
    for seed in (3, 11, 42):
        prog = fuzzgen.generate(seed)
        n = 0
        for cand, _setup in fuzz._candidates(prog, fuzz.Setup(inner="inductor", quantize_outputs=True)):
            assert torch.isfinite(_eager_step(cand)), (seed, cand.summary())
            n += 1
        assert n > len(prog.blocks)


def test_shrink_keeps_the_failure_kind(monkeypatch):
    """With a fake check that fails while an attention block is present, shrinking leaves just that block."""
    prog = fuzzgen.generate(7)
    prog = dataclasses.replace(prog, blocks=[*prog.blocks, fuzzgen.generate(1).blocks[0], {"kind": "break"}])
    prog.blocks.append({**fuzzgen._gen_block(__import__("random").Random(0), "attn", prog.dim, prog.seq, ())})

    def fake_check(p, setup, **_kw):
        kind = "wiring" if any(b["kind"] == "attn" for b in p.blocks) else None
        return fuzz.Outcome(p.seed, p.summary(), {}, kind)

    monkeypatch.setattr(fuzz, "check", fake_check)
    small, _setup, out = fuzz.shrink(prog, fuzz.Setup(), "wiring", max_checks=500)
    assert out is not None and out.kind == "wiring"
    assert [b["kind"] for b in small.blocks] == ["attn"]
    assert small.batch == 1 and small.seq == 1 and small.dim == 2


def test_repro_file_runs(tmp_path):
    """The reproducer is a standalone script: it runs with python and exits 0 when the failure does not reproduce."""
    prog = fuzzgen.generate(4)
    setup = fuzz.Setup(inner="eager")
    out = fuzz.Outcome(prog.seed, prog.summary(), {}, "wiring", "example detail")
    path = fuzz.write_repro(prog, setup, out, tmp_path)
    r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "mesa-vs-oracle 0" in r.stdout and "passed" in r.stdout


def test_batchnorm_needs_two_values_per_channel():
    """Seed 760 drew BatchNorm over one sample of one token (invalid in training): the generator uses LayerNorm
    there."""
    prog = fuzzgen.generate(760)
    assert prog.batch * fuzzgen.stream_len(prog) == 1
    assert "bn" not in [b.get("norm") for b in prog.blocks]
    assert torch.isfinite(_eager_step(prog))
