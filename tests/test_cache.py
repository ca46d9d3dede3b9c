"""Warm starts through AOTAutograd's cache (actpass/cache.py), each step in a fresh process sharing one cache dir.

* The second process compiling the same model hits the cache, still records the plan, and computes the same step.
* A different config, a different version of the pass, or plain Inductor never gets mesa's entry.
* A hit whose plan file is gone compiles again and records the plan.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
opts, digest = json.loads(sys.argv[1]), sys.argv[2]
import actpass, actpass.cache
if digest:  # stands for an edited pass: another source digest
    actpass.cache.pass_digest = lambda: digest
from torch import nn
from torch._dynamo.utils import counters
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 64))
x = torch.randn(128, 64)
backend = actpass.mesa(**opts) if opts is not None else "inductor"
loss = torch.compile(model, backend=backend)(x).square().mean()
loss.backward()
out = {"hit": counters["aot_autograd"]["autograd_cache_hit"], "miss": counters["aot_autograd"]["autograd_cache_miss"],
       "grads": [p.grad.flatten()[:64].tolist() for p in model.parameters()]}
if opts is not None:
    out["plans"] = [p.to_dict() for p in backend.plans]
print("RESULT " + json.dumps(out))
"""


def _run(cache: Path, opts: dict | None, digest: str = "") -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(opts), digest],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.slow
def test_second_process_hits_the_cache_and_keeps_the_plan(tmp_path):
    cache = tmp_path / "inductor-cache"
    cold = _run(cache, {"bits": 8})
    assert cold["miss"] == 1 and cold["hit"] == 0 and cold["plans"][0]["saved_bytes_after"] > 0
    warm = _run(cache, {"bits": 8})
    assert warm["hit"] == 1 and warm["miss"] == 0
    assert warm["plans"] == cold["plans"]  # what `actpass inspect` reads, although the partitioner never ran
    assert warm["grads"] == cold["grads"]

    # Another config, another version of the pass, plain Inductor: never mesa 8-bit's entry.
    assert _run(cache, {"bits": 4})["hit"] == 0
    assert _run(cache, {"bits": 8}, digest="another-pass")["hit"] == 0
    plain = _run(cache, None)
    assert plain["hit"] == 0 and plain["grads"] != cold["grads"]

    # The cache entry without its plan file: compiled again, the plan is recorded.
    shutil.rmtree(cache / "actpass")
    again = _run(cache, {"bits": 8})
    assert again["hit"] == 1 and again["plans"] == cold["plans"] and again["grads"] == cold["grads"]
