"""The training suite: models, data and losses shared by the convergence, sensitivity and memory benchmarks.

Every task trains a small model the way its users train it, on data that ships with an installed package (nothing
is downloaded; weights are random, from configs):

=================  =====================================================================================================
task               model, data, loss
=================  =====================================================================================================
``hf-gpt2``        Hugging Face ``GPT2LMHeadModel`` (2 layers, dim 128, 4 heads, eager attention, dropout 0.1 as
                   GPT-2's config has it), the Python standard library's source as bytes, ``model(input_ids=x,
                   labels=x).loss``, 8 x 128 tokens, AdamW lr 3e-3 (issue 8's setting)
``hf-gpt2-sdpa``   the same with ``attn_implementation="sdpa"``
``hf-llama``       ``LlamaForCausalLM`` (2 layers, dim 128, 4 query / 2 key-value heads, SwiGLU 344, RoPE), bytes,
                   ``labels=``, 8 x 128, lr 3e-3
``hf-bert``        ``BertForMaskedLM`` (2 layers, dim 128, 4 heads), bytes with 15% of positions masked (BERT's
                   80/10/10 rule), ``labels`` = the original byte where masked and -100 elsewhere, 16 x 64, lr 1e-3
``hf-vit``         ``ViTForImageClassification`` (8x8 one-channel images, patch 2, dim 64, 4 layers, 4 heads) on
                   scikit-learn's digits, ``labels=``, batch 64, lr 1e-3
``gpt``            ``examples/gpt.py`` (byte-level, context 64, dim 128, 4 layers, sdpa), bytes, batch 16, lr 1e-3
``vit``            ``examples/vit.py`` (8x8 images, patch 2, dim 64, depth 4, sdpa) on digits, batch 64, lr 1e-3
=================  =====================================================================================================

Bytes come from the standard library's ``Lib/*.py`` (sorted by name, concatenated, first 4 MiB); the last 10% are held
out. Digits are scikit-learn's 1797 8x8 images with a fixed 20% held out. Batches are drawn from a generator seeded
per task and seed, so every configuration of a seed sees the same batches; model weights come from the seed too.
"""

from __future__ import annotations

import dataclasses
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(ROOT / "examples"))


# ------------------------------------------------------------------------------------------------------------ data


def stdlib_bytes(max_bytes: int = 4 << 20) -> Tensor:
    """Up to ``max_bytes`` of the standard library's ``Lib/*.py`` files, sorted by name, as int64 byte values."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise SystemExit(f"no *.py files under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def digits(test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: the 8x8 digits as ``(N, 1, 8, 8)`` floats standardised on the training
    split, with a fixed random split (the same for every seed)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("the vit tasks need scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


_CACHE: dict[str, Any] = {}


def _bytes_split() -> tuple[Tensor, Tensor]:
    if "bytes" not in _CACHE:
        text = stdlib_bytes()
        split = int(len(text) * 0.9)
        _CACHE["bytes"] = (text[:split], text[split:])
    return _CACHE["bytes"]


def _windows(data: Tensor, n: int, length: int, g: torch.Generator) -> Tensor:
    start = torch.randint(len(data) - length, (n, 1), generator=g)
    return data[start + torch.arange(length)]


# ----------------------------------------------------------------------------------------------------------- tasks


@dataclasses.dataclass
class Task:
    """One training task. ``batches`` and ``eval_batches`` are lists of keyword-argument dicts or tuples."""

    name: str
    build: Callable[[], nn.Module]  # a fresh model with the seed's weights
    batches: list[Any]  # one per step, the same for every configuration of a seed
    eval_batches: list[Any]  # held out, fixed per task
    loss: Callable[[Any, Any], Tensor]  # (model, batch) -> scalar
    lr: float
    seed: int
    data: str  # what the data is, for the results file


def _call(model: Any, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(*batch)


def _lm_batches(steps: int, batch: int, length: int, seed: int) -> tuple[list[dict], list[dict]]:
    train, val = _bytes_split()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [{"input_ids": (x := _windows(train, batch, length, g)), "labels": x} for _ in range(steps)]
    gv = torch.Generator().manual_seed(12345)
    evals = [{"input_ids": (x := _windows(val, batch, length, gv)), "labels": x} for _ in range(8)]
    return batches, evals


def _seeded(fn: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fn().train()

    return build


def hf_gpt2(steps: int, seed: int, attn: str = "eager") -> Task:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=256,
        n_positions=128,
        n_embd=128,
        n_layer=2,
        n_head=4,
        attn_implementation=attn,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    batches, evals = _lm_batches(steps, 8, 128, seed)
    return Task(
        name="hf-gpt2" if attn == "eager" else f"hf-gpt2-{attn}",
        build=_seeded(lambda: GPT2LMHeadModel(cfg), seed),
        batches=batches,
        eval_batches=evals,
        loss=lambda m, b: _call(m, b).loss,
        lr=3e-3,
        seed=seed,
        data="stdlib bytes, 8 x 128 tokens, labels=input_ids",
    )


def hf_llama(steps: int, seed: int) -> Task:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )
    batches, evals = _lm_batches(steps, 8, 128, seed)
    return Task(
        name="hf-llama",
        build=_seeded(lambda: LlamaForCausalLM(cfg), seed),
        batches=batches,
        eval_batches=evals,
        loss=lambda m, b: _call(m, b).loss,
        lr=3e-3,
        seed=seed,
        data="stdlib bytes, 8 x 128 tokens, labels=input_ids",
    )


_MASK_ID = 256


def _mlm(x: Tensor, g: torch.Generator) -> dict[str, Tensor]:
    """BERT's masking: 15% of positions are predicted; of those 80% become [MASK], 10% a random byte, 10% stay."""
    pick = torch.rand(x.shape, generator=g) < 0.15
    labels = torch.where(pick, x, torch.full_like(x, -100))
    r = torch.rand(x.shape, generator=g)
    ids = torch.where(pick & (r < 0.8), torch.full_like(x, _MASK_ID), x)
    rand = torch.randint(256, x.shape, generator=g)
    ids = torch.where(pick & (r >= 0.8) & (r < 0.9), rand, ids)
    return {"input_ids": ids, "labels": labels}


