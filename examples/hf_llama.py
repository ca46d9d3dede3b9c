"""A Hugging Face ``LlamaForCausalLM`` with random weights, as a model file for ``actpass inspect``.

The model is built from a small ``LlamaConfig`` (nothing is downloaded): RMSNorm, rotary position embeddings,
grouped-query attention (``num_key_value_heads < num_attention_heads``) and a SwiGLU MLP, with
``attn_implementation="sdpa"`` by default or ``"eager"``. The KV cache is off, as in training.

Interface: :class:`PositionalLlamaForCausalLM` is ``LlamaForCausalLM`` with a positional forward,
``forward(input_ids, labels=None) -> CausalLMOutputWithPast``, because ``example_inputs`` is a tuple; its module
names are the same as ``LlamaForCausalLM``'s (``model.layers.0.self_attn.q_proj``, ..., ``lm_head``). Following
the Hugging Face convention, ``labels`` is ``input_ids`` itself and the model shifts it to score each next token.

Model-file contract:

* ``model()`` builds the ``"cpu"`` preset (hidden 256, 4 layers, 8 query heads sharing 2 KV heads, vocab 4096)
  with SDPA attention;
* ``example_inputs()`` is ``(input_ids, labels)``, each ``(4, 128)`` int64, fixed random tokens, ``labels`` equal
  to ``input_ids``;
* ``loss(output)`` is ``output.loss``.

Run ``python examples/hf_llama.py --help`` for the training demo.
"""

import dataclasses
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

try:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:
    raise ImportError("examples/hf_llama.py needs Hugging Face transformers: pip install transformers") from e

Attn = Literal["sdpa", "eager"]

BATCH = 4  # batch size of `example_inputs`


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model size and the sequence length of its inputs."""

    seq_len: int  # tokens per sequence in make_inputs
    config: dict[str, Any]  # LlamaConfig keyword arguments


PRESETS: dict[str, Preset] = {
    # Seconds-fast on CPU, for unit tests.
    "tiny_test": Preset(
        32,
        dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
    ),
    # Small but realistic shapes (head_dim 32, 4 query heads per KV head); what the module-level `model` builds.
    "cpu": Preset(
        128,
        dict(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=512,
        ),
    ),
    # The shapes of Llama-3.2-1B (1.2B parameters; its llama3 RoPE scaling left out), for GPUs.
    "llama_1b": Preset(
        2048,
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        ),
    ),
}


class PositionalLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` called with positional ``(input_ids, labels)``, without a KV cache."""

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> CausalLMOutputWithPast:  # type: ignore[override]
        """Args: ``(B, T)`` int64 ids; ``(B, T)`` int64 labels (usually ``input_ids``; -100 = ignored) or ``None``.
        Returns: ``CausalLMOutputWithPast`` with ``logits`` ``(B, T, vocab)`` and the next-token ``loss``."""
        return super().forward(input_ids=input_ids, labels=labels, use_cache=False)


def build_model(preset: str = "cpu", attn: Attn = "sdpa", seed: int = 0) -> PositionalLlamaForCausalLM:
    """A :class:`PositionalLlamaForCausalLM` with weights drawn from ``seed``, leaving the global RNG as it was.

    Args:
        preset: a name in :data:`PRESETS`.
        attn: ``"sdpa"`` or ``"eager"`` (``attn_implementation``).
        seed: seed of the random weights.

    Returns:
        The model on CPU, in float32, in training mode.

    Example:
        >>> m = build_model("tiny_test", attn="eager")
        >>> m.config._attn_implementation, m.config.num_key_value_heads < m.config.num_attention_heads
        ('eager', True)
    """
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"attn must be 'sdpa' or 'eager', got {attn!r}")
    config = LlamaConfig(**PRESETS[preset].config, attn_implementation=attn, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PositionalLlamaForCausalLM(config).train()


def make_inputs(preset: str = "cpu", batch: int = BATCH, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(input_ids, labels)``: fixed random ``(batch, seq_len)`` tokens, twice (the model shifts ``labels``)."""
    p = PRESETS[preset]
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(p.config["vocab_size"], (batch, p.seq_len), generator=g)
    return input_ids, input_ids.clone()


# --- the model-file contract ---------------------------------------------------------------------------------------


def model() -> PositionalLlamaForCausalLM:
    """The ``"cpu"`` preset with SDPA attention."""
    return build_model("cpu")


def example_inputs() -> tuple[Tensor, Tensor]:
    """``(input_ids, labels)``, each ``(4, 128)`` int64."""
    return make_inputs("cpu", BATCH)


def loss(output: CausalLMOutputWithPast) -> Tensor:
    """The next-token cross-entropy that the model computed from ``labels``."""
    if output.loss is None:
        raise ValueError("the model was called without labels: call model(input_ids, labels)")
    return output.loss


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _train import parse_args, run

    args = parse_args(__doc__, presets=PRESETS, default_preset="cpu", default_batch=BATCH)
    run(build_model(args.preset, attn=args.attn), make_inputs(args.preset, args.batch), loss, args)
