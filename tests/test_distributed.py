"""Multi-process training with mesa: DistributedDataParallel and FSDP2, 2 processes on gloo (CPU).

Each test spawns 2 ranks. Every rank builds the same model (same seed), takes its own batch, and runs one forward
and backward twice: compiled with ``aot_eager`` (the reference: AOTAutograd's partition, no rewrite) and with
``actpass.mesa(inner="eager")`` (the same partition, rewritten). So the only difference is the stored activations.
The parent process then checks, from what the ranks saved:

* the losses are equal (forward stays exact);
* the gradients (all-reduced by DDP, reduce-scattered by FSDP2 and gathered back here) are identical on both ranks
  and within the 8-bit bound of the reference (global L2 relative error < 1%);
* mesa planned every compiled graph, quantized tensors, and no graph fell back whole.

``torch.compile(DDP(model))`` goes through Dynamo's DDPOptimizer, which splits the graph at gradient-bucket
boundaries, so mesa sees several graphs. FSDP2's hooks are not traced (they are ``torch._dynamo.disable``d), so the
compiled regions are the computations between them.

``test_torchrun_example`` runs ``examples/ddp_train.py`` under ``torchrun`` (DDP and FSDP2) for a few steps.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _models import TinyLM, rel_err

import actpass
from actpass.backend import SkipReason

WORLD = 2
TIMEOUT_S = 80  # per test, for both ranks together: the test fails (and the ranks are killed) past it
BOUND_8BIT = 0.01

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _model() -> TinyLM:
    # dim 128, 3 blocks: 1.6 MB of parameters, so DDP with 1 MB buckets (the smallest the DDPOptimizer accepts: its
    # first bucket is 1 MB) makes 3 buckets and Dynamo splits the graph into 3.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyLM(vocab=64, dim=128, heads=4, depth=3)


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    idx = torch.randint(64, (4, 32), generator=g)
    return idx, torch.randint(64, (4, 32), generator=g)


def _wrap(model: torch.nn.Module, mode: str, backend) -> torch.nn.Module:
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return torch.compile(DDP(model, bucket_cap_mb=1), backend=backend)
    from torch.distributed.fsdp import fully_shard

    if mode == "fsdp2":  # shard each block and the root, then compile the whole model
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return torch.compile(model, backend=backend)
    if mode == "fsdp2-compile-blocks":  # the FSDP2 recipe: compile each block, then shard it
        for block in model.blocks:
            block.compile(backend=backend)
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(mode)


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        if hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor
            g = g.full_tensor()
        out[name] = g.detach().clone()
    return out


def _worker(rank: int, mode: str, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        result: dict = {}
        for name in ("reference", "mesa"):
            torch._dynamo.reset()
            model = _model()
            # max_error=inf: codes wherever they fit (the default keeps most of a model this small exact).
            backend = actpass.mesa(inner="eager", max_error=float("inf")) if name == "mesa" else "aot_eager"
            wrapped = _wrap(model, mode, backend)  # hold it through backward: DDP's reducer does the all-reduce
            loss = wrapped(*_batch(rank))
            loss.backward()
            del wrapped
            result[name] = {"loss": loss.detach(), "grads": _full_grads(model)}
            if name == "mesa":
                result["plans"] = [(p.name, len(p.tensors), len(p.quantized)) for p in backend.plans]
                result["failed"] = [s for s in backend.skips if s.reason is SkipReason.REWRITE_FAILED]
                result["sharded"] = any(hasattr(p, "full_tensor") for p in model.parameters())
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(mode: str, outdir: Path) -> list[dict]:
    """Run ``_worker`` on 2 ranks; kill them and fail past ``TIMEOUT_S``; return what each rank saved."""
    ctx = mp.start_processes(
        _worker, args=(mode, _free_port(), str(outdir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):  # raises if a rank failed
            if time.monotonic() > deadline:
                pytest.fail(f"{mode}: the ranks did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _check(results: list[dict]) -> list[float]:
    errs = []
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["mesa"]["loss"], r["reference"]["loss"], rtol=1e-5, atol=1e-6)
        g, ref = r["mesa"]["grads"], r["reference"]["grads"]
        assert g.keys() == ref.keys() and len(g) == len(dict(_model().named_parameters()))
        assert all(torch.isfinite(v).all() for v in g.values()), f"rank {rank}: non-finite gradient"
        errs.append(rel_err(g, ref))
        assert errs[-1] < BOUND_8BIT, f"rank {rank}: 8-bit gradient error {errs[-1]:.4%} against the reference"
        assert not r["failed"], f"rank {rank}: graphs fell back whole: {r['failed']}"
        assert r["plans"] and sum(q for _, _, q in r["plans"]) > 0, r["plans"]
    # Gradients were synchronised: every rank holds the same ones (DDP's all-reduce / FSDP2's reduce-scatter).
    for name, v in results[0]["mesa"]["grads"].items():
        torch.testing.assert_close(results[1]["mesa"]["grads"][name], v, rtol=0, atol=0, msg=name)
    # ... and they are synchronised, not merely equal: the ranks saw different batches (different losses).
    assert results[0]["mesa"]["loss"] != results[1]["mesa"]["loss"]
    return errs


def test_ddp_compiled_with_mesa(tmp_path: Path) -> None:
    results = _spawn("ddp", tmp_path)
    errs = _check(results)
    assert all(e > 0 for e in errs)  # activations really were stored lossily
    plans = results[0]["plans"]
    assert len(plans) >= 3, f"DDPOptimizer should split the graph at bucket boundaries: {plans}"
    assert all(q > 0 for _, _, q in plans), plans
    assert not results[0]["sharded"]


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp2-compile-blocks"])
def test_fsdp2_compiled_with_mesa(tmp_path: Path, mode: str) -> None:
    results = _spawn(mode, tmp_path)
    _check(results)
    assert results[0]["sharded"], "parameters should be FSDP2 DTensors"
    plans = results[0]["plans"]
    # The blocks' graph (or graphs) hold most saved tensors and are quantized.
    assert max(q for _, _, q in plans) >= 8, plans


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_example(fsdp: bool) -> None:
    """``torchrun --nproc_per_node=2 examples/ddp_train.py`` trains a few steps and reports what mesa quantized."""
    script = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", str(script)]
    cmd += ["--preset", "tiny_test", "--steps", "3", "--inner", "eager", "--max-error", "inf"]
    cmd += ["--fsdp"] if fsdp else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # run() kills torchrun, whose agent takes its workers down
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{'FSDP2' if fsdp else 'DDP'}, {WORLD} x cpu (gloo)" in proc.stdout, proc.stdout
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) == 3 and all(map(math.isfinite, losses)), proc.stdout
    quantized = re.search(r"(\d+)/(\d+) saved tensors quantized", proc.stdout)
    assert quantized and int(quantized[1]) > 0, proc.stdout