def hf_bert(steps: int, seed: int) -> Task:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=257,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=128,
        attn_implementation="sdpa",
        pad_token_id=0,
    )
    train, val = _bytes_split()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [_mlm(_windows(train, 16, 64, g), g) for _ in range(steps)]
    gv = torch.Generator().manual_seed(12345)
    evals = [_mlm(_windows(val, 16, 64, gv), gv) for _ in range(8)]
    return Task(
        name="hf-bert",
        build=_seeded(lambda: BertForMaskedLM(cfg), seed),
        batches=batches,
        eval_batches=evals,
        loss=lambda m, b: _call(m, b).loss,
        lr=1e-3,
        seed=seed,
        data="stdlib bytes, 16 x 64 tokens, 15% masked (80/10/10), labels=-100 elsewhere",
    )


def _digit_batches(steps: int, batch: int, seed: int, key: str) -> tuple[list[Any], list[Any]]:
    x_tr, y_tr, x_te, y_te = digits()
    g = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(steps):
        i = torch.randint(len(y_tr), (batch,), generator=g)
        batches.append({key: x_tr[i], "labels": y_tr[i]})
    evals = [{key: x_te[i : i + 120], "labels": y_te[i : i + 120]} for i in range(0, len(y_te) - 119, 120)]
    return batches, evals


def hf_vit(steps: int, seed: int) -> Task:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        num_labels=10,
        attn_implementation="sdpa",
        # Set here because HF's loss sets it on the first call otherwise, and that config change recompiles.
        problem_type="single_label_classification",
    )
    batches, evals = _digit_batches(steps, 64, seed, "pixel_values")
    return Task(
        name="hf-vit",
        build=_seeded(lambda: ViTForImageClassification(cfg), seed),
        batches=batches,
        eval_batches=evals,
        loss=lambda m, b: _call(m, b).loss,
        lr=1e-3,
        seed=seed,
        data="sklearn digits, batch 64, labels=",
    )


def example_gpt(steps: int, seed: int) -> Task:
    from gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=256, block_size=64, n_embd=128, n_layer=4, n_head=4)
    train, val = _bytes_split()
    g = torch.Generator().manual_seed(seed + 1)

    def pair(data: Tensor, gen: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        tok = _windows(data, n, 65, gen)
        return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()

    batches = [pair(train, g, 16) for _ in range(steps)]
    gv = torch.Generator().manual_seed(12345)
    evals = [pair(val, gv, 32) for _ in range(8)]
    return Task(
        name="gpt",
        build=_seeded(lambda: GPT(cfg), seed),
        batches=batches,
        eval_batches=evals,
        loss=lambda m, b: _call(m, b).loss,
        lr=1e-3,
        seed=seed,
        data="stdlib bytes, 16 x 64 tokens",
    )


def example_vit(steps: int, seed: int) -> Task:
    from vit import ViT, ViTConfig

    cfg = ViTConfig(img_size=8, patch_size=2, in_chans=1, dim=64, depth=4, heads=4, num_classes=10)
    raw, evals = _digit_batches(steps, 64, seed, "x")
    return Task(
        name="vit",
        build=_seeded(lambda: ViT(cfg), seed),
        batches=[(b["x"], b["labels"]) for b in raw],
        eval_batches=[(b["x"], b["labels"]) for b in evals],
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        lr=1e-3,
        seed=seed,
        data="sklearn digits, batch 64",
    )


TASKS: dict[str, Callable[[int, int], Task]] = {
    "hf-gpt2": hf_gpt2,
    "hf-gpt2-sdpa": lambda steps, seed: hf_gpt2(steps, seed, "sdpa"),
    "hf-llama": hf_llama,
    "hf-bert": hf_bert,
    "hf-vit": hf_vit,
    "gpt": example_gpt,
    "vit": example_vit,
}
HF_TASKS = ("hf-gpt2", "hf-gpt2-sdpa", "hf-llama", "hf-bert", "hf-vit")


def task(name: str, steps: int, seed: int) -> Task:
    """Build task ``name`` with ``steps`` training batches for ``seed``."""
    if name not in TASKS:
        raise SystemExit(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name](steps, seed)


@torch.no_grad()
def evaluate(model: nn.Module, t: Task) -> float:
    """Mean loss over the task's held-out batches (eval mode: no dropout)."""
    was = model.training
    model.eval()
    losses = [float(t.loss(model, b)) for b in t.eval_batches]
    model.train(was)
    return sum(losses) / len(losses)


def machine() -> dict[str, Any]:
    """CPU, threads, versions, git commit and uncommitted changes to the pass, for results files."""
    import datetime
    import os
    import platform
    import subprocess

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    dirty = [
        line[3:] for line in git("status", "--porcelain", "--", "actpass", "csrc").splitlines() if line[:2].strip()
    ]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": git("rev-parse", "--short", "HEAD").strip(),
        "git_dirty": dirty,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
