"""A GPT-style causal language model in plain PyTorch, as a model file for ``actpass inspect``.

Architecture (GPT-2): token and learned position embeddings, ``n_layer`` pre-norm blocks (LayerNorm -> causal
multi-head attention -> residual, LayerNorm -> MLP with GELU -> residual), a final LayerNorm and an LM head, tied to
the token embedding by default.

Attention is selectable so the pass sees both patterns:

* ``attn="sdpa"``: ``F.scaled_dot_product_attention(..., is_causal=True)``;
* ``attn="eager"``: ``softmax(mask(q @ k^T * scale)) @ v`` with a boolean lower-triangular buffer.

Interface: ``GPT.forward(idx, targets=None) -> GPTOutput(logits, loss)``. ``idx`` and ``targets`` are
``(B, T)`` int64 token ids; ``targets`` is ``idx`` shifted left by one (the next token at each position), so the
cross-entropy is computed inside the compiled graph, as in nanoGPT and Hugging Face models. Without ``targets``,
``loss`` is ``None``.

Model-file contract:

* ``model()`` builds the ``"cpu"`` preset (byte-level vocab 256, ctx 128, dim 192, 4 layers, 6 heads);
* ``example_inputs()`` is ``(idx, targets)``: a fixed random ``(4, 129)`` byte sequence split into the
  ``(4, 128)`` inputs and the ``(4, 128)`` next tokens;
* ``loss(output)`` is ``output.loss``.

Run ``python examples/gpt.py --help`` for the training demo.
"""

import dataclasses
import math
import sys
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Attn = Literal["sdpa", "eager"]

BATCH = 4  # batch size of `example_inputs`


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape of a :class:`GPT`. See :data:`PRESETS`.

    Example:
        >>> PRESETS["gpt2_small"] == GPTConfig()
        True
    """

    vocab_size: int = 50257  # number of token ids
    block_size: int = 1024  # context length: the longest sequence the position embedding covers
    n_embd: int = 768  # embedding width
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads; n_embd must be a multiple of it
    mlp_ratio: float = 4.0  # MLP hidden width / n_embd
    tie_weights: bool = True  # share the LM head's weight with the token embedding (GPT-2 does)
    eps: float = 1e-5  # LayerNorm epsilon

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")


PRESETS: dict[str, GPTConfig] = {
    # Seconds-fast on CPU, for unit tests.
    "tiny_test": GPTConfig(vocab_size=64, block_size=32, n_embd=64, n_layer=2, n_head=4),
    # Small but realistic shapes; what the module-level `model` builds.
    "cpu": GPTConfig(vocab_size=256, block_size=128, n_embd=192, n_layer=4, n_head=6),
    # GPT-2 small (124M parameters), for GPUs.
    "gpt2_small": GPTConfig(vocab_size=50257, block_size=1024, n_embd=768, n_layer=12, n_head=12),
}


class GPTOutput(NamedTuple):
    logits: Tensor  # (B, T, vocab_size)
    loss: Tensor | None  # mean next-token cross-entropy, or None without targets


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection."""

    mask: Tensor

    def __init__(self, cfg: GPTConfig, attn: Attn = "sdpa") -> None:
        super().__init__()
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"attn must be 'sdpa' or 'eager', got {attn!r}")
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.attn = attn
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        if attn == "eager":
            causal = torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool).tril()
            self.register_buffer("mask", causal.view(1, 1, cfg.block_size, cfg.block_size), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in self.c_attn(x).split(c, dim=2)
        )  # each (b, n_head, t, head_dim)
        if self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            scores = scores.masked_fill(~self.mask[:, :, :t, :t], float("-inf"))
            y = scores.softmax(dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = int(cfg.n_embd * cfg.mlp_ratio)
        self.c_fc = nn.Linear(cfg.n_embd, hidden)
        self.c_proj = nn.Linear(hidden, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's tanh GELU


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, cfg: GPTConfig, attn: Attn = "sdpa") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.eps)
        self.attn = CausalSelfAttention(cfg, attn)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2-style causal LM.

    Args:
        cfg: the shapes.
        attn: ``"sdpa"`` or ``"eager"`` attention (see the module docstring).

    Example:
        >>> m = GPT(PRESETS["tiny_test"])
        >>> idx, targets = make_inputs("tiny_test", batch=2)
        >>> out = m(idx, targets)
        >>> out.logits.shape, out.loss.shape
        (torch.Size([2, 32, 64]), torch.Size([]))
    """

    def __init__(self, cfg: GPTConfig, attn: Attn = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, attn) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2: normal(0, 0.02) everywhere, zero biases, and residual projections scaled by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> GPTOutput:
        """Args: ``idx`` ``(B, T)`` int64 with ``T <= block_size``; ``targets`` ``(B, T)`` int64 next tokens or
        ``None``. Returns: :class:`GPTOutput` with ``(B, T, vocab_size)`` logits and the mean cross-entropy."""
        t = idx.shape[1]
        if t > self.cfg.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return GPTOutput(logits, loss)


def build_model(cfg: GPTConfig | str = "cpu", attn: Attn = "sdpa", seed: int = 0) -> GPT:
    """A :class:`GPT` with weights drawn from ``seed``, leaving the global RNG as it was.

    Args:
        cfg: a config or the name of a preset in :data:`PRESETS`.
        attn: ``"sdpa"`` or ``"eager"``.
        seed: seed of the random weights.

    Returns:
        The model on CPU, in float32, in training mode.

    Example:
        >>> build_model("tiny_test").cfg.n_layer
        2
    """
    cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(cfg, attn)


def make_inputs(cfg: GPTConfig | str = "cpu", batch: int = BATCH, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(idx, targets)``: a fixed random ``(batch, block_size + 1)`` token sequence, split into the first
    ``block_size`` tokens and the ``block_size`` tokens that follow each of them."""
    cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(cfg.vocab_size, (batch, cfg.block_size + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# --- the model-file contract ---------------------------------------------------------------------------------------


def model() -> GPT:
    """The ``"cpu"`` preset with SDPA attention."""
    return build_model("cpu")


def example_inputs() -> tuple[Tensor, Tensor]:
    """``(idx, targets)``, each ``(4, 128)`` int64."""
    return make_inputs("cpu", BATCH)


def loss(output: GPTOutput) -> Tensor:
    """The next-token cross-entropy that :meth:`GPT.forward` computed from ``targets``."""
    if output.loss is None:
        raise ValueError("GPT was called without targets: call model(idx, targets)")
    return output.loss


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _train import parse_args, run

    args = parse_args(__doc__, presets=PRESETS, default_preset="cpu", default_batch=BATCH)
    run(build_model(args.preset, attn=args.attn), make_inputs(args.preset, args.batch), loss, args)
