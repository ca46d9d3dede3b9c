"""The training demo shared by the example models' ``__main__`` blocks.

Not part of the model-file contract: ``actpass inspect`` never imports this file. An example imports it only under
``if __name__ == "__main__":``, after putting ``examples/`` on ``sys.path``.

Example:
    >>> args = parse_args("demo", presets={"tiny_test": None}, default_preset="tiny_test", default_batch=2,
    ...                   argv=["--backend", "eager", "--steps", "1"])
    >>> args.backend, args.steps, args.bits
    ('eager', 1, 8)
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

BACKENDS = ("eager", "inductor", "mesa")
DTYPES = ("fp32", "bf16")


def parse_args(
    description: str | None,
    presets: Mapping[str, Any],
    default_preset: str,
    default_batch: int,
    attn_choices: Sequence[str] = ("sdpa", "eager"),
    argv: Sequence[str] | None = None,
) -> argparse.Namespace:
    """The demo's command line.

    Args:
        description: shown by ``--help`` (an example passes its module docstring).
        presets: the example's presets; their names are the choices of ``--preset``.
        default_preset: the preset used without ``--preset``.
        default_batch: the batch size used without ``--batch``.
        attn_choices: choices of ``--attn``; the first is the default.
        argv: arguments to parse instead of ``sys.argv[1:]``.

    Returns:
        The namespace: backend, steps, batch, bits, device, dtype, preset, attn, lr, seed.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="mesa",
        help="mesa: torch.compile(backend='mesa'); inductor: torch.compile(); eager: no torch.compile",
    )
    p.add_argument("--steps", type=int, default=10, help="training steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=default_batch, help="batch size (default: %(default)s)")
    p.add_argument(
        "--bits",
        type=int,
        choices=(2, 4, 8),
        default=8,
        help="code width of saved activations, for --backend mesa (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="fp32, or bf16 = float32 weights under torch.autocast(dtype=torch.bfloat16)",
    )
    p.add_argument(
        "--preset", choices=sorted(presets), default=default_preset, help="model size (default: %(default)s)"
    )
    p.add_argument(
        "--attn",
        choices=tuple(attn_choices),
        default=attn_choices[0],
        help="attention implementation (default: %(default)s)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="global torch seed for the run (default: %(default)s)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error(f"--steps and --batch must be positive, got {args.steps} and {args.batch}")
    return args


def compile_model(model: nn.Module, backend: str, bits: int = 8) -> nn.Module | Callable[..., Any]:
    """Wrap ``model`` for ``backend``: ``"eager"`` returns it unchanged, the others go through ``torch.compile``.

    The mesa backend is found by name through the ``torch_dynamo_backends`` entry point that ``pip install -e .``
    registers; it receives ``options={"bits": bits}``.
    """
    if backend == "eager":
        return model
    if backend == "mesa":
        return torch.compile(model, backend="mesa", options={"bits": bits})
    if backend == "inductor":
        return torch.compile(model, backend="inductor")
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, Tensor) else x


@contextlib.contextmanager
def _autocast(device: torch.device, dtype: str) -> Iterator[None]:
    if dtype == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def run(
    model: nn.Module,
    inputs: tuple[Any, ...],
    loss_fn: Callable[[Any], Tensor],
    args: argparse.Namespace,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Train ``model`` for ``args.steps`` AdamW steps on the fixed batch ``inputs``, logging the loss of each step.

    Args:
        model: the model, on any device; it is moved to ``args.device``.
        inputs: positional inputs of ``model``; tensors are moved to ``args.device``.
        loss_fn: the example's ``loss(output) -> Tensor``.
        args: from :func:`parse_args`.
        log: where lines go.

    Returns:
        The loss of each step.
    """
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = model.to(device).train()
    inputs = tuple(_to(x, device) for x in inputs)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"{type(model).__name__} ({args.preset}, attn={args.attn}): {n_params / 1e6:.2f}M parameters; "
        f"backend={args.backend} bits={args.bits} device={device} dtype={args.dtype} batch={args.batch}"
    )
    step_fn = compile_model(model, args.backend, args.bits)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[float] = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        with _autocast(device, args.dtype):
            value = loss_fn(step_fn(*inputs))
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(value.item())  # .item() synchronises, so the time below covers the whole step
        ms = (time.perf_counter() - t0) * 1e3
        note = "  (includes compilation)" if step == 1 and args.backend != "eager" else ""
        log(f"step {step:4d}/{args.steps}  loss {losses[-1]:.4f}  {ms:9.1f} ms{note}")
    if device.type == "cuda":
        log(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB")
    return losses
