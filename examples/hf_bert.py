"""A Hugging Face ``BertForMaskedLM`` with random weights, as a model file for ``actpass inspect``.

The model is built from a small ``BertConfig`` (nothing is downloaded) with ``attn_implementation="sdpa"`` by
default or ``"eager"``. BERT's dropout (0.1 on hidden states and attention probabilities) stays on, as in
pre-training, so the graphs hold dropout masks too.

Interface: :class:`PositionalBertForMaskedLM` is ``BertForMaskedLM`` with a positional forward,
``forward(input_ids, attention_mask, labels=None) -> MaskedLMOutput``, because ``example_inputs`` is a tuple; its
module names are the same as ``BertForMaskedLM``'s (``bert.encoder.layer.0.attention.self.query``, ...). The
masked-LM cross-entropy is computed inside the model from ``labels``.

Model-file contract:

* ``model()`` builds the ``"cpu"`` preset (hidden 256, 4 layers, 4 heads, vocab 8192) with SDPA attention;
* ``example_inputs()`` is ``(input_ids, attention_mask, labels)``, each ``(4, 128)`` int64: random tokens with 15%
  replaced by a mask token, every other sequence right-padded to a random length, and labels that hold the original
  token at masked positions and -100 elsewhere;
* ``loss(output)`` is ``output.loss``.

Run ``python examples/hf_bert.py --help`` for the training demo.
"""

import dataclasses
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

try:
    from transformers import BertConfig, BertForMaskedLM
    from transformers.modeling_outputs import MaskedLMOutput
except ImportError as e:
    raise ImportError("examples/hf_bert.py needs Hugging Face transformers: pip install transformers") from e

Attn = Literal["sdpa", "eager"]

BATCH = 4  # batch size of `example_inputs`
PAD_ID = 0  # BertConfig's default pad_token_id
MASK_ID = 1  # the token that replaces masked positions (BERT's real vocabulary uses 103)
FIRST_WORD_ID = 5  # random "words" are drawn from [FIRST_WORD_ID, vocab_size), clear of PAD_ID and MASK_ID
MASK_PROB = 0.15  # fraction of tokens that are masked and predicted


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model size and the sequence length of its inputs."""

    seq_len: int  # tokens per sequence in make_inputs
    config: dict[str, Any]  # BertConfig keyword arguments


PRESETS: dict[str, Preset] = {
    # Seconds-fast on CPU, for unit tests.
    "tiny_test": Preset(
        32,
        dict(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        ),
    ),
    # Small but realistic shapes; what the module-level `model` builds.
    "cpu": Preset(
        128,
        dict(
            vocab_size=8192,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=512,
        ),
    ),
    # BERT-base (110M parameters) at BERT's phase-1 pre-training length, for GPUs.
    "bert_base": Preset(
        128,
        dict(
            vocab_size=30522,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
        ),
    ),
}


class PositionalBertForMaskedLM(BertForMaskedLM):
    """``BertForMaskedLM`` called with positional ``(input_ids, attention_mask, labels)``."""

    def forward(  # type: ignore[override]
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None
    ) -> MaskedLMOutput:
        """Args: ``(B, T)`` int64 ids, ``(B, T)`` 0/1 mask (1 = real token), ``(B, T)`` int64 labels (-100 =
        ignored) or ``None``. Returns: ``MaskedLMOutput`` with ``logits`` ``(B, T, vocab)`` and ``loss``."""
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def build_model(preset: str = "cpu", attn: Attn = "sdpa", seed: int = 0) -> PositionalBertForMaskedLM:
    """A :class:`PositionalBertForMaskedLM` with weights drawn from ``seed``, leaving the global RNG as it was.

    Args:
        preset: a name in :data:`PRESETS`.
        attn: ``"sdpa"`` or ``"eager"`` (``attn_implementation``).
        seed: seed of the random weights.

    Returns:
        The model on CPU, in float32, in training mode.

    Example:
        >>> build_model("tiny_test", attn="eager").config._attn_implementation
        'eager'
    """
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"attn must be 'sdpa' or 'eager', got {attn!r}")
    config = BertConfig(**PRESETS[preset].config, attn_implementation=attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PositionalBertForMaskedLM(config).train()


def make_inputs(preset: str = "cpu", batch: int = BATCH, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, labels)`` for masked-LM training, each ``(batch, seq_len)`` int64.

    Example:
        >>> ids, mask, labels = make_inputs("tiny_test", batch=2)
        >>> ids.shape, bool(((labels != -100) <= (ids == MASK_ID)).all())
        (torch.Size([2, 32]), True)
    """
    p = PRESETS[preset]
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(FIRST_WORD_ID, p.config["vocab_size"], (batch, p.seq_len), generator=g)
    # Every other sequence is padded on the right to a length in [seq_len / 2, seq_len).
    lengths = torch.full((batch,), p.seq_len)
    lengths[1::2] = torch.randint(p.seq_len // 2, p.seq_len, (batch // 2,), generator=g)
    attention_mask = (torch.arange(p.seq_len) < lengths[:, None]).long()
    masked = (torch.rand(batch, p.seq_len, generator=g) < MASK_PROB) & attention_mask.bool()
    input_ids = torch.where(masked, MASK_ID, words).masked_fill(attention_mask == 0, PAD_ID)
    labels = torch.where(masked, words, -100)
    return input_ids, attention_mask, labels


# --- the model-file contract ---------------------------------------------------------------------------------------


def model() -> PositionalBertForMaskedLM:
    """The ``"cpu"`` preset with SDPA attention."""
    return build_model("cpu")


def example_inputs() -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, labels)``, each ``(4, 128)`` int64."""
    return make_inputs("cpu", BATCH)


def loss(output: MaskedLMOutput) -> Tensor:
    """The masked-LM cross-entropy that the model computed from ``labels``."""
    if output.loss is None:
        raise ValueError("the model was called without labels: call model(input_ids, attention_mask, labels)")
    return output.loss


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _train import parse_args, run

    args = parse_args(__doc__, presets=PRESETS, default_preset="cpu", default_batch=BATCH)
    run(build_model(args.preset, attn=args.attn), make_inputs(args.preset, args.batch), loss, args)
