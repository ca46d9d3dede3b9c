"""A timm DeiT with random weights, as a model file for ``actpass inspect``.

``timm.create_model(name, pretrained=False, **overrides)``: nothing is downloaded. Attention is timm's fused
``F.scaled_dot_product_attention`` path (``attn="sdpa"``) or its explicit softmax path (``attn="eager"``), chosen
by setting ``fused_attn`` on each attention module rather than through timm's process-wide switch.

Model-file contract:

* ``model()`` builds ``deit_small_patch16_224`` (22M parameters) with SDPA attention;
* ``example_inputs()`` is ``(images,)``: a fixed random ``(8, 3, 224, 224)`` float batch;
* ``loss(logits)`` is cross-entropy against fixed random labels (a generator seeded with :data:`LABEL_SEED`).

Run ``python examples/timm_vit.py --help`` for the training demo. Needs ``pip install timm`` (and torchvision).
"""

import dataclasses
import sys
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import timm
except ImportError as e:
    raise ImportError("examples/timm_vit.py needs timm: pip install timm") from e

Attn = Literal["sdpa", "eager"]

LABEL_SEED = 1234  # seed of the fixed labels that `loss` scores the logits against
BATCH = 8  # batch size of `example_inputs`


@dataclasses.dataclass(frozen=True)
class Preset:
    """A timm model name, keyword overrides of its architecture, and its input size."""

    name: str  # timm model name
    img_size: int  # input height and width, in pixels
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # create_model keyword arguments


PRESETS: dict[str, Preset] = {
    # Seconds-fast on CPU, for unit tests.
    "tiny_test": Preset(
        "deit_tiny_patch16_224", 32, dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    ),
    "deit_tiny": Preset("deit_tiny_patch16_224", 224),
    "deit_small": Preset("deit_small_patch16_224", 224),
}


def build_model(preset: str = "deit_small", attn: Attn = "sdpa", seed: int = 0) -> nn.Module:
    """A timm model with weights drawn from ``seed``, leaving the global RNG as it was.

    Args:
        preset: a name in :data:`PRESETS`.
        attn: ``"sdpa"`` or ``"eager"``.
        seed: seed of the random weights.

    Returns:
        The model on CPU, in float32, in training mode.
    """
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"attn must be 'sdpa' or 'eager', got {attn!r}")
    p = PRESETS[preset]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = timm.create_model(p.name, pretrained=False, **p.overrides)
    for module in m.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = attn == "sdpa"
    return m.train()


def make_inputs(preset: str = "deit_small", batch: int = BATCH, seed: int = 0) -> tuple[Tensor]:
    """``(images,)``: a fixed standard-normal ``(batch, 3, img_size, img_size)`` batch on CPU."""
    size = PRESETS[preset].img_size
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)),)


def fixed_labels(logits: Tensor) -> Tensor:
    """Labels in ``[0, num_classes)`` for each row of ``logits``, the same on every call for the same shape."""
    g = torch.Generator().manual_seed(LABEL_SEED)
    return torch.randint(logits.shape[-1], logits.shape[:1], generator=g).to(logits.device)


# --- the model-file contract ---------------------------------------------------------------------------------------


def model() -> nn.Module:
    """``deit_small_patch16_224`` with SDPA attention."""
    return build_model("deit_small")


def example_inputs() -> tuple[Tensor]:
    """``(images,)`` of shape ``(8, 3, 224, 224)``."""
    return make_inputs("deit_small", BATCH)


def loss(output: Tensor) -> Tensor:
    """Cross-entropy of the logits against :func:`fixed_labels`, in float32."""
    return F.cross_entropy(output.float(), fixed_labels(output))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _train import parse_args, run

    args = parse_args(__doc__, presets=PRESETS, default_preset="deit_small", default_batch=BATCH)
    run(build_model(args.preset, attn=args.attn), make_inputs(args.preset, args.batch), loss, args)
