"""Fused attention on lossy q/k/v: backward re-runs the forward kernel (actpass/attention.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actpass
from actpass.backend import MesaBackend

aten = torch.ops.aten
FWD = aten._scaled_dot_product_flash_attention_for_cpu.default
BWD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Attention(nn.Module):
    """Causal self-attention whose keys share a large common component, as trained models' keys do: a query's
    rounding error dotted with it shifts a whole row of scores, which a softmax ignores and ``exp(s - lse)`` does
    not."""

    def __init__(self, dim: int = 64, heads: int = 4, key_bias: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.qkv.bias[dim : 2 * dim] += key_bias  # every key gets the same offset vector
            self.qkv.weight[:dim] *= 3.0  # sharper attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def _grads(model: nn.Module, fn, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    fn(x).pow(2).mean().backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _err(g, ref) -> float:
    num = sum(((a - b) ** 2).sum() for a, b in zip(g, ref, strict=True))
    return math.sqrt(num / sum((b**2).sum() for b in ref))


def _run(model, x, **config):
    """Gradients of one compiled step; the rewritten graphs and plans (a later dynamo reset clears the backend's)."""
    torch._dynamo.reset()
    be = MesaBackend(actpass.MesaConfig(min_bytes=0, max_error=float("inf"), **config), keep_graphs=True)
    g = _grads(model, torch.compile(model, backend=be), x)
    return g, [bw for _, bw in be.graphs], list(be.plans)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_rerun_attention_cuts_the_error_of_lossy_qkv(inner):
    torch.manual_seed(0)
    model = Attention(key_bias=4.0)
    x = torch.randn(2, 64, 64)
    ref = _grads(model, model, x)
    g_saved, bws_saved, plans_saved = _run(model, x, bits=4, inner=inner, rerun_attention=False)
    g_rerun, bws_rerun, plans_rerun = _run(model, x, bits=4, inner=inner)
    e_saved, e_rerun = _err(g_saved, ref), _err(g_rerun, ref)
    # Measured (both inner compilers): 68% with the forward's out/lse in backward, 9.0% with them re-run.
    assert e_rerun < 0.5 * e_saved, (e_rerun, e_saved)
    assert e_rerun < 0.2

    if inner == "eager":  # the FX graphs run as they are: the forward op is in backward, feeding the backward op
        (bw,) = bws_rerun
        (bwd,) = [n for n in bw.graph.nodes if n.target is BWD]
        fwd = [n for n in bw.graph.nodes if n.target is FWD]
        assert len(fwd) == 1 and bwd.args[4].args[0] is fwd[0] and bwd.args[5].args[0] is fwd[0]
        assert fwd[0].args[:3] == bwd.args[1:4]
        (bw_saved,) = bws_saved
        assert not [n for n in bw_saved.graph.nodes if n.target is FWD]
    noted = [t for p in plans_rerun for t in p.tensors if "re-runs the attention" in t.detail]
    assert noted and all(t.quantized for t in noted)
    assert not [t for p in plans_saved for t in p.tensors if "re-runs the attention" in t.detail]


def test_exact_qkv_keep_the_forward_tensors():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 64)
    # q/k/v kept exact (excluded): nothing to re-run, gradients as inductor's.
    model = Attention(key_bias=4.0)
    _, bws, plans = _run(model, x, inner="eager", exclude_ops=("addmm*", "view*", "permute*", "select*", "unbind*"))
    assert bws and all(not [n for n in bw.graph.nodes if n.target is FWD] for bw in bws)


def _backward_graph(dropout_p: float):
    """A graph holding one attention backward, its inputs placeholders with fake values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.fx.Graph()
    mode = FakeTensorMode()
    with mode:
        t = torch.empty(2, 4, 16, 8)
        vals = {"go": t, "q": t, "k": t, "v": t, "out": t, "lse": torch.empty(2, 4, 16)}
    ph = {}
    for name, val in vals.items():
        ph[name] = g.placeholder(name)
        ph[name].meta["val"] = val
    args = (ph["go"], ph["q"], ph["k"], ph["v"], ph["out"], ph["lse"], dropout_p, True)
    bwd = g.call_function(BWD, args, {"scale": 0.25})
    g.output((bwd,))
    return g, ph, bwd


def test_rerun_only_where_lossy_and_without_dropout():
    from actpass.attention import rerun_attention_forward

    g, ph, bwd = _backward_graph(0.0)
    assert rerun_attention_forward(g, {ph["out"]}) == []  # only q/k/v count
    assert rerun_attention_forward(g, {ph["k"]}) == [bwd]
    fwd = bwd.args[4].args[0]
    assert fwd.target is FWD and fwd.args == (ph["q"], ph["k"], ph["v"], 0.0, True) and fwd.kwargs["scale"] == 0.25
    assert bwd.args[5].args == (fwd, 1) and tuple(bwd.args[4].meta["val"].shape) == (2, 4, 16, 8)
    g.lint()
    # With dropout the forward's mask cannot be drawn again: the forward's out and lse stay.
    g, ph, bwd = _backward_graph(0.1)
    assert rerun_attention_forward(g, {ph["q"]}) == []
    assert bwd.args[4] is ph["out"] and bwd.args[5] is ph["lse"]
