"""The torch.ops.actpass operators: the reference's properties, fake kernels, opcheck."""

from __future__ import annotations

import math

import pytest
import torch

import actpass.ops  # noqa: F401
from actpass import _reference as ref
from actpass.state import RunningStats

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (shape, gend, groups): per (batch, head), per head, folded bmm view, per channel, per row, per tensor, awkward sizes
LAYOUTS = [
    ((2, 3, 5, 7), 2, -1),
    ((2, 3, 5, 7), 2, 3),
    ((6, 5, 7), 1, 3),
    ((4, 9, 13), 3, 13),
    ((11, 17), 1, -1),
    ((37,), 0, 1),
    ((3, 1, 1), 3, 1),
]


def roundtrip(x, bits, gend, groups, **kw):
    q, s, lo = torch.ops.actpass.quantize(x, bits, gend, groups, kw.get("stochastic", False), kw.get("running"), 0.9)
    y = torch.ops.actpass.dequantize(q, s, lo, bits, gend, x.shape[-1], x.dtype)
    return q, s, lo, y


def _check_roundtrip(device: str) -> None:
    torch.manual_seed(0)
    for dtype in DTYPES:
        for shape, gend, groups in LAYOUTS:
            x = (torch.randn(shape, device=device) * 3 + 1).to(dtype)
            for bits in (8, 4, 2):
                q, s, lo, y = roundtrip(x, bits, gend, groups)
                assert q.dtype == torch.uint8 and q.shape == torch.Size(ref.packed_shape(shape, bits))
                assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
                g = ref.num_groups(shape, gend, groups)
                assert s.shape == (g,) and lo.shape == (g,)
                # Nearest rounding: error at most half a step (plus the output dtype's own rounding).
                step = s.view(1, g, 1)
                runs = x.float().reshape(-1, g, math.prod(shape[gend:]))
                err = (y.float().reshape(runs.shape) - runs).abs()
                # Zero-preserving rule (groups with lo == 0): in the lowest half step values round up to one step.
                low = (runs > lo.view(1, g, 1)) & (runs - lo.view(1, g, 1) < step / 2) & (lo == 0).view(1, g, 1)
                bound = torch.where(low, step, step / 2)
                slack = 0 if dtype == torch.float32 else x.float().abs().max() * 2**-7
                assert (err <= bound * (1 + 1e-5) + 1e-6 + slack).all(), (dtype, shape, bits)


