"""Multi-process training with the mesa backend: DistributedDataParallel or FSDP2, launched with torchrun.

The model is :mod:`gpt`'s GPT (random weights); the data is byte-level text from the Python standard library's source,
read from this interpreter's ``Lib/`` (nothing is downloaded), and each rank trains on its own random windows of it.

* DDP: ``torch.compile(DistributedDataParallel(model), backend=mesa)``. Dynamo's DDPOptimizer splits the graph at
  gradient-bucket boundaries so communication overlaps backward; mesa rewrites each piece.
* FSDP2 (``--fsdp``): the FSDP2 recipe, each transformer block compiled with mesa and then sharded with
  ``torch.distributed.fsdp.fully_shard``, then the root. FSDP2's hooks run outside the compiled regions.

The process group is ``nccl`` on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``) and ``gloo`` on CPU. Run without
torchrun, the script starts a single-process group itself (a one-GPU smoke test).

Examples::

    torchrun --nproc_per_node=2 examples/ddp_train.py --backend mesa                 # 2 CPU processes, gloo
    torchrun --nproc_per_node=2 examples/ddp_train.py --backend mesa --fsdp
    torchrun --nproc_per_node=8 examples/ddp_train.py --device cuda --preset gpt2_small --dtype bf16 --batch 8
    python examples/ddp_train.py --device cuda --steps 5                             # 1 GPU, no torchrun

Rank 0 prints each step's loss (averaged over ranks) and time, what mesa planned on rank 0 (graphs, quantized
tensors, saved-activation bytes before -> after), and on CUDA the peak memory allocated on its GPU.
"""

import argparse
import contextlib
import os
import socket
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt import PRESETS, build_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backend",
        choices=("mesa", "inductor", "eager"),
        default="mesa",
        help="mesa: torch.compile with actpass.mesa; inductor: torch.compile(); eager: no compile",
    )
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DistributedDataParallel")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda: one GPU per rank (cuda:LOCAL_RANK) with NCCL; cpu: gloo (default: %(default)s)",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="GPT size (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="training steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank and step (default: %(default)s)")
    p.add_argument("--bits", type=int, choices=(2, 4, 8), default=8, help="mesa code width (default: %(default)s)")
    p.add_argument(
        "--max-error",
        type=float,
        default=None,
        help="mesa bits=8: estimated one-step gradient error allowed per graph ('inf': codes everywhere; "
        "default: MesaConfig's)",
    )
    p.add_argument(
        "--stats", choices=("dynamic", "running"), default="dynamic", help="mesa statistics (default: %(default)s)"
    )
    p.add_argument(
        "--rounding", choices=("nearest", "stochastic"), default="nearest", help="mesa rounding (default: %(default)s)"
    )
    p.add_argument(
        "--inner",
        choices=("inductor", "eager"),
        default="inductor",
        help="compiler of mesa's rewritten graphs; eager compiles in seconds, for smoke tests (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: autocast (DDP) or bf16 parameters with fp32 gradient reduction (FSDP2)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be positive")
    return args


def init_distributed(device_type: str) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``), or start a
    one-process group when run without torchrun. Returns ``(rank, world_size, device)``."""
    if "RANK" not in os.environ:  # plain `python examples/ddp_train.py`
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        # Leave one core per rank: n ranks each using every core would oversubscribe the machine.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def make_backend(args: argparse.Namespace):
    """The ``torch.compile`` backend: a :class:`actpass.MesaBackend` object (so its plans can be read), or a name."""
    if args.backend != "mesa":
        return args.backend
    import actpass

    extra = {} if args.max_error is None else {"max_error": args.max_error}  # None: MesaConfig's default
    return actpass.mesa(bits=args.bits, stats=args.stats, rounding=args.rounding, inner=args.inner, **extra)


def wrap(model: nn.Module, args: argparse.Namespace, backend, device: torch.device) -> nn.Module:
    """DDP and compile, or the FSDP2 recipe (compile each block, shard it, shard the root)."""
    if not args.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        return ddp if backend == "eager" else torch.compile(ddp, backend=backend)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.dtype == "bf16" else None
    kw = {"mp_policy": mp} if mp is not None else {}
    for block in model.blocks:
        if backend != "eager":
            block.compile(backend=backend)
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def stdlib_text(max_bytes: int = 4 << 20) -> torch.Tensor:
    """Bytes of the Python standard library's ``*.py`` files (sorted by name, so every rank reads the same text)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)


def batches(cfg, args: argparse.Namespace, rank: int, device: torch.device):
    """Endless ``(idx, targets)`` batches of random windows of :func:`stdlib_text`, different on every rank."""
    text = stdlib_text().long() % cfg.vocab_size  # byte-level; a vocabulary under 256 folds bytes onto it
    g = torch.Generator().manual_seed(1000 + rank)
    offsets = torch.arange(cfg.block_size + 1)
    while True:
        starts = torch.randint(len(text) - cfg.block_size - 1, (args.batch, 1), generator=g)
        tokens = text[starts + offsets]
        yield tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def main(argv: list[str] | None = None) -> list[float]:
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        model = build_model(args.preset, seed=0).to(device)  # same weights on every rank
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"GPT {args.preset} ({n_params / 1e6:.2f}M parameters), {'FSDP2' if args.fsdp else 'DDP'}, "
            f"{world} x {device.type} ({dist.get_backend()}), backend={args.backend}, batch {args.batch} per rank"
        )
        backend = make_backend(args)
        step_fn = wrap(model, args, backend, device)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if args.dtype == "bf16" and not args.fsdp
            else contextlib.nullcontext()
        )
        data = batches(model.cfg, args, rank, device)
        losses: list[float] = []
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            idx, targets = next(data)
            with autocast:
                loss = step_fn(idx, targets).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = loss.detach().clone()
            dist.all_reduce(mean)  # for the log only
            losses.append(mean.item() / world)
            note = "  (includes compilation)" if step == 1 and args.backend != "eager" else ""
            log(f"step {step:4d}/{args.steps}  loss {losses[-1]:.4f}  {(time.perf_counter() - t0) * 1e3:8.1f} ms{note}")
        if args.backend == "mesa":
            plans = backend.plans
            before = sum(p.saved_bytes_before for p in plans)
            after = sum(p.saved_bytes_after for p in plans)
            quantized = sum(len(p.quantized) for p in plans)
            saved = sum(len(p.tensors) for p in plans)
            ratio = f" ({before / after:.2f}x smaller)" if after else ""
            # A graph compiled once and run for several blocks (FSDP2 recipe) is counted once.
            log(
                f"mesa on rank 0: {len(plans)} compiled graph(s), {quantized}/{saved} saved tensors quantized, "
                f"their saved activations {before / 2**20:.2f} -> {after / 2**20:.2f} MiB{ratio}"
            )
        if device.type == "cuda":
            log(f"peak CUDA memory allocated on rank 0: {torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB")
        return losses
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
