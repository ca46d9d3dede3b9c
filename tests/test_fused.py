"""actpass.fused / actpass.emit: quantize and dequantize as aten ops that Inductor fuses.

* The aten math, compiled by Inductor, is bit for bit the reference (nearest rounding) on CPU.
* The rewrite emits aten ops only where it should (inner="inductor", dynamic statistics, nearest rounding, static
  shapes) and the extension ops elsewhere, and both give the same training step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import actpass
from actpass import _reference as ref
from actpass import fused

# (shape, gend, groups): per channel (R == 1), channel sharing (short runs: the columns layout), per row (long runs),
# folded heads ([B, N, H, D] runs of D), per (batch, head) with an odd last dim (padded packing at 4 bits), and one
# group with a short run.
CASES = [
    ((64, 48), 2, 48),
    ((64, 12, 4), 2, 12),
    ((40, 96), 1, -1),
    ((2, 16, 4, 24), 3, 4),
    ((2, 3, 9, 9), 2, -1),
    ((1, 7), 1, -1),  # one group, a short run (a BatchNorm rstd per row; it read past the statistics before)
    ((13,), 0, 1),  # one group over a small 1-D tensor
]


def _inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    xs = [(torch.randn(shape, generator=gen) * 3 + 1).to(dtype) for shape, _, _ in CASES]
    xs[0][5, 7] = float("nan")  # a NaN group stays NaN
    xs[2][3].clamp_(min=0)  # a row whose low end is 0 (the zero-preserving rule)
    xs[2][3, :5] = 0.0
    return xs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [8, 4])
def test_inductor_matches_reference_bit_for_bit(dtype, bits):
    xs = _inputs(dtype)

    def quantize_all(*xs):
        return [fused.quantize_math(x, bits, gend, groups) for x, (_, gend, groups) in zip(xs, CASES, strict=True)]

    def dequantize_all(*flat):
        return [
            fused.dequantize_math(*flat[3 * i : 3 * i + 3], bits, gend, shape[-1], dtype)
            for i, (shape, gend, _) in enumerate(CASES)
        ]

    torch._dynamo.reset()
    got = torch.compile(quantize_all, backend="inductor", fullgraph=True)(*xs)
    want = [
        ref.quantize(x, bits, gend, groups, False, None, 0.9) for x, (_, gend, groups) in zip(xs, CASES, strict=True)
    ]
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    flat = [t for w in want for t in w]
    got_y = torch.compile(dequantize_all, backend="inductor", fullgraph=True)(*flat)
    for (shape, gend, _), (q, s, lo), y in zip(CASES, want, got_y, strict=True):
        expected = ref.dequantize(q, s, lo, bits, gend, shape[-1], dtype)
        assert y.dtype == expected.dtype and y.shape == expected.shape
        torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bits", [8, 4])
def test_eager_math_matches_reference(bits):
    """The traced math run eagerly (cheap; a one-group short run made as_strided read past its buffer, which eager
    refuses and Inductor's code did not: garbage statistics)."""
    for x, (shape, gend, groups) in zip(_inputs(torch.float32), CASES, strict=True):
        want = ref.quantize(x, bits, gend, groups, False, None, 0.9)
        got = fused.quantize_math(x, bits, gend, groups)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        y = fused.dequantize_math(*want, bits, gend, shape[-1], torch.float32)
        torch.testing.assert_close(y, ref.dequantize(*want, bits, gend, shape[-1], torch.float32), rtol=0, atol=0,
                                   equal_nan=True)  # fmt: skip


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.qkv = nn.Linear(32, 96)
        self.fc1 = nn.Linear(32, 128)
        self.fc2 = nn.Linear(128, 32)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln(x)).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return x + self.fc2(torch.relu(self.fc1(x)))