def test_roundtrip_cpu():
    _check_roundtrip("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_roundtrip_cuda():
    _check_roundtrip("cuda")


def test_packing_stores_fewer_bytes():
    x = torch.randn(4, 8, 33)  # odd last dim: padding codes
    sizes = {bits: torch.ops.actpass.quantize(x, bits, 3, 33, False, None, 0.9)[0].numel() for bits in (8, 4, 2)}
    assert sizes == {8: 4 * 8 * 33, 4: 4 * 8 * 17, 2: 4 * 8 * 9}


def test_pack_unpack_inverse():
    c = torch.randint(0, 16, (5, 7), dtype=torch.uint8)
    assert torch.equal(ref.unpack(ref.pack(c, 4), 4, 7), c)
    c = torch.randint(0, 4, (5, 9), dtype=torch.uint8)
    assert torch.equal(ref.unpack(ref.pack(c, 2), 2, 9), c)


def test_constant_group_is_exact():
    x = torch.full((4, 16), 2.5)
    x[1] = -1.0
    _, s, _, y = roundtrip(x, 8, 1, -1)
    assert torch.equal(s, torch.zeros(4))
    assert torch.equal(y, x)


def test_nan_and_inf_propagate_to_their_group_only():
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    _, _, _, y = roundtrip(x, 8, 1, -1)
    assert torch.isnan(y[1]).all()
    assert not torch.isfinite(y[2]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()


def test_empty_tensor():
    x = torch.randn(0, 3, 8)
    q, s, lo, y = roundtrip(x, 4, 3, 8)
    assert q.shape == (0, 3, 4) and y.shape == x.shape and s.shape == (8,)


def test_non_contiguous_input_read_in_logical_order():
    base = torch.randn(8, 6)
    x = base.t()  # [6, 8], non-contiguous
    q1, s1, lo1, y1 = roundtrip(x, 8, 1, -1)
    q2, s2, lo2, y2 = roundtrip(x.contiguous(), 8, 1, -1)
    assert torch.equal(q1, q2) and torch.equal(y1, y2)


def test_running_stats_ema_and_clamp():
    running = torch.full((2, 2), float("nan"))
    x = torch.tensor([[0.0, 1.0], [0.0, 2.0]]).reshape(1, 2, 2)  # group 0 range [0, 1], group 1 [0, 2]
    torch.ops.actpass.quantize(x, 8, 2, 2, False, running, 0.9)
    assert torch.equal(running, torch.tensor([[0.0, 0.0], [1.0, 2.0]]))
    x2 = torch.tensor([[0.0, 11.0], [-10.0, 2.0]]).reshape(1, 2, 2)
    q, s, lo = torch.ops.actpass.quantize(x2, 8, 2, 2, False, running, 0.9)
    assert torch.allclose(running, torch.tensor([[0.0, -1.0], [2.0, 2.0]]))
    y = torch.ops.actpass.dequantize(q, s, lo, 8, 2, 2, torch.float32)
    # 11 is outside the running range [0, 2]: clamped to the top, never wrapped.
    assert y[0, 0, 1].item() == pytest.approx(2.0)
    assert y[0, 1, 0].item() == pytest.approx(-1.0)


def test_running_stats_skip_non_finite_updates():
    running = torch.tensor([[0.0], [1.0]])
    x = torch.tensor([[0.5, float("nan")]])
    q, s, lo = torch.ops.actpass.quantize(x, 8, 2, 1, False, running, 0.9)
    assert torch.equal(running, torch.tensor([[0.0], [1.0]]))  # not poisoned
    y = torch.ops.actpass.dequantize(q, s, lo, 8, 2, 2, torch.float32)
    assert torch.isnan(y).all()  # but this step's group still propagates the NaN


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    x = torch.rand(1, 1000) * 0.05 + torch.linspace(0, 1, 1000)  # values between code points
    draws = torch.stack([roundtrip(x, 4, 1, -1, stochastic=True)[3] for _ in range(400)])
    _, s, lo, nearest = roundtrip(x, 4, 1, -1)
    above = x >= lo + s  # the lowest step of a zero-low group is zero-preserving (rounds up), see _reference.py
    mean, x, nearest = draws.mean(0)[above], x[above], nearest[above]
    bias = (mean - x).abs().max().item()
    # Mean of 400 draws of a variable within one step: standard error <= step/2/sqrt(400) = step/40.
    assert bias < s.item() / 40 * 5
    assert (mean - x).abs().mean().item() < (nearest - x).abs().mean().item() / 3


def test_values_above_a_zero_low_end_keep_a_nonzero_code():
    """ReLU outputs: backward reads only ``saved > 0``; tiny positives must not round to the zero code."""
    x = torch.tensor([[0.0, 1e-6, 0.001, 0.5, 1.0, 0.0]])
    # Groups whose low end is not 0 keep plain round-to-nearest (the rule would only add error there).
    q, s, lo = torch.ops.actpass.quantize(x - 0.25, 8, 1, -1, False, None, 0.9)
    assert q[0, 1].item() == 0
    for stochastic in (False, True):
        q, s, lo = torch.ops.actpass.quantize(x, 8, 1, -1, stochastic, None, 0.9)
        y = torch.ops.actpass.dequantize(q, s, lo, 8, 1, 6, torch.float32)
        assert torch.equal(y > 0, x > 0)


def test_stochastic_rounding_reproducible_under_manual_seed():
    x = torch.randn(8, 32)
    torch.manual_seed(3)
    a = roundtrip(x, 4, 1, -1, stochastic=True)[0]
    torch.manual_seed(3)
    b = roundtrip(x, 4, 1, -1, stochastic=True)[0]
    assert torch.equal(a, b)


def test_quantize_saved_resolves_store_key():
    store = RunningStats()
    x = torch.randn(2, 4, 8)
    torch.ops.actpass.quantize_saved(x, 8, 3, 8, False, store.key("blk:gelu#0"), 0.9)
    assert "blk:gelu#0" in store
    lo, hi = store.entries()["blk:gelu#0"]
    assert torch.equal(lo, x.reshape(-1, 8).amin(0)) and torch.equal(hi, x.reshape(-1, 8).amax(0))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_opcheck(bits):
    x = torch.randn(2, 3, 5, 7)
    torch.library.opcheck(torch.ops.actpass.quantize.default, (x, bits, 2, -1, False, None, 0.9))
    torch.library.opcheck(torch.ops.actpass.quantize.default, (x, bits, 2, 3, False, torch.zeros(2, 3), 0.9))
    torch.library.opcheck(torch.ops.actpass.quantize_saved.default, (x, bits, 4, 7, False, "", 0.9))
    q, s, lo = torch.ops.actpass.quantize(x, bits, 2, -1, False, None, 0.9)
    torch.library.opcheck(torch.ops.actpass.dequantize.default, (q, s, lo, bits, 2, 7, torch.bfloat16))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(4, 4), 3, 1, -1), "bits must be one of"),
        ((torch.randn(4, 4).double(), 8, 1, -1), "unsupported dtype"),
        ((torch.randn(4, 4), 8, 5, -1), "gend=5 out of range"),
        ((torch.tensor(1.0), 8, 0, 1), "0-d"),
    ],
)
def test_bad_arguments_name_the_value(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.actpass.quantize(*args, False, None, 0.9)
