"""Random models for the gradient fuzzer (tools/fuzz.py): seeded programs of blocks, printed as Python source.

A model is a :class:`Program`: global sizes, a stem (tokens, features or images), a list of blocks and a head. Each
block maps the stream ``x: [B, N, C]`` to the same shape, so any block can be dropped and the program still builds:
that is what lets the shrinker reduce a failing program. Derived sizes (split points, group counts, heads) are
computed from ``C`` at code-generation time, so the shrinker can also change ``C``, ``N`` and ``B`` freely.

:func:`generate` draws a program from a seed; :func:`source` prints it as the source of an ``nn.Module`` subclass
named ``Model`` (what a reproducer file contains); :func:`build` executes that source; :func:`make_inputs` draws the
inputs of a step.

The op mix covers what real transformers and convnets do (see ``BLOCK_KINDS`` and the option tables): linear,
matmul, bmm, baddbmm, einsum; LayerNorm, RMSNorm (module and hand-written), BatchNorm; softmax, log_softmax, sdpa
with and without masks, causal, GQA; GELU, SiLU, ReLU, tanh, sigmoid; dropout; additive masks with -inf and
finfo.min, boolean masks, masked_fill / where; residuals; view, reshape, permute, transpose, slicing, narrow, cat,
stack, split, chunk, unbind, expand, contiguous; embedding (tied head); conv2d (channels-last too); in-place ops;
parameters used twice; outputs that are also saved; detach and no_grad islands; graph breaks. The precision (fp32,
fp16 or bf16 autocast) and dynamic dims are program fields the harness applies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from typing import Any

import torch

BLOCK_KINDS = (
    "mlp",
    "attn",
    "norm",
    "layout",
    "inplace",
    "tied",
    "mask",
    "nograd",
    "gate",
    "einsum",
    "break",
)
# Relative frequency of each block kind.
_KIND_WEIGHTS = {
    "mlp": 4,
    "attn": 5,
    "norm": 1.5,
    "layout": 3,
    "inplace": 1.5,
    "tied": 1,
    "mask": 1.5,
    "nograd": 1,
    "gate": 1,
    "einsum": 1,
    "break": 0.7,
}
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Program:
    """A random model: sizes, stem, blocks, head, and how the harness runs it."""

    seed: int
    batch: int
    seq: int  # tokens N (image programs: derived from the image size, see ``stream_len``)
    dim: int  # stream channels C
    stem: dict[str, Any]
    blocks: list[dict[str, Any]]
    head: dict[str, Any]
    precision: str = "fp32"  # fp32, or autocast to bf16/fp16 around the forward
    dynamic: tuple[str, ...] = ()  # "batch" and/or "seq": dims marked dynamic (torch._dynamo.maybe_mark_dynamic)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Program:
        d = json.loads(text)
        d["dynamic"] = tuple(d["dynamic"])
        return cls(**d)

    @property
    def has_dropout(self) -> bool:
        return any(b.get("dropout", 0) > 0 for b in self.blocks)

    @property
    def size(self) -> int:
        """A rough complexity measure the shrinker minimises."""
        return 1000 * len(self.blocks) + sum(len(b) for b in self.blocks) + self.batch + self.seq + self.dim

    def summary(self) -> str:
        kinds = ",".join(b["kind"] for b in self.blocks)
        dyn = "+".join(self.dynamic) or "static"
        sizes = f"B{self.batch} N{self.seq} C{self.dim}"
        return f"{self.stem['kind']}[{kinds}]{self.head['kind']} {sizes} {self.precision} {dyn}"


def _pick(rng: random.Random, table: dict[Any, float]) -> Any:
    keys = list(table)
    return rng.choices(keys, weights=[table[k] for k in keys])[0]


def generate(seed: int, *, precision: str | None = None, dynamic: bool | None = None, max_blocks: int = 5) -> Program:
    """Draw a program from ``seed`` (the same seed always gives the same program).

    Args:
        seed: the program's seed (also seeds its parameters and inputs).
        precision: force "fp32", "bf16" or "fp16"; random (70/20/10%) if None.
        dynamic: force dynamic dims on (True) or off (False); random (20% on) if None.
        max_blocks: at most this many blocks.

    Returns:
        A :class:`Program`.
    """
    rng = random.Random(seed)
    stem_kind = _pick(rng, {"tokens": 4, "features": 4, "image": 2})
    dim = _pick(rng, {3: 1, 7: 1, 8: 2, 16: 4, 24: 2, 32: 3, 64: 1})
    batch = _pick(rng, {1: 1, 2: 4, 3: 2, 4: 2})
    seq = _pick(rng, {1: 0.5, 3: 1, 7: 2, 8: 2, 16: 3, 33: 2, 64: 1, 197: 0.5})
    if seq == 197:
        batch = min(batch, 2)
    if precision is None:
        precision = _pick(rng, {"fp32": 7, "bf16": 2, "fp16": 1})
    if dynamic is None:
        dynamic = rng.random() < 0.2
    dyn: tuple[str, ...] = ()
    if dynamic:
        dyn = _pick(rng, {("batch",): 1, ("seq",): 1, ("batch", "seq"): 1})
        if stem_kind == "image":
            dyn = ("batch",)
    if stem_kind == "tokens":
        stem = {"kind": "tokens", "vocab": _pick(rng, {7: 1, 16: 1, 50: 1}), "pos": rng.random() < 0.6}
    elif stem_kind == "features":
        stem = {"kind": "features", "in": _pick(rng, {1: 1, 3: 1, 7: 1, 16: 2, 197: 0.5}), "bias": rng.random() < 0.8}
    else:
        stem = {
            "kind": "image",
            "size": _pick(rng, {4: 1, 7: 1, 8: 2, 9: 1, 16: 1}),
            "k": _pick(rng, {1: 1, 3: 3}),
            "stride": _pick(rng, {1: 2, 2: 1}),
            "bn": rng.random() < 0.7,
            "act": _pick(rng, {"relu": 3, "gelu": 1, "silu": 1}),
            "convs": _pick(rng, {0: 2, 1: 2, 2: 1}),
            "pool": rng.random() < 0.3,
            "channels_last": rng.random() < 0.3,
        }
    nblocks = rng.randint(1, max_blocks)
    blocks = []
    for _ in range(nblocks):
        kind = _pick(rng, _KIND_WEIGHTS)
        blocks.append(_gen_block(rng, kind, dim, seq, dyn))
    head: dict[str, Any] = {
        "kind": _pick(rng, {"ce": 3, "mse": 1, "out": 2} if stem_kind != "tokens" else {"ce": 2, "tied": 2, "out": 1}),
        "pool": _pick(rng, {"none": 2, "mean": 2, "first": 1}),
        "norm": _pick(rng, {"none": 1, "ln": 1, "rms": 1}),
        "classes": _pick(rng, {2: 1, 3: 1, 10: 1}),
    }
    if head["kind"] == "tied":
        head["pool"] = "none"
    prog = Program(seed, batch, seq, dim, stem, blocks, head, precision, dyn)
    if batch * stream_len(prog) < 2:
        # BatchNorm in training needs two values per channel (seed 760 drew one sample of one token): LayerNorm there.
        # Sizes only grow with the step (step_sizes), so step 0 decides. No rng draw here: other seeds keep their
        # programs.
        prog.blocks = [{**b, "norm": "ln"} if b.get("norm") == "bn" else b for b in blocks]
    return prog


_ACTS = {"gelu": 3, "gelu_tanh": 1, "silu": 2, "relu": 2, "relu_": 1, "tanh": 1, "sigmoid": 0.5}
_NORMS = {"none": 2, "ln": 3, "ln_noaffine": 0.5, "rms": 1, "rms_manual": 1.5, "bn": 0.5}


def _gen_block(rng: random.Random, kind: str, dim: int, seq: int, dyn: tuple[str, ...]) -> dict[str, Any]:
    b: dict[str, Any] = {"kind": kind}
    dropout = lambda: _pick(rng, {0.0: 6, 0.1: 1, 0.5: 0.5})  # noqa: E731
    if kind == "mlp":
        b.update(
            norm=_pick(rng, _NORMS),
            act=_pick(rng, _ACTS),
            ratio=_pick(rng, {0.5: 0.5, 1: 1, 2: 2, 4: 2}),
            gated=rng.random() < 0.25,
            bias=rng.random() < 0.8,
            residual=rng.random() < 0.8,
            dropout=dropout(),
            aux=rng.random() < 0.15,
        )
    elif kind == "attn":
        heads = _pick(rng, {1: 1, 2: 2, 3: 1, 4: 2})
        impl = _pick(rng, {"sdpa": 4, "matmul": 2, "bmm": 1, "baddbmm": 1, "einsum": 1})
        masks = {"none": 3, "causal_bool": 1, "additive_inf": 1, "additive_finfo": 1, "pad_bool": 1, "pad_additive": 1}
        if impl == "sdpa":
            masks["causal_flag"] = 2
        b.update(
            norm=_pick(rng, _NORMS),
            heads=heads,
            kv_heads=rng.choice([d for d in range(1, heads + 1) if heads % d == 0]),
            head_dim=_pick(rng, {1: 0.5, 3: 1, 7: 1, 8: 2, 16: 2}),
            qkv=_pick(rng, {"fused_split": 2, "fused_unbind": 1, "fused_chunk": 1, "separate": 1, "narrow": 1}),
            impl=impl,
            mask=_pick(rng, masks),
            probs=_pick(rng, {"softmax": 4, "softmax_f32": 1, "log_softmax": 1}),
            merge=_pick(rng, {"transpose_reshape": 3, "permute_contiguous": 1, "flatten": 1, "einsum": 1}),
            gqa=_pick(rng, {"native": 1, "expand": 1, "repeat": 1}),
            residual=rng.random() < 0.85,
            dropout=dropout() if rng.random() < 0.3 else 0.0,
            aux=rng.random() < 0.1,
        )
    elif kind == "norm":
        b.update(norm=_pick(rng, {"ln": 2, "ln_noaffine": 1, "rms": 1, "rms_manual": 1, "bn": 1}))
    elif kind == "layout":
        variants = {
            "split_cat": 2,
            "narrow_cat": 1,
            "chunk_stack": 1,
            "stack_unbind": 1,
            "group_view": 2,
            "expand_param": 1,
            "expand_token": 1,
            "strided_slice": 1,
            "permute_contiguous": 1,
            "transposed_act": 1,
        }
        if "seq" not in dyn:
            variants["token_mix"] = 1
        b.update(variant=_pick(rng, variants), act=_pick(rng, _ACTS), frac=rng.choice([0.25, 0.5, 0.75]))
    elif kind == "inplace":
        b.update(variant=_pick(rng, {"mul_add": 1, "slice_assign": 1, "clone_iadd": 1, "act_": 1}))
    elif kind == "tied":
        b.update(act=_pick(rng, _ACTS), residual=rng.random() < 0.8)
    elif kind == "mask":
        b.update(variant=_pick(rng, {"masked_fill": 1, "where": 1, "softmax_inf": 1, "mul_bool": 1}))
    elif kind == "nograd":
        b.update(variant=_pick(rng, {"no_grad_gate": 1, "detach": 1}))
    elif kind == "gate":
        b.update(fn=_pick(rng, {"softmax": 2, "log_softmax": 1}), act=_pick(rng, _ACTS))
    elif kind == "einsum":
        b.update(act=_pick(rng, _ACTS), twice=rng.random() < 0.5)
    return b


# --- source generation ---------------------------------------------------------------------------------------------


class _Src:
    """Accumulates ``__init__`` and ``forward`` lines."""

    def __init__(self) -> None:
        self.init: list[str] = []
        self.fwd: list[str] = []
        self.indent = 0

    def i(self, line: str) -> None:
        self.init.append(line)

    def f(self, line: str) -> None:
        self.fwd.append("    " * self.indent + line)


def _act(name: str, v: str, inplace_ok: bool = False) -> str:
    """An activation of expression ``v``; the in-place ReLU only where ``v`` is fresh and autograd does not need it."""
    if name == "relu_" and not inplace_ok:
        name = "relu"
    return {
        "gelu": f"F.gelu({v})",
        "gelu_tanh": f"F.gelu({v}, approximate='tanh')",
        "silu": f"F.silu({v})",
        "relu": f"F.relu({v})",
        "relu_": f"F.relu({v}, inplace=True)",
        "tanh": f"torch.tanh({v})",
        "sigmoid": f"torch.sigmoid({v})",
    }[name]


def _norm(s: _Src, p: str, norm: str, dim: int, v: str) -> str:
    """Emit a norm of ``v`` ([B, N, dim]); returns the expression of the result."""
    if norm == "none":
        return v
    if norm == "ln":
        s.i(f"self.{p}norm = nn.LayerNorm({dim})")
        return f"self.{p}norm({v})"
    if norm == "ln_noaffine":
        s.i(f"self.{p}norm = nn.LayerNorm({dim}, elementwise_affine=False)")
        return f"self.{p}norm({v})"
    if norm == "rms":
        s.i(f"self.{p}norm = nn.RMSNorm({dim}, eps=1e-6)")
        return f"self.{p}norm({v})"
    if norm == "rms_manual":
        s.i(f"self.{p}norm_w = nn.Parameter(1 + 0.1 * torch.randn({dim}))")
        s.f(f"{p}r = {v}.float()")
        s.f(f"{p}r = ({p}r * torch.rsqrt({p}r.pow(2).mean(-1, keepdim=True) + 1e-6)).to({v}.dtype)")
        return f"({p}r * self.{p}norm_w)"
    if norm == "bn":
        s.i(f"self.{p}norm = nn.BatchNorm1d({dim})")
        # NOTE: over the flattened tokens [B*N, C]: BatchNorm1d on a 3-D [B, C, N] input fails under AOTAutograd
        # without Inductor in torch 2.13 ("view size is not compatible" in its backward), with or without actpass.
        return f"self.{p}norm({v}.flatten(0, 1)).view_as({v})"
    raise ValueError(norm)


def _drop(p: float, v: str) -> str:
    return f"F.dropout({v}, {p}, self.training)" if p > 0 else v


def _emit_block(s: _Src, i: int, b: dict[str, Any], prog: Program) -> None:
    c = prog.dim
    p = f"b{i}_"
    kind = b["kind"]
    s.f(f"# block {i}: {kind}")
    if kind == "mlp":
        hid = max(1, int(c * b["ratio"]))
        if b["gated"]:
            hid += hid % 2
        s.i(f"self.{p}fc1 = nn.Linear({c}, {hid}, bias={b['bias']})")
        s.i(f"self.{p}fc2 = nn.Linear({hid // 2 if b['gated'] else hid}, {c}, bias={b['bias']})")
        s.f(f"h = self.{p}fc1({_norm(s, p, b['norm'], c, 'x')})")
        if b["gated"]:
            s.f("a, g = h.chunk(2, dim=-1)")
            s.f(f"h = {_act(b['act'], 'a')} * g")
        else:
            s.f(f"h = {_act(b['act'], 'h', inplace_ok=True)}")
        if b["aux"]:
            s.f("aux.append(h)")
        s.f(f"h = self.{p}fc2({_drop(b['dropout'], 'h')})")
        s.f("x = x + h" if b["residual"] else "x = h")
    elif kind == "attn":
        _emit_attn(s, p, b, prog)
    elif kind == "norm":
        s.f(f"x = {_norm(s, p, b['norm'], c, 'x')}")
    elif kind == "layout":
        _emit_layout(s, p, b, prog)
    elif kind == "inplace":
        s.i(f"self.{p}fc = nn.Linear({c}, {c})")
        v = b["variant"]
        if v == "mul_add":
            s.f(f"h = self.{p}fc(x)")
            s.f("h.mul_(0.5)")
            s.f("h.add_(x)")
            s.f("x = x + torch.tanh(h)")
        elif v == "slice_assign":
            k = max(1, c // 2)
            s.f(f"h = self.{p}fc(x)")
            s.f(f"h[..., :{k}] = h[..., :{k}] * 2 + 1")
            s.f("x = x + F.gelu(h)")
        elif v == "clone_iadd":
            s.f("h = x.clone()")
            s.f(f"h += self.{p}fc(x)")
            s.f("h.sigmoid_()")
            s.f("x = x * h")
        else:  # act_
            s.f(f"h = self.{p}fc(x)")
            s.f("h.relu_()")
            s.f("x = x + h * x")
    elif kind == "tied":
        s.i(f"self.{p}fc = nn.Linear({c}, {c})")
        s.f(f"h = self.{p}fc({_act(b['act'], f'self.{p}fc(x)')})  # the same weights twice")
        s.f("x = x + h" if b["residual"] else "x = h")
    elif kind == "mask":
        s.i(f"self.{p}fc = nn.Linear({c}, {c})")
        s.i(f"self.{p}g = nn.Linear({c}, {c})")
        v = b["variant"]
        s.f(f"m = self.{p}g(x) > 0")
        if v == "masked_fill":
            s.f(f"x = x + self.{p}fc(x).masked_fill(m, 0.0)")
        elif v == "where":
            s.f(f"x = x + torch.where(m, self.{p}fc(x), x * 0.5)")
        elif v == "softmax_inf":
            s.f("m[..., 0] = False  # every row keeps one element: no all -inf rows")
            s.f(f"x = x + self.{p}fc(x).masked_fill(m, float('-inf')).softmax(-1) * x")
        else:  # mul_bool
            s.f(f"x = x + F.silu(self.{p}fc(x)) * m")
    elif kind == "nograd":
        s.i(f"self.{p}fc = nn.Linear({c}, {c})")
        if b["variant"] == "no_grad_gate":
            s.f("with torch.no_grad():")
            s.f(f"    g = torch.sigmoid(self.{p}fc(x)).mean(-1, keepdim=True)")
            s.f("x = F.gelu(x) * g")
        else:
            s.f(f"x = x + self.{p}fc(F.gelu(x.detach()))")
    elif kind == "gate":
        s.i(f"self.{p}fc = nn.Linear({c}, {c})")
        fn = "F.softmax" if b["fn"] == "softmax" else "F.log_softmax"
        s.f(f"h = {fn}(self.{p}fc(x), dim=-1)")
        s.f(f"x = x + {_act(b['act'], 'h')} * x")
    elif kind == "einsum":
        d = max(1, c // 2 + 1)
        s.i(f"self.{p}w = nn.Parameter(torch.randn({c}, {d}) / {math.sqrt(c):.4f})")
        mix = f"torch.einsum('bnc,cd->bnd', x, self.{p}w)"
        s.f(f"h = {_act(b['act'], mix)}")
        if b["twice"]:
            s.f(f"x = x + torch.einsum('bnd,cd->bnc', h, self.{p}w)  # the parameter used twice")
        else:
            s.i(f"self.{p}out = nn.Linear({d}, {c})")
            s.f(f"x = x + self.{p}out(h)")
    elif kind == "break":
        s.f("torch._dynamo.graph_break()")
    else:
        raise ValueError(kind)


def _emit_attn(s: _Src, p: str, b: dict[str, Any], prog: Program) -> None:
    c = prog.dim
    hh, d = b["heads"], b["head_dim"]
    kv = b["kv_heads"] if hh % b["kv_heads"] == 0 else 1  # (the shrinker may have lowered heads)
    qkv = b["qkv"]
    if qkv in ("fused_unbind", "fused_chunk"):
        kv = hh  # these layouts need as many kv heads as heads
    impl = b["impl"]
    gqa = b["gqa"] if kv != hh else "none"
    if gqa == "native" and impl != "sdpa":
        gqa = "expand"
    s.f("bsz, n, _ = x.shape")
    s.f(f"h = {_norm(s, p, b['norm'], c, 'x')}")
    if qkv == "separate":
        s.i(f"self.{p}q = nn.Linear({c}, {hh * d})")
        s.i(f"self.{p}k = nn.Linear({c}, {kv * d})")
        s.i(f"self.{p}v = nn.Linear({c}, {kv * d})")
        s.f(f"q = self.{p}q(h).view(bsz, n, {hh}, {d}).transpose(1, 2)")
        s.f(f"k = self.{p}k(h).view(bsz, n, {kv}, {d}).transpose(1, 2)")
        s.f(f"v = self.{p}v(h).view(bsz, n, {kv}, {d}).transpose(1, 2)")
    else:
        s.i(f"self.{p}qkv = nn.Linear({c}, {(hh + 2 * kv) * d})")
        if qkv == "fused_unbind":
            s.f(f"q, k, v = self.{p}qkv(h).reshape(bsz, n, 3, {hh}, {d}).permute(2, 0, 3, 1, 4).unbind(0)")
        else:
            if qkv == "fused_split":
                s.f(f"q, k, v = self.{p}qkv(h).split([{hh * d}, {kv * d}, {kv * d}], dim=-1)")
            elif qkv == "fused_chunk":
                s.f(f"q, k, v = self.{p}qkv(h).chunk(3, dim=-1)")
            else:  # narrow
                s.f(f"t = self.{p}qkv(h)")
                s.f(f"q, k, v = t.narrow(-1, 0, {hh * d}), t[..., {hh * d}:{(hh + kv) * d}], t[..., {(hh + kv) * d}:]")
            s.f(f"q = q.reshape(bsz, n, {hh}, {d}).transpose(1, 2)")
            s.f(f"k = k.reshape(bsz, n, {kv}, {d}).transpose(1, 2)")
            s.f(f"v = v.reshape(bsz, n, {kv}, {d}).transpose(1, 2)")
    if gqa == "expand":
        r = hh // kv
        s.f(f"k = k[:, :, None].expand(bsz, {kv}, {r}, n, {d}).reshape(bsz, {hh}, n, {d})")
        s.f(f"v = v[:, :, None].expand(bsz, {kv}, {r}, n, {d}).reshape(bsz, {hh}, n, {d})")
    elif gqa == "repeat":
        s.f(f"k = k.repeat_interleave({hh // kv}, dim=1)")
        s.f(f"v = v.repeat_interleave({hh // kv}, dim=1)")
    mask = b["mask"]
    if mask == "causal_flag" and impl != "sdpa":
        mask = "causal_bool"
    # Masks: bool (True = attend) or additive (0 / -inf / finfo.min), [n, n] or [bsz, 1, 1, n].
    if mask == "causal_bool":
        s.f("mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()")
    elif mask == "additive_inf":
        s.f("mask = torch.full((n, n), float('-inf'), device=x.device).triu(1)")
    elif mask == "additive_finfo":
        s.f("mask = torch.zeros(n, n, device=x.device).masked_fill(")
        s.f("    torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), torch.finfo(q.dtype).min)")
    elif mask == "pad_bool":
        s.f("mask = (torch.arange(n, device=x.device) < n - n // 4).view(1, 1, 1, n)")
    elif mask == "pad_additive":
        s.f("keep = torch.arange(n, device=x.device) < n - n // 4")
        s.f("mask = torch.zeros(bsz, 1, 1, n, device=x.device).masked_fill(~keep, torch.finfo(q.dtype).min)")
    is_bool = mask in ("causal_bool", "pad_bool")
    additive = mask in ("additive_inf", "additive_finfo", "pad_additive")
    scale = f"{d**-0.5:.6f}"
    drop = b["dropout"]
    if impl == "sdpa":
        kw = []
        if is_bool:
            kw.append("attn_mask=mask")
        elif additive:
            kw.append("attn_mask=mask.to(q.dtype)")
        if mask == "causal_flag":
            kw.append("is_causal=True")
        if drop > 0:
            kw.append(f"dropout_p={drop} if self.training else 0.0")
        if gqa == "native":
            kw.append("enable_gqa=True")
        s.f(f"o = F.scaled_dot_product_attention(q, k, v{''.join(', ' + a for a in kw)})")
    else:
        if impl == "matmul":
            s.f(f"sc = (q @ k.transpose(-2, -1)) * {scale}")
        elif impl == "einsum":
            s.f(f"sc = torch.einsum('bhnd,bhmd->bhnm', q, k) * {scale}")
        elif impl == "bmm":
            s.f(f"sc = torch.bmm(q.reshape(bsz * {hh}, n, {d}), k.reshape(bsz * {hh}, n, {d}).transpose(1, 2))")
            s.f(f"sc = sc.view(bsz, {hh}, n, n) * {scale}")
        else:  # baddbmm: the additive mask (or zeros) as the bias
            if additive:
                s.f(f"bias = mask.to(q.dtype).expand(bsz, {hh}, n, n).reshape(bsz * {hh}, n, n)")
            else:
                s.f(f"bias = torch.zeros(bsz * {hh}, n, n, device=x.device, dtype=q.dtype)")
            s.f(f"q3, k3 = q.reshape(bsz * {hh}, n, {d}), k.reshape(bsz * {hh}, n, {d})")
            s.f(f"sc = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha={scale}).view(bsz, {hh}, n, n)")
        if is_bool:
            if b["probs"] == "softmax_f32":
                s.f("sc = torch.where(mask, sc, torch.finfo(sc.dtype).min)")
            else:
                s.f("sc = sc.masked_fill(~mask, float('-inf'))")
        elif additive and impl != "baddbmm":
            s.f("sc = sc + mask")
        if b["probs"] == "softmax":
            s.f("a = sc.softmax(-1)")
        elif b["probs"] == "softmax_f32":
            s.f("a = sc.float().softmax(-1).to(q.dtype)")
        else:
            s.f("a = F.log_softmax(sc, dim=-1).exp()")
        if drop > 0:
            s.f(f"a = F.dropout(a, {drop}, self.training)")
        if b["aux"]:
            s.f("aux.append(a)")
        if impl == "einsum":
            s.f("o = torch.einsum('bhnm,bhmd->bhnd', a, v)")
        elif impl in ("bmm", "baddbmm"):
            s.f(f"o = torch.bmm(a.reshape(bsz * {hh}, n, n), v.reshape(bsz * {hh}, n, {d})).view(bsz, {hh}, n, {d})")
        else:
            s.f("o = a @ v")
    merge = b["merge"]
    s.i(f"self.{p}proj = nn.Linear({hh * d}, {c})")
    if merge == "transpose_reshape":
        s.f(f"o = o.transpose(1, 2).reshape(bsz, n, {hh * d})")
    elif merge == "permute_contiguous":
        s.f(f"o = o.permute(0, 2, 1, 3).contiguous().view(bsz, n, {hh * d})")
    elif merge == "flatten":
        s.f("o = o.transpose(1, 2).flatten(2)")
    else:  # einsum with the projection's weight viewed per head
        s.f(
            f"o = torch.einsum('bhnd,hdc->bnc', o, self.{p}proj.weight.t().reshape({hh}, {d}, {c})) + self.{p}proj.bias"
        )
    out = f"self.{p}proj(o)" if merge != "einsum" else "o"
    s.f(f"x = x + {out}" if b["residual"] else f"x = {out}")


def _emit_layout(s: _Src, p: str, b: dict[str, Any], prog: Program) -> None:
    c, act = prog.dim, b["act"]
    k = min(c - 1, max(1, round(c * b["frac"]))) if c > 1 else 1
    v = b["variant"]
    if c < 2 and v in ("split_cat", "narrow_cat", "chunk_stack"):
        v = "group_view"
    if v == "split_cat":
        s.i(f"self.{p}fa = nn.Linear({k}, {k})")
        s.f(f"a, r = x.split([{k}, {c - k}], dim=-1)")
        s.f(f"x = x + torch.cat([{_act(act, f'self.{p}fa(a)')}, r * torch.sigmoid(r)], dim=-1)")
    elif v == "narrow_cat":
        s.i(f"self.{p}fa = nn.Linear({k}, {c - k})")
        s.f(f"a, r = x.narrow(-1, 0, {k}), x[..., {k}:]")
        s.f(f"x = torch.cat([a, r + {_act(act, f'self.{p}fa(a)')}], dim=-1)")
    elif v == "chunk_stack":
        s.i(f"self.{p}fa = nn.Linear({c // 2}, {c // 2})")
        s.f(f"a, r = x[..., :{2 * (c // 2)}].chunk(2, dim=-1)")
        s.f(f"st = torch.stack([{_act(act, f'self.{p}fa(a)')}, r], dim=0)")
        s.f(f"x = torch.cat([x[..., :{c // 2}] + st.sum(0), x[..., {c // 2}:]], dim=-1)")
    elif v == "stack_unbind":
        s.i(f"self.{p}fa = nn.Linear({c}, {c})")
        s.f(f"st = torch.stack([x, self.{p}fa(x)], dim=2)")
        s.f("st = st.transpose(2, 3)")
        s.f(f"u, w = {_act(act, 'st')}.unbind(-1)")
        s.f("x = x + u * w")
    elif v == "group_view":
        g = max(dd for dd in range(1, c + 1) if c % dd == 0 and dd <= max(1, round(c * b["frac"])))
        s.i(f"self.{p}fa = nn.Linear({c}, {c})")
        s.f(f"h = x.reshape(x.shape[0], x.shape[1], {g}, {c // g}).softmax(-1)")
        s.f(f"h = h.transpose(2, 3).contiguous().view(x.shape[0], x.shape[1], {c})")
        s.f(f"x = x + self.{p}fa({_act(act, 'h')})")
    elif v == "expand_param":
        s.i(f"self.{p}scale = nn.Parameter(1 + 0.1 * torch.randn(1, 1, {c}))")
        s.f(f"x = {_act(act, f'x * self.{p}scale.expand(x.shape[0], x.shape[1], {c})')}")
    elif v == "expand_token":
        s.i(f"self.{p}fa = nn.Linear({c}, {c})")
        s.f(f"x = x + {_act(act, f'self.{p}fa(x[:, :1]).expand(-1, x.shape[1], -1)')} * x")
    elif v == "strided_slice":
        s.i(f"self.{p}fa = nn.Linear({c}, {c})")
        s.f(f"h = {_act(act, f'self.{p}fa(x[:, ::2])')}")
        s.f("x = x + torch.cat([h, h], dim=1)[:, : x.shape[1]]")
    elif v == "permute_contiguous":
        s.i(f"self.{p}fa = nn.Linear({c}, {c})")
        s.f(f"h = {_act(act, 'x.permute(0, 2, 1).contiguous()')}")
        s.f(f"x = x + self.{p}fa(h.permute(0, 2, 1))")
    elif v == "transposed_act":
        s.i(f"self.{p}fa = nn.Linear({c}, {c})")
        s.f(f"h = {_act(act, f'self.{p}fa(x).transpose(1, 2)')} * 2  # non-contiguous saved activations")
        s.f("x = x + h.transpose(1, 2)")
    elif v == "token_mix":
        n = stream_len(prog)
        s.i(f"self.{p}tm = nn.Linear({n}, {n})")
        s.f(f"x = x + {_act(act, f'self.{p}tm(x.transpose(1, 2))')}.transpose(1, 2)")
    else:
        raise ValueError(v)


def stream_len(prog: Program) -> int:
    """N of the stream ``[B, N, C]`` (for image programs, the feature map's H * W)."""
    st = prog.stem
    if st["kind"] != "image":
        return prog.seq
    size = (st["size"] + 2 * (st["k"] // 2) - st["k"]) // st["stride"] + 1
    if st["pool"]:
        size = size // 2
    return size * size


def _emit_stem(s: _Src, prog: Program) -> None:
    st, c = prog.stem, prog.dim
    if st["kind"] == "tokens":
        s.i(f"self.emb = nn.Embedding({st['vocab']}, {c})")
        s.f("x = self.emb(inp)")
        if st["pos"]:
            s.i(f"self.pos = nn.Embedding({prog.seq + 8}, {c})")
            s.f("x = x + self.pos(torch.arange(inp.shape[1], device=inp.device))")
    elif st["kind"] == "features":
        s.i(f"self.inp = nn.Linear({st['in']}, {c}, bias={st['bias']})")
        s.f("x = self.inp(inp)")
    else:
        k, stride = st["k"], st["stride"]
        s.i(f"self.conv = nn.Conv2d(3, {c}, {k}, stride={stride}, padding={k // 2}, bias={not st['bn']})")
        s.f("h = self.conv(inp)")
        if st["bn"]:
            s.i(f"self.bn = nn.BatchNorm2d({c})")
            s.f("h = self.bn(h)")
        s.f(f"h = {_act(st['act'], 'h')}")
        for j in range(st["convs"]):
            s.i(f"self.conv{j} = nn.Conv2d({c}, {c}, 3, padding=1)")
            s.f(f"h = h + {_act(st['act'], f'self.conv{j}(h)')}")
        if st["pool"]:
            s.f("h = F.max_pool2d(h, 2)")
        s.f("x = h.flatten(2).transpose(1, 2)")


def _emit_head(s: _Src, prog: Program) -> None:
    hd, c = prog.head, prog.dim
    x = _norm(s, "head_", hd["norm"], c, "x")
    if hd["pool"] == "mean":
        x = f"{x}.mean(1)"
    elif hd["pool"] == "first":
        x = f"{x}[:, 0]"
    if hd["kind"] == "tied":
        s.f(f"logits = F.linear({x}, self.emb.weight)  # the embedding used twice")
        s.f("out = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())")
        return
    k = hd["classes"]
    s.i(f"self.head = nn.Linear({c}, {k})")
    s.f(f"logits = self.head({x})")
    if hd["kind"] == "ce":
        if hd["pool"] == "none":
            s.f("out = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())")
        else:
            s.f("out = F.cross_entropy(logits.float(), target[:, 0])")
    elif hd["kind"] == "mse":
        s.f("out = F.mse_loss(logits.float(), torch.tanh(logits.detach().float()) * 0.5)")
    else:
        s.f("out = logits")


def source(prog: Program) -> str:
    """The program as Python source defining ``class Model(nn.Module)``; ``forward(inp, target)`` returns a tuple.

    The first element is the loss (a scalar) or a tensor of logits; the rest are intermediate activations that are
    also returned (and saved for backward).
    """
    s = _Src()
    s.indent = 0
    _emit_stem(s, prog)
    for i, b in enumerate(prog.blocks):
        _emit_block(s, i, b, prog)
    _emit_head(s, prog)
    lines = [
        "class Model(nn.Module):",
        f"    # {prog.summary()}",
        "    def __init__(self):",
        "        super().__init__()",
        *("        " + ln for ln in s.init),
        "",
        "    def forward(self, inp, target):",
        "        aux = []",
        *("        " + ln for ln in s.fwd),
        "        return (out, *aux)",
    ]
    return "\n".join(lines) + "\n"


HEADER = "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"


def build(prog: Program, src: str | None = None) -> torch.nn.Module:
    """Execute the program's source and build the model with parameters seeded by ``prog.seed``."""
    ns: dict[str, Any] = {}
    code = HEADER + "\n" + (src or source(prog))
    exec(compile(code, f"<fuzz program {prog.seed}>", "exec"), ns)  # noqa: S102 - our own generated source
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(prog.seed)
        model = ns["Model"]()
    model.train()
    if prog.stem["kind"] == "image" and prog.stem["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    return model


def step_sizes(prog: Program, step: int) -> tuple[int, int]:
    """(batch, seq) of step ``step``: later steps grow the dims marked dynamic."""
    b, n = prog.batch, prog.seq
    if step and "batch" in prog.dynamic:
        b += step
    if step and "seq" in prog.dynamic:
        n += 3 * step
    return b, n


def make_inputs(prog: Program, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inp, target)`` for step ``step``, seeded by the program's seed and the step."""
    g = torch.Generator().manual_seed(prog.seed * 7919 + step)
    b, n = step_sizes(prog, step)
    st = prog.stem
    if st["kind"] == "tokens":
        inp = torch.randint(0, st["vocab"], (b, n), generator=g)
        classes = st["vocab"] if prog.head["kind"] == "tied" else prog.head["classes"]
    elif st["kind"] == "features":
        inp = torch.randn(b, n, st["in"], generator=g)
        classes = prog.head["classes"]
    else:
        inp = torch.randn(b, 3, st["size"], st["size"], generator=g)
        if st["channels_last"]:
            inp = inp.to(memory_format=torch.channels_last)
        classes = prog.head["classes"]
        n = stream_len(prog)
    target = torch.randint(0, classes, (b, n), generator=g)
    return inp, target
