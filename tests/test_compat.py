"""Compatibility matrix: real architectures compiled with mesa, every gradient against eager.

Each case builds a tiny model (random weights, nothing downloaded), runs one forward and backward compiled with
``actpass.mesa`` and once in eager, and checks:

* the loss is the same (forward stays exact);
* every parameter's gradient is finite, and the global L2 relative gradient error is within the bit-width bound
  (8-bit: < 1%);
* every compiled graph has a plan with quantized tensors, every kept tensor says why, and no graph fell back whole
  (``SkipReason.REWRITE_FAILED``): unsupported patterns are kept exact per tensor.

Most cases use ``inner="eager"`` (the same rewrite, run as FX graphs: seconds to compile); a few run through
Inductor, which decomposes ops before partitioning and so sees different saved tensors.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _models import Block, grads, rel_err

import actpass
from actpass.backend import SkipReason
from actpass.plan import Reason

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BOUND = {8: 0.01, 4: 0.10}  # global relative gradient error allowed per bit width (measured: 8-bit 0.35-0.83%)

_modules: dict[str, ModuleType] = {}


def _example(name: str) -> ModuleType:
    """``examples/<name>.py``, imported by path once per session (Hugging Face ones skip without transformers)."""
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    if name not in _modules:
        spec = importlib.util.spec_from_file_location(f"_compat_{name}", EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[name] = module
    return _modules[name]


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- models ---------------------------------------------------------------------------------------------------------


class ConvStemTransformer(nn.Module):
    """Two stride-2 conv + BatchNorm + ReLU stages (a "conv stem"), then transformer blocks on the 8x8 feature map."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, dim // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(dim // 2),
            nn.ReLU(),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(),
        )
        self.pos = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images).flatten(2).transpose(1, 2) + self.pos  # (B, 64 tokens, dim) for 32x32 images
        return self.head(self.norm(self.blocks(x)).mean(1))