def _step(codec: str, bf16: bool = False, **options):
    torch.manual_seed(0)
    model = _Block()
    x = torch.randn(4, 40, 32)
    options.setdefault("max_error", float("inf"))  # codes for every storage that can take them: the codecs' test
    backend = actpass.mesa(codec=codec, keep_graphs=True, **options)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = torch.compile(model, backend=backend)(x).float().square().mean()
    loss.backward()
    # Copies: the next torch._dynamo.reset() calls backend.reset(), which forgets the plans and graphs.
    custom_ops = sum(
        1
        for fw, bw in backend.graphs
        for g in (fw, bw)
        for n in g.graph.nodes
        if n.op == "call_function" and "actpass" in str(n.target)
    )
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return float(loss.detach()), grads, list(backend.plans), custom_ops


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_and_kernels_give_the_same_step(bits):
    loss_k, grads_k, plans_k, ops_k = _step("kernels", bits=bits)
    loss_f, grads_f, plans_f, ops_f = _step("auto", bits=bits)
    assert plans_k[0].quantized and len(plans_f[0].quantized) == len(plans_k[0].quantized)
    assert plans_f[0].saved_bytes_after == plans_k[0].saved_bytes_after
    assert ops_k > 0 and ops_f == 0
    assert loss_f == loss_k
    for name, g in grads_k.items():
        # Same codes, same values: only Inductor's fusion of the backward kernels may reassociate float sums.
        torch.testing.assert_close(grads_f[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_tensors_take_the_kernels_unless_fused_is_asked_for():
    """codec="auto" gives 16-bit tensors the extension kernels (measured faster, emit.use_fused); "fused" forces the
    aten ops: the same plan and bytes, gradients within bf16's rounding (Inductor keeps fused intermediates in fp32)."""
    loss_a, grads_a, plans_a, ops_a = _step("auto", bf16=True)
    loss_f, grads_f, plans_f, ops_f = _step("fused", bf16=True)
    assert any(t.dtype == "torch.bfloat16" for t in plans_a[0].quantized)
    assert ops_a > 0 and ops_f == 0
    assert plans_f[0].saved_bytes_after == plans_a[0].saved_bytes_after
    torch.testing.assert_close(loss_f, loss_a, rtol=2e-2, atol=0)
    num = sum(float((grads_f[k].float() - g.float()).square().sum()) for k, g in grads_a.items())
    den = sum(float(g.float().square().sum()) for g in grads_a.values())
    assert (num / den) ** 0.5 < 2e-2


@pytest.mark.parametrize(
    "options",
    [{"stats": "running"}, {"rounding": "stochastic"}, {"inner": "eager"}],
    ids=["running", "stochastic", "eager"],
)
def test_extension_ops_where_fusion_does_not_apply(options):
    _, _, plans, custom_ops = _step("auto", **options)
    assert plans[0].quantized and custom_ops > 0


# ----------------------------------------------------------------------------- square-root companded codes (probs)


def _probabilities(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 3, 9, 33, generator=gen) * 4
    scores[..., 20:] = float("-inf")  # a masked tail: exact zeros
    p = scores.softmax(-1)
    p[0, 0, 0] = 0.0  # an all-zero row
    p[1, 2, 3] = 1.0 / 33  # a constant row (zero range)
    return p.to(dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sqrt_codes_round_trip_within_their_bound(bits, dtype):
    """|x' - x| <= (s/2) (2 sqrt(x - lo) + s/2) per element (half a step of sqrt(x - lo), squared out), zeros at a
    row's minimum come back as exact zeros, and 4-bit codes pack two per byte."""
    p = _probabilities(dtype)
    q, s, lo = fused.sqrt_quantize_math(p, bits)
    assert q.dtype == torch.uint8 and q.shape[-1] == (33 + 8 // bits - 1) // (8 // bits)
    assert s.shape == lo.shape == p.shape[:-1] and s.dtype == lo.dtype == torch.float32
    y = fused.sqrt_dequantize_math(q, s, lo, bits, 33, dtype)
    assert y.dtype == dtype and y.shape == p.shape
    pf, yf = p.float(), y.float()
    step = s.unsqueeze(-1).sqrt() / (2**bits - 1)  # one code step of sqrt(x - lo)
    bound = (step / 2) * (2 * (pf - lo.unsqueeze(-1)).sqrt() + step / 2) * 1.0001 + 1e-7
    if dtype is torch.bfloat16:
        bound = bound + pf.abs() * 2**-8  # the cast back to bf16
    assert ((yf - pf).abs() <= bound).all()
    assert (y[p == 0] == 0).all()
    assert (y[0, 0, 0] == 0).all() and torch.equal(y[1, 2, 3], p[1, 2, 3])


@pytest.mark.parametrize("bits", [8, 4])
def test_sqrt_codes_under_inductor_match_the_eager_math_bit_for_bit(bits):
    """No result depends on a sqrt (whose last bit differs between eager and Inductor's CPU code): codes, statistics
    and decoded values are the same wherever they are computed."""
    p = _probabilities(torch.float32)
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([p, torch.rand(2, 3, 4, 33, generator=gen) ** 4], dim=2)  # and rows with no zero at the minimum
    torch._dynamo.reset()
    got = torch.compile(lambda t: fused.sqrt_quantize_math(t, bits), backend="inductor", fullgraph=True)(x)
    want = fused.sqrt_quantize_math(x, bits)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    deq = torch.compile(lambda *a: fused.sqrt_dequantize_math(*a, bits, 33, torch.float32), backend="inductor")
    torch.testing.assert_close(deq(*want), fused.sqrt_dequantize_math(*want, bits, 33, torch.float32), rtol=0, atol=0)


def test_sqrt_codes_are_the_nearest_in_the_square_root():
    """Each code is the one whose square root is nearest sqrt(x - lo) (the first guess from sqrt is corrected)."""
    x = torch.rand(64, 257, generator=torch.Generator().manual_seed(4)) ** 3
    q, rng, lo = fused.sqrt_quantize_math(x, 8)
    u = ((x - lo[:, None]) / rng[:, None]).double().sqrt() * 255
    assert ((q.double() - u).abs() <= 0.5 + 1e-4).all()


def test_extension_ops_get_contiguous_inputs_from_inductor():
    """bf16 tensors take the extension kernels, which read their input contiguously. Inductor must hand them a
    contiguous buffer (the ops' stride tag): without it, it dropped HF ViT's clone of k^T (eager attention), passed
    a strided view, and both quantize_saved and the bmm copied it again (aten::contiguous, 1.2 ms of a 40 ms bf16
    step)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model, x = transformers.ViTModel(cfg).train(), torch.randn(4, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=actpass.mesa(max_error=float("inf")))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled(pixel_values=x).last_hidden_state
        out.float().square().mean().backward()

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    assert any(e.name == "actpass::quantize_saved" for e in prof.events())  # the extension path ran
    copies = [
        (e.cpu_parent.name, e.input_shapes)
        for e in prof.events()
        if e.name == "aten::contiguous" and e.cpu_parent is not None
        if e.cpu_parent.name in ("actpass::quantize", "aten::bmm")
    ]
    assert not copies, copies
