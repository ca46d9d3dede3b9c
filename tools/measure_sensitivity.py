"""Measure the planner's per-role sensitivities and check its error model; writes ``actpass/sensitivity.json``.

For each task of the training suite (``tools/suite.py``), the model is compiled once with the probe backend
(``actpass/probe.py``: mesa's partition and analysis; every saved storage routed through a runtime-switchable
quantize -> dequantize), and one training step's gradients are compared with the exact step's:

1. **Per role, layout and bit width**: only the storages of one role are quantized (``b`` = 8, 4, 2 bits, with each
   layout the planner can give them: per row, per channel, per head), everything else exact. With ``e`` the global
   relative gradient error and ``share`` the role's fraction of the graph's saved activation elements, the
   sensitivity is ``s = e**2 / share`` (see ``actpass/sensitivity.py``). The shipped table keeps, per role, layout
   and width, the largest ``s`` over the tasks, and per role the layout that measured best.
2. **The model, checked**: plans made with the new table (``bits=8/4/2`` and budgets of 25%, 15%, 10% of the
   baseline's bytes) are simulated through the probe and the measured error is put next to the planner's estimate.

Usage::

    python tools/measure_sensitivity.py                   # every task; writes actpass/sensitivity.json
    python tools/measure_sensitivity.py --tasks hf-gpt2 vit --no-write
    python tools/measure_sensitivity.py --tasks hf-llama --train-steps 150 --check-only --ablate '{"bits": 8}' \
        --out /tmp/ablate.json                            # which storages make a plan's error, per role
    python tools/measure_sensitivity.py --calibrated --out tools/results/sensitivity-calibrated-cpu.json
                                                          # actpass calibrate's tables, checked on held-out batches

Results: ``tools/results/sensitivity-cpu.json`` (every measurement, the command, machine and commit).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402

import actpass  # noqa: E402
from actpass import calibrate, planner, sensitivity  # noqa: E402
from actpass import probe as _probe  # noqa: E402
from actpass.backend import graph_budget  # noqa: E402
from actpass.plan import Decision  # noqa: E402

RESULTS = suite.ROOT / "tools" / "results"
BITS = calibrate.BITS


class Probe:
    """One task compiled once with the probe backend; :meth:`error` runs a step under a spec and compares."""

    def __init__(self, name: str, seed: int = 0, autocast: bool = False, train_steps: int = 0) -> None:
        torch._dynamo.reset()
        # One batch past the measured one: a held-out batch of the same shape (no recompile), for --calibrated. The
        # suite draws batches in sequence, so the first ones do not change with the count.
        self.task = suite.task(name, train_steps + 2, seed)
        self.held_out = self.task.batches[train_steps + 1]
        self.model = self.task.build()
        self.init = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.batch = self.task.batches[0]
        self.backend = _probe.ProbeBackend(actpass.MesaConfig())
        self.compiled = torch.compile(self.model, backend=self.backend)
        self.autocast = autocast
        _probe.SPECS.clear()
        self.grads()  # compile, and let a model that changes its own config on the first call recompile now
        if train_steps:
            # Exact training first: quantization error grows as a model trains (logits spread, attention sharpens).
            opt = torch.optim.AdamW(self.model.parameters(), lr=self.task.lr, weight_decay=0.01)
            torch.manual_seed(seed)
            for b in self.task.batches[:train_steps]:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = self.task.loss(self.compiled, b)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            self.init = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.batch = self.task.batches[train_steps]
        self.exact = self.grads()

    def use_batch(self, batch) -> None:
        """Measure on ``batch`` from now on (exact gradients retaken)."""
        self.batch = batch
        self.exact = self.grads()

    def grads(self) -> dict[str, torch.Tensor]:
        self.model.load_state_dict(self.init)
        self.model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # dropout masks: the same in every run
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.task.loss(self.compiled, self.batch)
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def storages(self):
        return [(g, f) for g in range(len(self.backend.facts)) for f in self.backend.storages(g)]

    def totals(self) -> dict[int, int]:
        """Saved activation elements per compiled graph (what ``share`` divides by, as the planner does)."""
        out = {}
        for g, facts in enumerate(self.backend.facts):
            out[g] = sum(planner._numel(f) for f in facts.storages if planner._counted(f)) or 1
        return out

    def error(self, specs: dict[str, Any]) -> float:
        return _probe.step_error(specs, self.grads, self.exact)


def measure_roles(p: Probe, log) -> list[dict[str, Any]]:
    return calibrate.measure_roles(p.backend, p.error, log)


def carry_notes(table: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """``table`` with the entries ``old`` documents in its ``notes`` (``"role.layout"``: how they were measured, by
    another tool) carried over: this script does not measure them (e.g. ``probs.sqrt``, from tools/probe_codes.py).
    """
    notes = {k: v for k, v in old.get("notes", {}).items() if "." in k}
    for key in notes:
        role, layout = key.split(".", 1)
        entry = old.get("s", {}).get(role, {}).get(layout)
        if entry is not None and layout not in table["s"].get(role, {}):
            table["s"].setdefault(role, {})[layout] = entry
    if notes:
        table["notes"] = notes
    return table


def write_table(table: dict[str, Any], log) -> None:
    """Write ``table`` as actpass/sensitivity.json, keeping the entries the shipped one documents as measured
    elsewhere (:func:`carry_notes`)."""
    if sensitivity.DATA.exists():
        table = carry_notes(table, json.loads(sensitivity.DATA.read_text()))
    sensitivity.DATA.write_text(json.dumps(table, indent=1) + "\n")
    sensitivity.shipped.cache_clear()
    log(f"wrote {sensitivity.DATA}")


def build_table(rows: list[dict[str, Any]], tasks: list[str], aggregate: str = "geomean") -> dict[str, Any]:
    s = calibrate.aggregate_rows(rows, "s", aggregate)
    # The default for roles a model shows that the suite did not have: the largest value of any role.
    default = {
        str(b): max((v[str(b)] for lay in s.values() for v in lay.values() if str(b) in v), default=1.0) for b in BITS
    }
    return {
        "method": "s = e**2 / share, e = one-step global relative gradient error with only that role quantized "
        f"(probe backend, fp32), share = the role's fraction of the graph's saved activation elements; {aggregate} "
        "over tasks. s_rebuilt: the same with the storages mesa rebuilds from that role's in backward (recipes "
        "reading them) replayed on the quantized values, for roles that have such storages",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix().split("/work/main/")[-1], *sys.argv[1:]]),
        "tasks": tasks,
        "machine": suite.machine(),
        "default": default,
        "s": s,
        "s_rebuilt": calibrate.aggregate_rows([r for r in rows if "s_rebuilt" in r], "s_rebuilt", aggregate),
    }


def plan_specs(p: Probe, config: actpass.MesaConfig) -> tuple[dict[str, Any], list, dict[str, list[str]]]:
    """The plans mesa makes for ``p``'s graphs under ``config``, as probe specs: every storage recomputed or
    quantized -> dequantized as mesa stores it (uniform or square-root codes, split rows). Also the plans, and the
    quantized tensor ids by ``"<role>@<bits>"``.

    Raises:
        planner.BudgetError: a budget the graphs cannot meet.
    """
    specs: dict[str, Any] = {}
    plans: list = []
    roles: dict[str, list[str]] = {}
    for g, facts in enumerate(p.backend.facts):
        plan = planner.plan_graph(facts, config, graph_id=g, budget_bytes=graph_budget(config, facts, plans))
        plans.append(plan)
        by_id = {f.tensor_id: f for f in facts.storages}
        for t in plan.tensors:
            if t.bytes_before == 0:
                continue
            if t.decision is Decision.RECOMPUTED:
                specs[t.tensor_id] = "recompute"
                continue
            if t.decision is not Decision.QUANTIZED:
                continue
            if t.split is not None:
                specs[t.tensor_id] = _probe.split_qdq_fn(t)  # leading rows stored another way
            else:
                opt = planner.Option(
                    t.decision,
                    t.bits,
                    t.bytes_after,
                    t.est_error,
                    t.layout,
                    t.gend,
                    t.groups,
                    t.chunk,
                    t.row_block,
                    code=t.code,  # square-root codes for probabilities, 1-bit selects
                )
                specs[t.tensor_id] = _probe.qdq_fn(by_id[t.tensor_id], opt)
            roles.setdefault(f"{t.role.value}@{t.bits}", []).append(t.tensor_id)
    return specs, plans, roles


def check_model(p: Probe, log) -> list[dict[str, Any]]:
    """Plans made with the current table, simulated: measured error next to the estimate."""
    rows = []
    policies: list[tuple[str, dict[str, Any]]] = [(f"bits={b}", {"bits": b}) for b in BITS]
    policies += [(f"budget={f}", {"budget": f}) for f in (0.25, 0.15, 0.10)]
    for label, opts in policies:
        try:
            specs, plans, _roles = plan_specs(p, actpass.MesaConfig(**opts))
        except planner.BudgetError as e:
            log(f"  {label}: {e}")
            continue
        e = p.error(specs)
        est = math.sqrt(sum(plan.est_error**2 for plan in plans))
        before = sum(plan.saved_bytes_before for plan in plans)
        after = sum(plan.saved_bytes_after for plan in plans)
        rows.append(
            dict(
                policy=label,
                measured=e,
                estimated=est,
                ratio=est / e if e else None,
                before=before,
                after=after,
                compression=before / after if after else None,
            )
        )
        log(
            f"  {label:12s} measured {e:.4%} estimated {est:.4%} (x{est / e if e else float('nan'):.2f}); "
            f"{before / max(after, 1):.2f}x smaller"
        )
    return rows


def _cast(dtype: torch.dtype):
    return lambda x: x.to(dtype).to(x.dtype)


def ablate(p: Probe, opts: dict[str, Any], log) -> dict[str, Any]:
    """Where one plan's error comes from: the plan simulated whole, then per ``role@bits`` group of quantized
    storages its error alone, the rest's without it, and the whole plan's with that group stored as float16 or
    bfloat16 casts instead of codes."""
    specs, _plans, roles = plan_specs(p, actpass.MesaConfig(**opts))
    out: dict[str, Any] = {"options": opts, "all": p.error(specs), "groups": {}}
    log(f"  {opts}: all {out['all']:.4%}")
    for group, ids in sorted(roles.items()):
        row = {
            "storages": len(ids),
            "alone": p.error({k: v for k, v in specs.items() if k in ids}),
            "without": p.error({k: v for k, v in specs.items() if k not in ids}),
        }
        for name, dt in (("as_float16", torch.float16), ("as_bfloat16", torch.bfloat16)):
            row[name] = p.error({**specs, **{k: _cast(dt) for k in ids}})
        out["groups"][group] = row
        log(
            f"  {group:14s} x{len(ids):<3d} alone {row['alone']:.4%}  the rest {row['without']:.4%}  all with it as "
            f"float16 {row['as_float16']:.4%}, bfloat16 {row['as_bfloat16']:.4%}"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(suite.TASKS), choices=list(suite.TASKS))
    ap.add_argument("--no-write", action="store_true", help="do not rewrite actpass/sensitivity.json")
    ap.add_argument("--check-only", action="store_true", help="only check the shipped table's estimates")
    ap.add_argument("--out", type=Path, default=RESULTS / "sensitivity-cpu.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--train-steps",
        type=int,
        nargs="+",
        default=[0, 150],
        help="measure at these checkpoints of exact training (default: %(default)s)",
    )
    ap.add_argument(
        "--aggregate",
        choices=("geomean", "median", "upper", "max"),
        default="geomean",
        help="how the table combines tasks (default: %(default)s)",
    )
    ap.add_argument(
        "--ablate",
        type=json.loads,
        metavar="JSON",
        help="with --check-only: where one plan's error comes from, per role group (e.g. '{\"bits\": 4}')",
    )
    ap.add_argument(
        "--calibrated",
        action="store_true",
        help="per task and checkpoint: calibrate a table on the training batch (actpass.calibrate), then check plans "
        "made with it, and with the shipped table, on a held-out batch; writes nothing to actpass/",
    )
    ap.add_argument(
        "--table-from",
        type=Path,
        metavar="JSON",
        help="rebuild the table from a results file's measurements instead of measuring",
    )
    args = ap.parse_args(argv)
    if args.ablate is not None or args.calibrated:
        args.check_only = True  # an ablation reads the shipped table; --calibrated measures its own, per task
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict[str, Any] = {
        "command": " ".join(["python tools/measure_sensitivity.py", *(argv or sys.argv[1:])]),
        "machine": suite.machine(),
        "roles": {},
        "check": {},
    }
    probes = {}
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    if args.table_from:
        old = json.loads(args.table_from.read_text())
        results["roles"] = old["roles"]
        rows = [dict(x, task=name) for name, rs in old["roles"].items() for x in rs]
        table = build_table(rows, list(old["roles"]), args.aggregate)
        table["command"] = results["command"]
        results["table"] = table
        if not args.no_write:
            write_table(table, log)
        args.check_only = True
    for name in args.tasks:
        for steps in args.train_steps:
            log(f"{name}: compiling the probe, {steps} steps of exact training ...")
            probes[(name, steps)] = Probe(name, train_steps=steps)
            if not args.check_only:
                r = [dict(x, checkpoint=steps) for x in measure_roles(probes[(name, steps)], log)]
                results["roles"].setdefault(name, []).extend(r)
                rows += [dict(x, task=name) for x in r]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")  # partial results survive a failure
    if not args.check_only:
        table = build_table(rows, args.tasks, args.aggregate)
        results["table"] = table
        if not args.no_write:
            write_table(table, log)
    for (name, steps), p in probes.items():
        if args.calibrated:
            log(f"{name} after {steps} steps: calibrating on the training batch ...")
            table = calibrate.table_from_rows(measure_roles(p, log))
            p.use_batch(p.held_out)
            log(f"{name} after {steps} steps, held-out batch: the calibrated table")
            with sensitivity.using(table):
                cal = check_model(p, log)
            log(f"{name} after {steps} steps, held-out batch: the shipped table")
            shipped = check_model(p, log)
            results.setdefault("calibrated", {})[f"{name}@{steps}"] = {"calibrated": cal, "shipped": shipped}
            continue
        if args.ablate is not None:
            log(f"{name} after {steps} steps: where the error comes from")
            results.setdefault("ablate", {})[f"{name}@{steps}"] = ablate(p, args.ablate, log)
            continue
        log(f"{name} after {steps} steps: the error model, checked")
        results["check"][f"{name}@{steps}"] = check_model(p, log)
    results["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
