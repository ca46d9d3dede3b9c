"""Warm starts: let AOTAutograd's cache serve mesa's rewritten graphs, and keep each plan next to the cache.

A second process compiling the same model would otherwise repeat AOT tracing, the partition and the pass (Inductor's
FX-graph cache already spares it the code generation). AOTAutograd's cache key includes Inductor's config, and with
it the partitioner's ``uuid()`` (verified on torch 2.13: ``FxGraphHashDetails._custom_partitioner_fn``, which
``AOTAutogradCacheDetails`` inherits; ``tests/test_cache.py`` checks a changed uuid misses). So the uuid must change
whenever the rewrite could: :func:`partitioner_uuid` hashes

* the pass's own source (every ``actpass/*.py`` file),
* the config (``MesaConfig.to_dict()``; a calibrated sensitivity table by its contents), the running-statistics
  store name and the key prefix (both are baked into the graphs as running-statistics keys),
* what the analysis reads from the Dynamo graph that AOTAutograd's key leaves out: node metadata (module paths, which
  the include/exclude/override globs and the running-statistics keys are made of; ``GraphModule.__reduce__`` drops
  ``node.meta``, so two models with the same code but other module names share a key otherwise).

On a cache hit the partitioner does not run, so no plan would be recorded. Each plan is therefore saved on the miss
that produced it, pickled under ``<inductor cache dir>/actpass/plans/<key>.pkl``, and loaded on a hit. The key
(:func:`plan_key`) hashes the uuid, the Dynamo graph's code, the example inputs' metadata, grad/autocast state, the
torch version and the functorch/Inductor configs, so it is at least as specific as AOTAutograd's for everything the
plan depends on. A hit whose plan file is missing is compiled again with the cache off (the plan is then recorded and
saved): a plan is always reported, at worst for the price of a cold compile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch._functorch.config
import torch._inductor.config
import torch.fx as fx

from actpass import sensitivity

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent
_FORMAT = 1  # bump when the pickled payload changes shape


def _source_digest() -> str:
    h = hashlib.sha256()
    for path in sorted([*_PACKAGE.glob("*.py"), *_PACKAGE.glob("*.json")]):  # the sensitivity table too
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# Hashed when the pass is imported (backend.py imports this module), not at the first compile: a long-lived process
# that loaded the pass and then saw its sources edited on disk must not file plans made by the old code under the new
# code's key.
_PASS_DIGEST = _source_digest()


def pass_digest() -> str:
    """sha256 of every ``actpass/*.py`` source file (names and contents), as they were when the pass was imported."""
    return _PASS_DIGEST


def _meta_digest(gm: fx.GraphModule) -> str:
    from actpass.analysis import module_path, source_line

    h = hashlib.sha256()
    for node in gm.graph.nodes:
        h.update(f"{node.name}|{module_path(node)}|{source_line(node)}\n".encode())
    return h.hexdigest()


def partitioner_uuid(
    config_dict: dict[str, Any],
    store_name: str,
    key_prefix: str,
    gm: fx.GraphModule,
    input_names: Sequence[str] | None = None,
) -> str:
    """The ``CustomPartitionerFn.uuid()`` of mesa's partitioner for one Dynamo graph (see the module docstring).

    ``input_names`` says which inputs are parameters, model inputs or activations handed over by a graph break
    (``backend._input_names``): the plan stores the last kind, which AOTAutograd's key does not tell apart.
    """
    payload = json.dumps(
        {
            "format": _FORMAT,
            "pass": pass_digest(),
            "config": config_dict,
            "sensitivity": sensitivity.digest(config_dict.get("sensitivity")),  # the table's contents, not its path
            "store": store_name,
            "key_prefix": key_prefix,
            "meta": _meta_digest(gm),
            "inputs": list(input_names or []),
        },
        sort_keys=True,
        default=str,
    )
    return "actpass-" + hashlib.sha256(payload.encode()).hexdigest()


def _input_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), tuple(x.stride()), str(x.dtype), str(x.device), x.requires_grad)
    if isinstance(x, torch.SymInt | int | float | bool):
        return ("S", str(x))
    return ("O", type(x).__name__)


def plan_key(uuid: str, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> str:
    """Where the plans of one compile are kept (see the module docstring)."""
    autocast = {d: str(torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)}
    payload = repr(
        (
            uuid,
            gm.code,
            [_input_meta(x) for x in example_inputs],
            torch.is_grad_enabled(),
            sorted(autocast.items()),
            torch.__version__,
            _portable(torch._functorch.config),
            _portable(torch._inductor.config),
        )
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _portable(module: Any) -> str:
    """A config module's portable settings (the partitioner object itself left out: its repr holds an address)."""
    try:
        cfg = module.save_config_portable()
    except Exception:  # noqa: BLE001 - an unserialisable entry: key on nothing rather than fail the compile
        return ""
    return repr(sorted((k, repr(v)) for k, v in cfg.items() if k != "custom_partitioner_fn"))


def _plans_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "actpass" / "plans"


def save_plans(key: str, plans: list, skips: list) -> None:
    """Pickle the plans (and skips) one compile recorded; failures only log (the plan is a report, not the graph)."""
    try:
        d = _plans_dir()
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            pickle.dump({"format": _FORMAT, "plans": plans, "skips": skips}, f)
        os.replace(tmp, d / f"{key}.pkl")  # atomic: a concurrent reader sees the old file or the new one
    except Exception as e:  # noqa: BLE001
        log.warning("actpass: could not save the plan for a cache entry: %s", e)


def load_plans(key: str) -> tuple[list, list] | None:
    """The plans and skips saved under ``key``, or None."""
    path = _plans_dir() / f"{key}.pkl"
    try:
        with open(path, "rb") as f:
            payload = pickle.load(f)  # noqa: S301 - our own file, under Inductor's cache dir (which holds pickles too)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001
        log.warning("actpass: unreadable plan file %s: %s", path, e)
        return None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        return None
    return list(payload["plans"]), list(payload["skips"])
