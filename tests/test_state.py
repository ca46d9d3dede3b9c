"""Running (Mesa) statistics: persistence across steps and recompiles, checkpoints, Inductor."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import Block, grads, rel_err

import actpass
import actpass.ops  # noqa: F401  (registers torch.ops.actpass)
from actpass.state import RunningStats


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train_step(model, x):
    for p in model.parameters():
        p.grad = None
    model(x).pow(2).mean().backward()


@pytest.mark.parametrize("inner", ["inductor", "eager"])
def test_running_stats_persist_and_update_in_compiled_graphs(inner):
    torch.manual_seed(0)
    store = RunningStats()
    # recompute=False: this test follows the LayerNorm output, which is otherwise rebuilt in backward, not stored.
    be = actpass.mesa(stats="running", inner=inner, store=store, recompute=False)
    model = Block(64, 4)
    compiled = torch.compile(model, backend=be)
    train_step(compiled, torch.randn(4, 33, 64))
    keys = {t.stats_key for t in be.plans[0].quantized if t.stats_key}
    assert keys and len(store) == len(keys)
    first = {k: v.clone() for k, v in store.state_dict().items()}
    for v in first.values():
        assert v.device.type == "cpu" and not torch.isnan(v).any()
    x2 = torch.randn(4, 33, 64) * 3
    train_step(compiled, x2)
    second = store.state_dict()
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the EMA moved ...
    # ... by exactly Mesa's update rule on the inputs' first layer output (norm1 -> qkv input, per channel).
    (key,) = [k for k in first if "/norm1:" in k]  # the LayerNorm output (decomposed by Inductor, not by eager)
    ln = torch.nn.functional.layer_norm(x2, (64,), model.norm1.weight, model.norm1.bias).reshape(-1, 64)
    expect_hi = 0.9 * first[key][1] + 0.1 * ln.amax(0)
    torch.testing.assert_close(second[key][1], expect_hi, rtol=1e-5, atol=1e-5)


def test_running_stats_survive_recompile_and_shape_change():
    store = RunningStats()
    be = actpass.mesa(stats="running", inner="eager", store=store)
    compiled = torch.compile(Block(64, 4), backend=be, dynamic=False)
    train_step(compiled, torch.randn(4, 33, 64))
    n = len(store)
    before = store.state_dict()
    train_step(compiled, torch.randn(2, 20, 64))  # new static shape: recompiles
    assert len(be.plans) == 2
    assert len(store) == n  # the same entries, found again by module path / op / ordinal
    after = store.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_round_trip_reproduces_training():
    torch.manual_seed(0)
    model = Block(64, 4)
    xs = [torch.randn(4, 33, 64) for _ in range(3)]

    store = RunningStats()
    be = actpass.mesa(stats="running", inner="eager", store=store)
    compiled = torch.compile(model, backend=be)
    train_step(compiled, xs[0])
    ckpt = {"model": copy.deepcopy(model.state_dict()), "actpass": store.state_dict()}
    torch.save(ckpt, "/tmp/actpass_ckpt_test.pt")
    train_step(compiled, xs[1])
    g_continued = grads(model)

    torch._dynamo.reset()
    loaded = torch.load("/tmp/actpass_ckpt_test.pt")
    model2 = Block(64, 4)
    model2.load_state_dict(loaded["model"])
    store2 = RunningStats()
    store2.load_state_dict(loaded["actpass"])
    compiled2 = torch.compile(model2, backend=actpass.mesa(stats="running", inner="eager", store=store2))
    train_step(compiled2, xs[1])
    assert rel_err(grads(model2), g_continued) == 0.0  # bit-identical: same weights, same running ranges

    # Without the restored statistics, the step differs (the ranges start afresh).
    torch._dynamo.reset()
    model3 = Block(64, 4)
    model3.load_state_dict(loaded["model"])
    compiled3 = torch.compile(model3, backend=actpass.mesa(stats="running", inner="eager", store=RunningStats()))
    train_step(compiled3, xs[1])
    assert rel_err(grads(model3), g_continued) > 0.0


def test_running_gradients_stay_close_to_eager():
    torch.manual_seed(0)
    model = Block(64, 4)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend=actpass.mesa(stats="running", inner="eager", store=RunningStats()))
    for _ in range(5):
        x = torch.randn(4, 33, 64)
        train_step(compiled, x)
        train_step(ref, x)
    # Per-head/per-channel ranges shared by the batch and lagging by the EMA: looser than per-step statistics.
    assert rel_err(grads(model), grads(ref)) < 0.05


def test_store_errors_are_clear():
    alive = RunningStats("dup-name")
    with pytest.raises(ValueError, match="already exists"):
        RunningStats("dup-name")
    del alive  # the registry holds stores weakly: a dead store's name is free again
    RunningStats("dup-name")
    with pytest.raises(ValueError, match="must be a \\[2, G\\] tensor"):
        RunningStats().load_state_dict({"x": torch.zeros(3)})
    with pytest.raises(RuntimeError, match="no RunningStats store named 'gone'"):
        torch.ops.actpass.quantize_saved(torch.randn(4, 8), 8, 2, 8, False, "gone/x", 0.9)
