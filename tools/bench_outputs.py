"""Should mesa quantize saved tensors that the model also returns? Peak memory of the usual training loop decides.

A compiled graph sometimes saves for backward a tensor it also returns: Hugging Face models that compute the loss
from ``labels=`` save the logits (the loss's log-softmax reads them) and return them in the ``ModelOutput``; a graph
break hands hidden states to the next graph the same way. If the caller drops the output before backward, only the
saved copy stays alive, so storing it as codes saves memory; if the caller holds the output, the exact tensor stays
alive anyway and the codes are an extra copy.

This benchmark measures the peak memory of one training step (forward + backward, after warm-up) with
``actpass.measure.peak_bytes`` (CPU: the profiler's allocation events; CUDA: the allocator's peak), for:

* models: Hugging Face GPT-2 (vocab 50257, the real one) and Llama (vocab 32000), 2 small layers, 4 x 128 tokens;
* loops: ``usual`` (``loss = model(input_ids=x, labels=x).loss; loss.backward()``, the output dropped) and ``held``
  (``out = model(...); out.loss.backward()`` with ``out`` alive);
* backends: inductor, mesa with ``quantize_outputs=False`` and ``True``;
* and Llama with ``use_cache=True`` left on in training (the KV cache is returned and kept).

Usage::

    python tools/bench_outputs.py          # tools/results/outputs-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402

import actpass  # noqa: E402
from actpass.measure import peak_bytes  # noqa: E402


def build(name: str, use_cache: bool = False) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "gpt2":
        cfg = GPT2Config(vocab_size=50257, n_positions=128, n_embd=128, n_layer=2, n_head=4, use_cache=use_cache)
        return GPT2LMHeadModel(cfg).train()
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=use_cache,
    )
    return LlamaForCausalLM(cfg).train()


def measure(name: str, backend: str, loop: str, use_cache: bool = False, **options: Any) -> int:
    torch._dynamo.reset()
    model = build(name, use_cache)
    be = backend if backend == "inductor" else actpass.mesa(**options)
    compiled = torch.compile(model, backend=be)
    x = torch.randint(0, 1000, (4, 128), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        out = compiled(input_ids=x, labels=x)
        loss = out.loss
        if loop == "usual":
            del out
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    step()
    return peak_bytes(step)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=suite.ROOT / "tools" / "results" / "outputs-cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in ("gpt2", "llama"):
        for loop in ("usual", "held"):
            base = measure(name, "inductor", loop)
            for q in (False, True):
                peak = measure(name, "mesa", loop, quantize_outputs=q)
                rows.append(dict(model=name, loop=loop, quantize_outputs=q, peak=peak, inductor_peak=base))
                print(
                    f"{name:6s} {loop:6s} quantize_outputs={q!s:5s}: peak {peak / 2**20:7.1f} MiB "
                    f"(inductor {base / 2**20:7.1f} MiB)",
                    flush=True,
                )
    for use_cache in (False, True):
        peak = measure("llama", "mesa", "held", use_cache=use_cache)
        rows.append(dict(model="llama", loop="held", use_cache=use_cache, peak=peak))
        print(f"llama  held   use_cache={use_cache!s:5s}: peak {peak / 2**20:7.1f} MiB", flush=True)
    result = {"command": "python tools/bench_outputs.py", "machine": suite.machine(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