class Float64Island(nn.Module):
    """A block whose MLP runs in float64: those saved tensors are unsupported and must be kept, the rest quantized."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.block = Block(dim, 4)
        self.fc = nn.Linear(dim, dim).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        return x + F.gelu(self.fc(x.double())).float()


def _cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    labels = torch.arange(logits.shape[0]) % logits.shape[-1]
    return F.cross_entropy(logits, labels)


def _square(out: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()


@dataclass(frozen=True)
class Case:
    build: Callable[[], tuple[nn.Module, tuple[Any, ...], Callable[[Any], torch.Tensor]]]
    inner: str = "eager"


def _vit(attn: str):
    def build():
        ex = _example("vit")
        return ex.build_model("tiny_test", attn=attn), ex.make_inputs("tiny_test", batch=4), ex.loss

    return build


def _gpt(attn: str):
    def build():
        ex = _example("gpt")
        return ex.build_model("tiny_test", attn=attn), ex.make_inputs("tiny_test", batch=4), ex.loss

    return build


def _bert(attn: str):
    def build():
        ex = _example("hf_bert")
        from transformers import BertConfig

        # Dropout off: eager and the compiled graph draw different random masks. BERT's padding mask stays on.
        cfg = BertConfig(
            **ex.PRESETS["tiny_test"].config,
            attn_implementation=attn,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = ex.PositionalBertForMaskedLM(cfg).train()
        return model, ex.make_inputs("tiny_test", batch=4), ex.loss

    return build


def _llama(attn: str):
    def build():
        ex = _example("hf_llama")
        return ex.build_model("tiny_test", attn=attn), ex.make_inputs("tiny_test", batch=4), ex.loss

    return build


def _conv_stem():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ConvStemTransformer()
    return model, (torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),), _cross_entropy


# NOTE: conv -> BatchNorm -> ReLU. ReLU's backward reads only the sign of what it gets, so a mask bit that flips drops
# that element's gradient: ~0.3% flipped bits is an L2 error of ~sqrt(0.003) = 5.5%. Measured 8-bit global gradient
# error: inner="eager" 5.2% before the quantizer kept "x > lo => code >= 1" (ReLU outputs have lo == 0), 0.37% after.
# Inductor 4.1% / 3.9% (before/after): its partitioner does not save the second ReLU's output but recomputes
# relu(batch_norm(conv)) in backward from the conv output, whose rounding flipped the mask (that conv output alone:
# 3.87%). Now a storage from which backward derives a mask by comparison is kept exact (Reason.MASK_SOURCE).
KNOWN: dict[str, Any] = {}

CASES = {
    "vit-sdpa-inductor": Case(_vit("sdpa"), "inductor"),
    "vit-sdpa": Case(_vit("sdpa")),
    "vit-eager-attn": Case(_vit("eager")),
    "gpt-sdpa": Case(_gpt("sdpa")),
    "gpt-eager-attn": Case(_gpt("eager")),
    "bert-sdpa": Case(_bert("sdpa")),
    "bert-eager-attn": Case(_bert("eager")),
    "llama-sdpa": Case(_llama("sdpa")),
    "llama-eager-attn": Case(_llama("eager")),
    "llama-sdpa-inductor": Case(_llama("sdpa"), "inductor"),
    "conv-stem": Case(_conv_stem),
    "conv-stem-inductor": Case(_conv_stem, "inductor"),
}


# --- the check ------------------------------------------------------------------------------------------------------


def _run(case: Case, bits: int = 8) -> tuple[actpass.MesaBackend, float]:
    model, inputs, loss_fn = case.build()
    ref = copy.deepcopy(model)
    backend = actpass.mesa(bits=bits, inner=case.inner)
    loss = loss_fn(torch.compile(model, backend=backend)(*inputs))
    loss.backward()
    ref_loss = loss_fn(ref(*inputs))
    ref_loss.backward()

    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-4, atol=1e-5)  # forward stays exact
    g, g_ref = grads(model), grads(ref)
    assert g.keys() == g_ref.keys() == {n for n, p in ref.named_parameters() if p.requires_grad}
    bad = [n for n, v in g.items() if not torch.isfinite(v).all()]
    assert not bad, f"non-finite gradients: {bad}"
    _check_plans(backend)
    return backend, rel_err(g, g_ref)


def _check_plans(backend: actpass.MesaBackend) -> None:
    failed = [s for s in backend.skips if s.reason is SkipReason.REWRITE_FAILED]
    assert not failed, f"graphs fell back whole: {failed}"
    assert backend.plans, "no graph was compiled by mesa"
    for plan in backend.plans:
        stored_less = plan.quantized or plan.recomputed
        assert stored_less, f"{plan.name} changed nothing: {[(t.tensor_id, t.detail) for t in plan.tensors]}"
        assert plan.saved_bytes_after < plan.saved_bytes_before
        for t in plan.tensors:
            assert isinstance(t.reason, Reason) and t.detail, t
            # SENSITIVE: 8-bit codes too coarse for the error target, so float16 (bits 16, stored) or exact
            coded = t.reason in (Reason.QUANTIZED, Reason.BUDGET, Reason.POLICY) or (
                t.reason is Reason.SENSITIVE and t.bits == 16
            )
            assert t.quantized == (coded and t.bits is not None), t
            assert t.recomputed == (t.reason is Reason.RECOMPUTED), t


@pytest.mark.parametrize("name", [pytest.param(n, marks=KNOWN.get(n, ())) for n in CASES])
def test_matches_eager_8bit(name: str) -> None:
    backend, err = _run(CASES[name])
    assert err < BOUND[8], f"{name}: 8-bit global gradient error {err:.4%} >= {BOUND[8]:.0%}"


def test_gpt_4bit_within_bound() -> None:
    backend, err = _run(Case(_gpt("sdpa")), bits=4)
    assert BOUND[8] / 10 < err < BOUND[4], err  # lossier than 8-bit, still bounded
    # bits=4 costs what 4-bit codes of every saved tensor would: at least ~7x less than fp32 here.
    assert all(t.bits in (2, 4, 8, 1) for p in backend.plans for t in p.quantized)
    assert sum(p.saved_bytes_after for p in backend.plans) * 6 < sum(p.saved_bytes_before for p in backend.plans)


def test_unsupported_dtype_falls_back_per_tensor() -> None:
    """float64 activations are kept exact with a reason; the float32 ones in the same graph are still quantized."""
    torch.manual_seed(0)
    model = Float64Island()
    x = torch.randn(4, 33, 64)
    backend, err = _run(Case(lambda: (model, (x,), _square)))
    tensors = [t for p in backend.plans for t in p.tensors]
    kept64 = [t for t in tensors if t.dtype == "torch.float64" and t.reason is Reason.UNSUPPORTED]
    assert kept64 and all(not t.quantized and "float64" in t.detail for t in kept64)
    assert any(t.quantized and t.dtype == "torch.float32" for t in tensors)
    assert err < BOUND[8]


def test_bert_dropout_masks_packed_losslessly() -> None:
    """BERT with its dropout on: compiles, bool masks stored as 1 bit per element, gradients finite."""
    ex = _example("hf_bert")
    model = ex.build_model("tiny_test", attn="sdpa")  # dropout 0.1, as in pre-training
    inputs = ex.make_inputs("tiny_test", batch=4)
    backend = actpass.mesa(inner="eager")
    torch.manual_seed(0)
    loss = ex.loss(torch.compile(model, backend=backend)(*inputs))
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    _check_plans(backend)
    masks = [t for p in backend.plans for t in p.tensors if t.dtype == "torch.bool" and t.bytes_before]
    assert masks and all(t.quantized and t.bits == 1 and t.bytes_after * 8 >= t.bytes_before for t in masks)
    others = [t for p in backend.plans for t in p.tensors if t.dtype == "torch.uint8" and t.bytes_before]
    assert all(t.reason is Reason.NOT_FLOAT for t in others)


def test_graph_breaks_each_graph_planned() -> None:
    """A graph break splits the model into several compiled graphs; each one is planned and quantized."""

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = Block(64, 4), Block(64, 4, attn="eager")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    torch.manual_seed(0)
    backend, err = _run(Case(lambda: (Broken(), (torch.randn(4, 33, 64),), _square)))
    assert len(backend.plans) == 2
    assert err < BOUND[8]
