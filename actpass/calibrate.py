"""Calibrate the planner's error model on one model: ``actpass calibrate model.py -o table.json``.

The shipped sensitivity table (``actpass/sensitivity.json``) holds, per role of saved tensor, the largest
sensitivity measured over a suite of models, both at initialisation and after 150 steps of training. It is a
conservative bound: on a given model its estimates run 1-900x above the error measured (``tools/
measure_sensitivity.py``), so a ``budget=`` or ``bits=4`` plan spends bytes where that model does not need them, and
the error a plan reports is not that model's. Calibration measures the table on the model at hand instead:

1. the model is compiled once with the probe backend (:mod:`actpass.probe`: mesa's partition and analysis, every
   saved storage routed through a switchable quantize -> dequantize), and one step's exact gradients are taken;
2. for each role present (LayerNorm inputs, q/k/v, GELU inputs, ...), each layout the planner can give it and each
   width (8, 4, 2 bits), only that role's storages are rounded and the step's global relative gradient error ``e``
   is measured: ``s = e**2 / share`` (``share``: the role's fraction of the saved activation elements), as the
   shipped table is measured, plus ``s_rebuilt`` where backward rebuilds tensors from that role's;
3. the result is the shipped table with this model's roles replaced by their measured values, so roles the model
   does not show keep the suite's numbers. ``MesaConfig(sensitivity="table.json")`` (``--sensitivity`` on the CLI)
   makes the planner use it.

Measured on the training suite (``python tools/measure_sensitivity.py --calibrated``): calibrated on one batch and
checked on another, the estimates of ``bits=``/``budget=`` plans land within 2x of the measured error where the
shipped table's are 1-900x above it. A model grows more sensitive as it trains (attention sharpens, logits spread):
a table measured at initialisation underestimates a trained model's error, so calibrate on a checkpoint close to the
one you train from.

Example:
    >>> table = calibrate(model, (x,), loss_fn=lambda out: out.square().mean())  # doctest: +SKIP
    >>> write_table(table, "model-sensitivity.json")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from actpass import planner, sensitivity
from actpass.config import MesaConfig

LAYOUTS = ("row", "channel", "head", "conv")
BITS = (8, 4, 2)

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def measure_roles(backend: Any, error: Callable[[dict[str, Any]], float], log: Log = _quiet) -> list[dict[str, Any]]:
    """Per role, layout and width: the error of rounding only that role's storages (see the module docstring).

    Args:
        backend: a :class:`actpass.probe.ProbeBackend` that has compiled the model.
        error: runs one step with the given probe specs (``actpass.probe.SPECS``) and returns its global relative
            gradient error against the exact step.
        log: progress lines.

    Returns:
        One row per measurement: ``role, layout, bits, share, error, s`` (and ``error_rebuilt, s_rebuilt`` for roles
        backward rebuilds tensors from); ``layout == "recompute"`` rows measure the role's recipes on exact sources.
        ``layout == "sqrt"``: the square-root codes softmax probabilities take (without them the table's value was
        the suite's trained worst case: 16x above this model's on HF GPT-2 at initialisation).
        A step whose gradients overflow measures as an error of ``_HUGE``.
    """
    from actpass import probe

    cfg = backend.config
    storages = [(g, f) for g in range(len(backend.facts)) for f in backend.storages(g)]
    totals = {
        g: sum(planner._numel(f) for f in facts.storages if planner._counted(f)) or 1
        for g, facts in enumerate(backend.facts)
    }
    rows = []
    for role in sorted({f.role for _g, f in storages}, key=lambda r: r.value):
        fs = [(g, f) for g, f in storages if f.role is role]
        share = sum(planner._numel(f) / totals[g] for g, f in fs)
        if share <= 0:
            continue
        # Storages mesa rebuilds from this role's in backward (recipes reading them): measured a second time with
        # those replayed on the quantized values, the error the planner charges for storing this role (s_rebuilt).
        roots = {f.root for _g, f in fs}
        rebuilt = {
            d.tensor_id: "recompute" for _g, d in storages if d.recipe is not None and set(d.recipe.sources) & roots
        }
        for kind in (*LAYOUTS, "sqrt"):
            for bits in BITS:
                specs, ok = {}, True
                for _g, f in fs:
                    if kind == "sqrt":  # square-root companded codes (softmax probabilities), where they apply
                        o = planner.sqrt_option(f, bits, cfg, 0.0)
                    else:
                        o = planner.quantized_option(f, bits, cfg, 0.0, kind=kind)
                    if o is None or o.kind != kind:
                        ok = False
                        break
                    specs[f.tensor_id] = probe.qdq_fn(f, o)
                if not ok:
                    continue
                e = _finite(error(specs))
                row = dict(role=role.value, layout=kind, bits=bits, share=share, error=e, s=e * e / share)
                msg = f"  {role.value:9s} {kind:8s} {bits}b share {share:.3f}: {e:.4%}"
                if rebuilt:
                    er = _finite(error({**specs, **rebuilt}))
                    row.update(rebuilt=len(rebuilt), error_rebuilt=er, s_rebuilt=er * er / share)
                    msg += f", {er:.4%} with {len(rebuilt)} rebuilt from it"
                rows.append(row)
                log(msg)
        recipes = {f.tensor_id: "recompute" for _g, f in fs if f.recipe is not None}
        if recipes:
            e = _finite(error(recipes))
            rows.append(dict(role=role.value, layout="recompute", bits=0, share=share, error=e, s=e * e / share))
            log(f"  {role.value:9s} recompute (sources exact): {e:.4%}")
    return rows


# Errors past this are "unusable" (a step whose gradients overflowed measures inf or nan): squared and divided by a
# share, they stay finite, so the table stays JSON and the solver still compares them.
_HUGE = 1e100


def _finite(e: float) -> float:
    return e if math.isfinite(e) and e < _HUGE else _HUGE


def aggregate_rows(rows: list[dict[str, Any]], field: str, aggregate: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{role: {layout: {bits: value}}}`` of ``field`` over the rows' tasks (rows carry ``task``; one model: none).

    Per task, the largest value over its checkpoints (a model is most sensitive once trained); then over tasks by
    ``aggregate``: ``"max"``, ``"median"``, ``"upper"`` (geometric mean of the log-mean and the max) or
    ``"geomean"``.
    """
    per_task: dict[tuple[str, str, str, str], float] = {}
    for r in rows:
        if r["layout"] == "recompute":
            continue
        key = (r.get("task", ""), r["role"], r["layout"], str(r["bits"]))
        per_task[key] = max(per_task.get(key, 0.0), max(r[field], 1e-30))
    # NOTE: a layout a task could not measure for a role (HF Llama's q/k/v include storages without heads, so only
    # "channel" ran: 2.4% at 8 bits after 150 steps) counts as that task's worst measured layout for the role. Without
    # this the per-head value came from GPT-2 alone and put Llama's post-RoPE q/k at 0.1% each (2.0% measured).
    layouts_of: dict[str, set[str]] = {}
    for _task, role, layout, _bits in per_task:
        layouts_of.setdefault(role, set()).add(layout)
    for task, role, _layout, bits in list(per_task):
        worst = max(v for (t, r, _l, b), v in per_task.items() if (t, r, b) == (task, role, bits))
        for other in layouts_of[role]:
            per_task.setdefault((task, role, other, bits), worst)
    values: dict[tuple[str, str, str], list[float]] = {}
    for (_task, role, layout, bits), v in per_task.items():
        values.setdefault((role, layout, bits), []).append(v)
    s: dict[str, dict[str, dict[str, float]]] = {}
    for (role, layout, key), vs in values.items():
        if aggregate == "max":
            v = max(vs)
        elif aggregate == "median":
            v = sorted(vs)[len(vs) // 2]
        elif aggregate == "upper":  # between the typical task and the most sensitive one
            logs = [math.log(x) for x in vs]
            v = math.sqrt(math.exp(sum(logs) / len(logs)) * max(vs))
        elif aggregate == "geomean":
            v = math.exp(sum(math.log(x) for x in vs) / len(vs))
        else:
            raise ValueError(f"actpass: unknown aggregate {aggregate!r}")
        s.setdefault(role, {}).setdefault(layout, {})[key] = v
    return s


def table_from_rows(rows: list[dict[str, Any]], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One model's measurements as a sensitivity table: ``base`` (the shipped table by default) with every role the
    rows measured replaced by its values; the roles the model lacks keep ``base``'s, and so does ``default``."""
    base = copy.deepcopy(dict(base if base is not None else sensitivity.shipped()))
    measured = aggregate_rows(rows, "s", "max")
    rebuilt = aggregate_rows([r for r in rows if "s_rebuilt" in r], "s_rebuilt", "max")
    s = base.setdefault("s", {})
    for role, by_layout in measured.items():
        old = s.get(role, {})
        # Layouts this model cannot take for the role but another code can (probs.sqrt, measured by
        # tools/probe_codes.py) stay: the measured uniform layouts do not say what they cost.
        s[role] = {**{k: v for k, v in old.items() if k not in LAYOUTS}, **by_layout}
    sr = base.setdefault("s_rebuilt", {})
    for role in measured:
        sr.pop(role, None)
    sr.update(rebuilt)
    base["calibrated_roles"] = sorted(measured)
    return base


def calibrate(
    model: torch.nn.Module,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    config: MesaConfig | None = None,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Measure the sensitivity table on ``model`` (see the module docstring) and return it.

    Args:
        model: the model, in the mode it trains in (dropout masks are drawn from one seed for every step measured).
        args, kwargs: one batch of inputs.
        loss_fn: output -> scalar loss (default: the output itself, which must then be a scalar).
        config: the policy whose partition is measured (``recompute``, ``rerun_attention``; default MesaConfig()).
        log: progress lines.

    Returns:
        The table, ready for :func:`write_table`. Raises ``ValueError`` if the model saves nothing the planner can
        store in fewer bytes, or if it has no parameter that receives a gradient.
    """
    from actpass import probe

    kwargs = dict(kwargs or {})
    loss_fn = loss_fn or (lambda out: out)
    config = config or MesaConfig()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("actpass: calibrate: the model has no trainable parameters")
    torch._dynamo.reset()
    backend = probe.ProbeBackend(config)
    compiled = torch.compile(model, backend=backend)

    def grads() -> dict[str, torch.Tensor]:
        for p in params:
            p.grad = None
        torch.manual_seed(0)  # dropout masks: the same in every step measured
        loss_fn(compiled(*args, **kwargs)).backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    probe.SPECS.clear()
    try:
        grads()  # compile (a model that changes its own config on the first call recompiles here)
        exact = grads()
        if not exact or not any(float(g.abs().max()) > 0 for g in exact.values()):
            raise ValueError("actpass: calibrate: the loss gives every parameter a zero gradient; nothing to measure")

        def error(specs: dict[str, Any]) -> float:
            return probe.step_error(specs, grads, exact)

        if not any(backend.storages(g) for g in range(len(backend.facts))):
            raise ValueError("actpass: calibrate: the model saves no tensor the planner could store in fewer bytes")
        rows = measure_roles(backend, error, log)
    finally:
        probe.SPECS.clear()
        for p in params:
            p.grad = None
        torch._dynamo.reset()
    table = table_from_rows(rows)
    table["calibrated"] = {
        "model": type(model).__name__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "config": {k: config.to_dict()[k] for k in ("recompute", "rerun_attention")},
        "rows": rows,
    }
    table["method"] = (
        "calibrated (actpass calibrate): the model's own roles measured on one batch, s = e**2 / share as in the "
        "shipped table; roles it lacks keep the shipped values"
    )
    return table


def write_table(table: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``table`` as JSON; returns the path."""
    p = Path(path)
    p.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    return p


def summary(table: Mapping[str, Any]) -> str:
    """The measured roles, one line each: share of the saved elements and the best layout's error per width."""
    rows = table.get("calibrated", {}).get("rows", [])
    lines = [f"  {'role':10s} {'share':>6s}  {'8-bit':>8s} {'4-bit':>8s} {'2-bit':>8s}"]
    for role in table.get("calibrated_roles", []):
        rs = [r for r in rows if r["role"] == role and r["layout"] != "recompute"]
        if not rs:
            continue
        best = {b: min((r["error"] for r in rs if r["bits"] == b), default=None) for b in BITS}
        cells = " ".join(f"{best[b]:8.3%}" if best[b] is not None else f"{'-':>8s}" for b in BITS)
        lines.append(f"  {role:10s} {rs[0]['share']:6.3f}  {cells}")
    return "\n".join(lines)
