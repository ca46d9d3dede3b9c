"""Small transformer pieces for the tests (real layouts, CPU-sized)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn: str = "sdpa", causal: bool = False) -> None:
        super().__init__()
        self.heads, self.attn, self.causal = heads, attn, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.attn == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            a = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
            if self.causal:
                a = a.masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            o = a.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, attn: str = "sdpa", causal: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, attn, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyLM(nn.Module):
    """Embedding, blocks, head, cross-entropy: the whole shape of a GPT step."""

    def __init__(self, vocab: int = 64, dim: int = 64, heads: int = 4, depth: int = 2, attn: str = "sdpa") -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, attn, causal=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(self.blocks(self.emb(idx))))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Global L2 relative error of ``a`` against reference ``b`` over all parameters."""
    assert a.keys() == b.keys()
    num = sum((a[k].float() - b[k].float()).pow(2).sum() for k in b)
    den = sum(b[k].float().pow(2).sum() for k in b)
    return (num / den).sqrt().item()
