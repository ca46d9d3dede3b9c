"""Measure the planner's per-role sensitivities and check its error model; writes ``actpass/sensitivity.json``.

For each task of the training suite (``tools/suite.py``), the model is compiled once with the probe backend
(``tools/_probe.py``: mesa's partition and analysis; every saved storage routed through a runtime-switchable
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

import _probe  # noqa: E402
import suite  # noqa: E402

import actpass  # noqa: E402
from actpass import planner, sensitivity  # noqa: E402
from actpass.backend import graph_budget  # noqa: E402
from actpass.plan import Decision  # noqa: E402

RESULTS = suite.ROOT / "tools" / "results"
LAYOUTS = ("row", "channel", "head", "conv")
BITS = (8, 4, 2)


class Probe:
    """One task compiled once with the probe backend; :meth:`error` runs a step under a spec and compares."""

    def __init__(self, name: str, seed: int = 0, autocast: bool = False, train_steps: int = 0) -> None:
        torch._dynamo.reset()
        self.task = suite.task(name, train_steps + 1, seed)
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
        _probe.SPECS.clear()
        _probe.SPECS.update(specs)
        try:
            return _probe.global_rel_err(self.grads(), self.exact)
        finally:
            _probe.SPECS.clear()


def measure_roles(p: Probe, log) -> list[dict[str, Any]]:
    rows = []
    cfg = p.backend.config
    roles = sorted({f.role for _g, f in p.storages()}, key=lambda r: r.value)
    for role in roles:
        fs = [(g, f) for g, f in p.storages() if f.role is role]
        totals = p.totals()
        share = sum(planner._numel(f) / totals[g] for g, f in fs)
        # Storages mesa rebuilds from this role's in backward (recipes reading them): measured a second time with
        # those replayed on the quantized values, the error the planner charges for storing this role (s_rebuilt).
        roots = {f.root for _g, f in fs}
        rebuilt = {
            d.tensor_id: "recompute" for _g, d in p.storages() if d.recipe is not None and set(d.recipe.sources) & roots
        }
        for kind in LAYOUTS:
            for bits in BITS:
                specs, ok = {}, True
                for _g, f in fs:
                    o = planner.quantized_option(f, bits, cfg, 0.0, kind=kind)
                    if o is None or o.kind != kind:
                        ok = False
                        break
                    specs[f.tensor_id] = _probe.qdq_fn(f, o)
                if not ok:
                    continue
                e = p.error(specs)
                row = dict(role=role.value, layout=kind, bits=bits, share=share, error=e, s=e * e / share)
                msg = f"  {role.value:9s} {kind:8s} {bits}b share {share:.3f}: {e:.4%}"
                if rebuilt:
                    er = p.error({**specs, **rebuilt})
                    row.update(rebuilt=len(rebuilt), error_rebuilt=er, s_rebuilt=er * er / share)
                    msg += f", {er:.4%} with {len(rebuilt)} rebuilt from it"
                rows.append(row)
                log(msg)
        recipes = {f.tensor_id: "recompute" for _g, f in fs if f.recipe is not None}
        if recipes:
            e = p.error(recipes)
            rows.append(dict(role=role.value, layout="recompute", bits=0, share=share, error=e, s=e * e / share))
            log(f"  {role.value:9s} recompute (sources exact): {e:.4%}")
    return rows


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
    sensitivity.table.cache_clear()
    log(f"wrote {sensitivity.DATA}")


def build_table(rows: list[dict[str, Any]], tasks: list[str], aggregate: str = "geomean") -> dict[str, Any]:
    s = _aggregate(rows, "s", aggregate)
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
        "s_rebuilt": _aggregate([r for r in rows if "s_rebuilt" in r], "s_rebuilt", aggregate),
    }


def _aggregate(rows: list[dict[str, Any]], field: str, aggregate: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{role: {layout: {bits: value}}}`` of ``field`` over the rows' tasks."""
    # Per task, the largest value over its checkpoints (a model is most sensitive once trained); then over tasks.
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
            mu = sum(logs) / len(logs)
            v = math.sqrt(math.exp(mu) * max(vs))
        else:
            v = math.exp(sum(math.log(x) for x in vs) / len(vs))
        s.setdefault(role, {}).setdefault(layout, {})[key] = v
    return s


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
        "--table-from",
        type=Path,
        metavar="JSON",
        help="rebuild the table from a results file's measurements instead of measuring",
    )
    args = ap.parse_args(argv)
    if args.ablate is not None:
        args.check_only = True  # an ablation reads the shipped table, it does not measure a new one
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
