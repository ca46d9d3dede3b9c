"""A DeiT-style Vision Transformer in plain PyTorch, as a model file for ``actpass inspect``.

Architecture (DeiT without distillation): a strided-conv patch embedding, a class token, a learned position
embedding, ``depth`` pre-norm blocks (LayerNorm -> multi-head attention -> residual, LayerNorm -> MLP with GELU ->
residual), a final LayerNorm and a linear head on the class token.

Attention is selectable so the pass sees both patterns:

* ``attn="sdpa"``: one ``F.scaled_dot_product_attention`` call (a fused op with its own saved tensors);
* ``attn="eager"``: ``softmax(q @ k^T * scale) @ v`` spelled out, which saves the softmax probabilities.

Model-file contract:

* ``model()`` builds the ``"cpu"`` preset (img 64, patch 8, dim 192, depth 4, heads 3) with SDPA attention;
* ``example_inputs()`` is ``(images,)``: a fixed random ``(8, 3, 64, 64)`` float batch;
* ``loss(logits)`` is cross-entropy against fixed random labels drawn from a generator seeded with
  :data:`LABEL_SEED`, so the same batch always gets the same labels and a few training steps memorise them.

Run ``python examples/vit.py --help`` for the training demo.
"""

import dataclasses
import sys
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Attn = Literal["sdpa", "eager"]

LABEL_SEED = 1234  # seed of the fixed labels that `loss` scores the logits against
BATCH = 8  # batch size of `example_inputs`


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape of a :class:`ViT`. See :data:`PRESETS`.

    Example:
        >>> ViTConfig(img_size=32, patch_size=8).num_patches
        16
    """

    img_size: int = 224  # input height and width, in pixels
    patch_size: int = 16  # side of a square patch; img_size must be a multiple of it
    in_chans: int = 3  # input channels
    dim: int = 192  # embedding width
    depth: int = 12  # number of transformer blocks
    heads: int = 3  # attention heads; dim must be a multiple of it
    mlp_ratio: float = 4.0  # MLP hidden width / dim
    num_classes: int = 1000  # classifier outputs
    eps: float = 1e-6  # LayerNorm epsilon (DeiT uses 1e-6)

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"ViTConfig: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"ViTConfig: dim {self.dim} is not a multiple of heads {self.heads}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


PRESETS: dict[str, ViTConfig] = {
    # Seconds-fast on CPU, for unit tests.
    "tiny_test": ViTConfig(img_size=32, patch_size=8, dim=64, depth=2, heads=4, num_classes=10),
    # Small but realistic shapes (65 tokens, 192 wide); what the module-level `model` builds.
    "cpu": ViTConfig(img_size=64, patch_size=8, dim=192, depth=4, heads=3, num_classes=100),
    # The DeiT paper's models (Touvron et al., 2021), for GPUs.
    "deit_tiny": ViTConfig(img_size=224, patch_size=16, dim=192, depth=12, heads=3),
    "deit_small": ViTConfig(img_size=224, patch_size=16, dim=384, depth=12, heads=6),
}


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, heads: int, attn: Attn = "sdpa") -> None:
        super().__init__()
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"attn must be 'sdpa' or 'eager', got {attn!r}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.attn = attn
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (b, heads, n, head_dim)
        if self.attn == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            probs = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            out = probs @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: ViTConfig, attn: Attn = "sdpa") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg.dim, cfg.heads, attn)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = MLP(cfg.dim, int(cfg.dim * cfg.mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """DeiT-style Vision Transformer.

    Args:
        cfg: the shapes.
        attn: ``"sdpa"`` or ``"eager"`` attention (see the module docstring).

    Example:
        >>> m = ViT(PRESETS["tiny_test"])
        >>> m(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, cfg: ViTConfig, attn: Attn = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg, attn) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # DeiT/timm: truncated normal (std 0.02) for linears and the two embeddings, zero linear biases;
        # the patch conv keeps PyTorch's default init.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        """Args: images ``(B, C, H, W)`` float. Returns: logits ``(B, num_classes)``."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, num_patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def build_model(cfg: ViTConfig | str = "cpu", attn: Attn = "sdpa", seed: int = 0) -> ViT:
    """A :class:`ViT` with weights drawn from ``seed``, leaving the global RNG as it was.

    Args:
        cfg: a config or the name of a preset in :data:`PRESETS`.
        attn: ``"sdpa"`` or ``"eager"``.
        seed: seed of the random weights.

    Returns:
        The model on CPU, in float32, in training mode.

    Example:
        >>> build_model("tiny_test", attn="eager").cfg.depth
        2
    """
    cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViT(cfg, attn)


def make_inputs(cfg: ViTConfig | str = "cpu", batch: int = BATCH, seed: int = 0) -> tuple[Tensor]:
    """``(images,)``: a fixed standard-normal ``(batch, in_chans, img_size, img_size)`` batch on CPU."""
    cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g),)


def fixed_labels(logits: Tensor) -> Tensor:
    """Labels in ``[0, num_classes)`` for each row of ``logits``, the same on every call for the same shape."""
    g = torch.Generator().manual_seed(LABEL_SEED)
    return torch.randint(logits.shape[-1], logits.shape[:1], generator=g).to(logits.device)


# --- the model-file contract ---------------------------------------------------------------------------------------


def model() -> ViT:
    """The ``"cpu"`` preset with SDPA attention."""
    return build_model("cpu")


def example_inputs() -> tuple[Tensor]:
    """``(images,)`` of shape ``(8, 3, 64, 64)``."""
    return make_inputs("cpu", BATCH)


def loss(output: Tensor) -> Tensor:
    """Cross-entropy of the logits against :func:`fixed_labels`, in float32."""
    return F.cross_entropy(output.float(), fixed_labels(output))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _train import parse_args, run

    args = parse_args(__doc__, presets=PRESETS, default_preset="cpu", default_batch=BATCH)
    run(build_model(args.preset, attn=args.attn), make_inputs(args.preset, args.batch), loss, args)
