"""The ``actpass inspect`` report: the backend's plans next to an independent measurement, in four formats.

A :class:`Report` holds the :class:`~actpass.plan.GraphPlan` objects the backend recorded (the same objects the
rewrite applied), the measured bytes of an Inductor baseline and of the mesa run (:mod:`actpass.measure`), and the
reconciliation of planned against measured totals. Any difference is computed and explained, never hidden.

Formats: :func:`render_table` (terminal), :func:`to_json` (schema version :data:`SCHEMA_VERSION`, documented in the
README and in :func:`to_json`), :func:`render_markdown` (pull-request comments), :func:`plot` (PNG, needs matplotlib).

Example:
    >>> report = Report.build(plans, config, measured_before=base, measured_after=mesa, model_path="m.py")
    >>> print(render_table(report))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from actpass.config import MesaConfig
from actpass.measure import SavedBytes, StorageRecord
from actpass.plan import GraphPlan, SavedTensor

SCHEMA_VERSION = 1

# Keys of one row in the JSON "tensors" lists, in order (stable for schema version 1).
TENSOR_KEYS = (
    "index",
    "name",
    "tensor_id",
    "producer",
    "module_path",
    "source",
    "shape",
    "dtype",
    "layout",
    "heads",
    "decision",
    "reason",
    "detail",
    "bits",
    "bytes_before",
    "bytes_after",
    "counted",
    "role",
    "est_error",
    "recompute",
    "recompute_from",
)


# ------------------------------------------------------------------------------------------------------ formatting


def human_bytes(n: int | None) -> str:
    """``1536 -> '1.5 KiB'``."""
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    v = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{sign}{int(v)} B" if unit == "B" else f"{sign}{v:.1f} {unit}"
        v /= 1024
    raise AssertionError("unreachable")


def exact_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,} B"


def ratio(after: int | None, before: int | None) -> float | None:
    if after is None or before is None or before == 0:
        return None
    return after / before


def ratio_text(r: float | None) -> str:
    if r is None:
        return "n/a"
    return f"{r:.3f} ({1 / r:.2f}x smaller)" if r > 0 else f"{r:.3f}"


def layout_text(t: SavedTensor) -> str:
    text = t.layout.value
    if t.heads:
        text += f" H={t.heads}"
    return text


def shape_text(shape: Iterable[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


_BITS_PREFIX = re.compile(r"^\d+-bit, ")


def producer_text(producer: str) -> str:
    """``view.default of aten.gelu.default`` -> ``view of gelu``."""
    return re.sub(r"\.default\b", "", producer.replace("aten.", ""))


def dtype_text(dtype: str) -> str:
    return dtype.removeprefix("torch.")


def decision_text(t: SavedTensor) -> str:
    return f"{t.bits}-bit" if t.quantized and t.bits else t.decision.value


# -------------------------------------------------------------------------------------------------- reconciliation


@dataclasses.dataclass(frozen=True)
class Reconciliation:
    """Planned against measured bytes for one side (``before`` = Inductor baseline, ``after`` = mesa)."""

    side: str
    planned: int
    measured: int | None
    explanation: tuple[str, ...]

    @property
    def difference(self) -> int | None:
        return None if self.measured is None else self.measured - self.planned

    @property
    def agree(self) -> bool | None:
        return None if self.measured is None else self.measured == self.planned

    def to_dict(self) -> dict[str, Any]:
        return {
            "planned": self.planned,
            "measured": self.measured,
            "difference": self.difference,
            "agree": self.agree,
            "explanation": list(self.explanation),
        }


def _describe_records(records: Sequence[StorageRecord], limit: int = 4) -> str:
    parts = [f"{shape_text(r.shape)} {dtype_text(r.dtype)} {r.nbytes:,} B" for r in records[:limit]]
    if len(records) > limit:
        parts.append(f"... {len(records) - limit} more")
    return "; ".join(parts)


def _describe_tensors(tensors: Sequence[SavedTensor], attr: str, limit: int = 4) -> str:
    parts = [f"{t.tensor_id} {getattr(t, attr):,} B" for t in tensors[:limit]]
    if len(tensors) > limit:
        parts.append(f"... {len(tensors) - limit} more")
    return "; ".join(parts)


def _reconcile_group(
    side: str, where: str, plans: Sequence[GraphPlan], records: Sequence[StorageRecord], notes: list[str]
) -> None:
    """Explain the difference inside one compiled graph (``where``) by matching saved tensors to storages by size."""
    attr = f"bytes_{side}"
    planned = sum(getattr(p, f"saved_bytes_{side}") for p in plans)
    measured = sum(r.nbytes for r in records)
    if planned == measured:
        return
    notes.append(f"{where}: measured {measured:,} B, planned {planned:,} B ({measured - planned:+,} B)")
    counted = [t for p in plans for t in p.tensors if t.counted]
    quantized = [t for t in counted if t.quantized] if side == "after" else []
    q_total = sum(t.bytes_after for t in quantized)
    pool = list(records)
    excess = 0  # storage bytes beyond the planned size, on storages matched to a planned tensor

    def take(t: SavedTensor, size: int, exact_only: bool = False) -> StorageRecord | None:
        nonlocal excess
        key = (tuple(str(d) for d in t.shape), t.dtype)
        found = None
        for k, r in enumerate(pool):
            if (tuple(str(d) for d in r.shape), r.dtype) == key:
                found = pool.pop(k)
                break
        else:
            if not exact_only:
                for k, r in enumerate(pool):
                    if size in (r.nbytes, r.tensor_nbytes):
                        found = pool.pop(k)
                        break
        if found is not None and not exact_only:
            excess += found.nbytes - size
        return found

    # Tensors of 0 bytes share another saved tensor's storage (the plan counts the storage on its first tensor).
    exact = [t for t in counted if t not in quantized and getattr(t, attr) > 0]
    unmatched = [t for t in exact if take(t, getattr(t, attr)) is None]
    copies, handed_over = [], []
    for t in (t for p in plans for t in p.tensors if not t.counted):
        r = take(t, t.bytes_before, exact_only=True)
        if r is None:
            continue
        if sum(x.nbytes for x in pool) < q_total:  # the storage is needed for the quantized codes: put it back
            pool.append(r)
            continue
        (copies if r.copy else handed_over).append(r)
    if copies:
        n = sum(r.nbytes for r in copies)
        notes.append(
            f"  {len(copies)} storage(s) ({n:,} B) are copies of parameters or inputs (same shape, dtype and values, "
            f"another storage; e.g. Inductor converts a convolution's input and weight to channels-last and saves the "
            f"copy). The plan leaves parameters and inputs out; the measurement counts the copies, which are extra "
            f"memory: {_describe_records(copies)}"
        )
    if handed_over:
        n = sum(r.nbytes for r in handed_over)
        notes.append(
            f"  {len(handed_over)} storage(s) ({n:,} B) are graph inputs that the plan leaves out as 'parameter or "
            f"input', but they are neither parameters nor model inputs: activations handed over from code before "
            f"this graph (a graph break), so the measurement counts them: {_describe_records(handed_over)}"
        )
    if quantized:
        rest = sum(r.nbytes for r in pool)
        if rest == q_total:
            pool = []
        elif rest > q_total:
            notes.append(
                f"  the {len(quantized)} quantized tensors plan {q_total:,} B of codes and statistics; the other "
                f"measured storages of this graph hold {rest:,} B ({rest - q_total:+,} B): "
                f"{_describe_records(sorted(pool, key=lambda r: -r.nbytes))}"
            )
        else:
            notes.append(
                f"  the {len(quantized)} quantized tensors plan {q_total:,} B of codes and statistics, but only "
                f"{rest:,} B of measured storage is left for them"
            )
    if pool and not quantized:
        notes.append(
            f"  {len(pool)} measured storage(s) ({sum(r.nbytes for r in pool):,} B) match no planned tensor by size: "
            f"{_describe_records(pool)}"
        )
    if unmatched:
        notes.append(
            f"  {len(unmatched)} planned tensor(s) ({sum(getattr(t, attr) for t in unmatched):,} B) match no measured "
            f"storage by size: {_describe_tensors(unmatched, attr)}"
        )
    if excess:
        notes.append(
            f"  {excess:+,} B on storages matched to planned tensors: the measurement counts whole storages (a saved "
            f"view of a larger buffer counts the buffer), the plan what each saved tensor spans"
        )
    shared = sum(p.shared_bytes for p in plans)
    if shared:
        notes.append(f"  the plan counts {shared:,} B of storage shared by several saved tensors once")


def reconcile(
    side: str, plans: Sequence[GraphPlan], measured: SavedBytes | None, plan_graphs: dict[int, int] | None = None
) -> Reconciliation:
    """Compare a planned total with a measured one and explain any difference, graph by graph.

    The planned total counts each saved tensor's bytes (``bytes_before`` or ``bytes_after``), parameters and inputs
    left out and shared storage counted once. The measurement counts the distinct storages the pack hook saw, each
    tagged with the compiled graph that was running. Per graph, saved tensors are matched to storages by size and
    what is left on either side is listed, with the causes that can be told apart: eager code between graph breaks,
    activations entering a graph as inputs, views into larger buffers, storage saved twice.

    Args:
        side: ``"before"`` (measured = the baseline compile) or ``"after"`` (measured = the mesa run).
        plans: the backend's plans.
        measured: the measurement; ``None`` if none was taken.
        plan_graphs: plan index -> compiled graph number (from the mesa measurement's ``plan_graphs``); without it
            every plan is compared with every compiled storage at once.
    """
    planned = sum(getattr(p, f"saved_bytes_{side}") for p in plans)
    if measured is None:
        return Reconciliation(side, planned, None, ("not measured (no baseline)",))
    diff = measured.total - planned
    if diff == 0:
        return Reconciliation(side, planned, measured.total, ("planned and measured agree",))
    notes: list[str] = [f"measured - planned = {diff:+,} B ({measured.total:,} B measured, {planned:,} B planned)"]
    eager = [r for r in measured.records if r.graph is None]
    if eager:
        notes.append(
            f"{len(eager)} storage(s) ({sum(r.nbytes for r in eager):,} B) were saved by code outside the compiled "
            f"graphs (eager code around graph breaks); no plan covers them: {_describe_records(eager)}"
        )
    inside = [r for r in measured.records if r.graph is not None]
    mapping = dict(plan_graphs or {})
    if mapping and all(k in mapping for k in range(len(plans))):
        graphs = sorted({*mapping.values(), *(r.graph for r in inside)})  # type: ignore[type-var]
        for g in graphs:
            group = [p for k, p in enumerate(plans) if mapping[k] == g]
            names = ", ".join(p.name for p in group)
            where = f"graph {g}" if names == f"graph {g}" else f"compiled graph {g} (plan: {names or 'none'})"
            _reconcile_group(side, where, group, [r for r in inside if r.graph == g], notes)
    else:
        _reconcile_group(side, "all compiled graphs", plans, inside, notes)
    if measured.graphs and measured.graphs != len(plans):
        notes.append(f"Dynamo compiled {measured.graphs} graph(s) and the backend recorded {len(plans)} plan(s)")
    if side == "before":
        notes.append(
            f"the baseline is a separate compilation with {measured.backend!r}; its partition can differ from the one "
            f"the mesa plan started from"
        )
    return Reconciliation(side, planned, measured.total, tuple(notes))


# ------------------------------------------------------------------------------------------------------- the report


@dataclasses.dataclass(frozen=True)
class Report:
    plans: tuple[GraphPlan, ...]
    config: MesaConfig
    measured_before: SavedBytes | None
    measured_after: SavedBytes | None
    model_path: str = ""
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    baseline_backend: str | None = "inductor"
    skips: dict[int, str] = dataclasses.field(default_factory=dict)  # graph_id -> why it was left unmodified
    versions: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def build(
        cls,
        plans: Sequence[GraphPlan],
        config: MesaConfig,
        *,
        measured_before: SavedBytes | None,
        measured_after: SavedBytes | None,
        model_path: str = "",
        model: dict[str, Any] | None = None,
        baseline_backend: str | None = "inductor",
        skips: dict[int, str] | None = None,
    ) -> Report:
        versions = {}
        try:
            from importlib.metadata import PackageNotFoundError, version

            try:
                versions["actpass"] = version("actpass")
            except PackageNotFoundError:
                versions["actpass"] = "unknown"
        except ImportError:  # pragma: no cover
            pass
        try:
            import torch

            versions["torch"] = torch.__version__
        except ImportError:  # pragma: no cover
            pass
        return cls(
            plans=tuple(plans),
            config=config,
            measured_before=measured_before,
            measured_after=measured_after,
            model_path=model_path,
            model=dict(model or {}),
            baseline_backend=baseline_backend if measured_before is not None else None,
            skips=dict(skips or {}),
            versions=versions,
        )

    @property
    def saved_bytes_before(self) -> int:
        return sum(p.saved_bytes_before for p in self.plans)

    @property
    def saved_bytes_after(self) -> int:
        return sum(p.saved_bytes_after for p in self.plans)

    @property
    def plan_graphs(self) -> dict[int, int]:
        return self.measured_after.plan_graphs if self.measured_after is not None else {}

    @property
    def measured_bytes_before(self) -> int | None:
        return None if self.measured_before is None else self.measured_before.total

    @property
    def measured_bytes_after(self) -> int | None:
        return None if self.measured_after is None else self.measured_after.total

    def reconciliation(self) -> dict[str, Reconciliation]:
        return {
            "before": reconcile("before", self.plans, self.measured_before, self.plan_graphs),
            "after": reconcile("after", self.plans, self.measured_after, self.plan_graphs),
        }

    def modules(self) -> list[dict[str, Any]]:
        """Counted bytes per module path, in first-seen order."""
        acc: dict[str, list[int]] = {}
        for p in self.plans:
            for t in p.tensors:
                if t.counted:
                    row = acc.setdefault(t.module_path, [0, 0, 0])
                    row[0] += t.bytes_before
                    row[1] += t.bytes_after
                    row[2] += 1
        return [
            {"module_path": k, "saved_bytes_before": v[0], "saved_bytes_after": v[1], "tensors": v[2]}
            for k, v in acc.items()
        ]


# ------------------------------------------------------------------------------------------------------------- JSON


def _tensor_json(t: SavedTensor) -> dict[str, Any]:
    return {
        "index": t.index,
        "name": t.name,
        "tensor_id": t.tensor_id,
        "producer": t.producer,
        "module_path": t.module_path,
        "source": t.source,
        "shape": [d if isinstance(d, int) else str(d) for d in t.shape],
        "dtype": t.dtype,
        "layout": t.layout.value,
        "heads": t.heads,
        "decision": t.decision.value,
        "reason": t.reason.value,
        "detail": t.detail,
        "bits": t.bits,
        "bytes_before": t.bytes_before,
        "bytes_after": t.bytes_after,
        "counted": t.counted,
        "role": t.role.value,
        "est_error": t.est_error,
        "recompute": list(t.recompute),
        "recompute_from": list(t.recompute_from),
    }


def to_json(report: Report) -> dict[str, Any]:
    """The report as plain data, schema version 1 (documented in the README; keys are only ever added).

    Top level: ``schema_version``, ``versions``, ``model``, ``config``, ``baseline_backend``, ``totals``,
    ``reconciliation``, ``measured``, ``graphs``, ``modules``. ``totals`` holds ``saved_bytes_before``,
    ``saved_bytes_after``, ``ratio``, ``measured_bytes_before``, ``measured_bytes_after``, ``measured_ratio``,
    ``graphs``, ``saved_tensors``, ``quantized_tensors``.
    """
    rec = report.reconciliation()
    tensors = [t for p in report.plans for t in p.tensors]
    return {
        "schema_version": SCHEMA_VERSION,
        "versions": dict(report.versions),
        "model": {"path": report.model_path, **report.model},
        "config": report.config.to_dict(),
        "baseline_backend": report.baseline_backend,
        "totals": {
            "saved_bytes_before": report.saved_bytes_before,
            "saved_bytes_after": report.saved_bytes_after,
            "ratio": ratio(report.saved_bytes_after, report.saved_bytes_before),
            "measured_bytes_before": report.measured_bytes_before,
            "measured_bytes_after": report.measured_bytes_after,
            "measured_ratio": ratio(report.measured_bytes_after, report.measured_bytes_before),
            "graphs": len(report.plans),
            "saved_tensors": len(tensors),
            "quantized_tensors": sum(1 for t in tensors if t.quantized),
        },
        "reconciliation": {side: r.to_dict() for side, r in rec.items()},
        "measured": {
            "before": report.measured_before.to_dict() if report.measured_before else None,
            "after": report.measured_after.to_dict() if report.measured_after else None,
        },
        "graphs": [
            {
                "graph_id": p.graph_id,
                "name": p.name,
                "saved_bytes_before": p.saved_bytes_before,
                "saved_bytes_after": p.saved_bytes_after,
                "shared_bytes": p.shared_bytes,
                "skipped": report.skips.get(p.graph_id),
                "tensors": [_tensor_json(t) for t in p.tensors],
            }
            for p in report.plans
        ],
        "modules": report.modules(),
    }


def render_json(report: Report) -> str:
    return json.dumps(to_json(report), indent=2) + "\n"


# ------------------------------------------------------------------------------------------------------------ table

_COLUMNS = ("#", "producer", "module", "shape", "dtype", "layout", "decision", "reason", "before", "after")


def _rows(plan: GraphPlan) -> list[tuple[str, ...]]:
    return [
        (
            str(t.index),
            producer_text(t.producer),
            t.module_path or "(top)",
            shape_text(t.shape),
            dtype_text(t.dtype),
            layout_text(t),
            decision_text(t),
            _BITS_PREFIX.sub("", t.detail) if t.quantized and t.detail else t.reason.value,
            human_bytes(t.bytes_before),
            human_bytes(t.bytes_after),
        )
        for t in plan.tensors
    ]


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return (indent + "  ".join(cells)).rstrip()

    return [fmt(header), indent + "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def _config_text(config: MesaConfig) -> str:
    d = config.to_dict()
    default = MesaConfig().to_dict()
    changed = [f"{k}={v}" for k, v in d.items() if v != default[k]]
    base = f"bits={config.bits}, stats={config.stats.value}, inner={config.inner.value}"
    extra = [c for c in changed if not c.startswith(("bits=", "stats=", "inner="))]
    return base + (", " + ", ".join(extra) if extra else "")


def _graph_title(report: Report, p: GraphPlan) -> str:
    title = (
        f"{p.name}: {len(p.tensors)} saved tensors, {len(p.quantized)} quantized, {len(p.recomputed)} recomputed, "
        f"{human_bytes(p.saved_bytes_before)} -> {human_bytes(p.saved_bytes_after)}"
    )
    if p.graph_id in report.skips:
        title += f"  [left unmodified: {report.skips[p.graph_id]}]"
    return title


def render_table(report: Report) -> str:
    """The terminal report: one table per compiled graph, then totals and the reconciliation."""
    out = [f"actpass inspect {report.model_path}  (mesa: {_config_text(report.config)})", ""]
    if not report.plans:
        out += ["no graph was compiled for training (nothing saved for backward)", ""]
    right = {0, 8, 9}
    for p in report.plans:
        out.append(_graph_title(report, p))
        out += _grid(_COLUMNS, _rows(p), right) if p.tensors else ["  (saves nothing for backward)"]
        out.append("")
    rb = ratio(report.saved_bytes_after, report.saved_bytes_before)
    rm = ratio(report.measured_bytes_after, report.measured_bytes_before)
    base = report.baseline_backend or "no baseline"
    totals = [
        ("planned", "saved_bytes_before", report.saved_bytes_before, "saved_bytes_after", report.saved_bytes_after, rb),
        (
            f"measured ({base} -> mesa)",
            "measured_bytes_before",
            report.measured_bytes_before,
            "measured_bytes_after",
            report.measured_bytes_after,
            rm,
        ),
    ]
    out.append("totals (activation bytes saved for backward; parameters and inputs left out)")
    rows = [
        (label, exact_bytes(b), human_bytes(b) if b is not None else "", exact_bytes(a), human_bytes(a), ratio_text(r))
        for label, _, b, _, a, r in totals
    ]
    out += _grid(("", "before", "", "after", "", "ratio after/before"), rows, {1, 2, 3, 4})
    out.append("")
    for side, r in report.reconciliation().items():
        head = f"{side}: " + ("agree" if r.agree else "not measured" if r.agree is None else "DIFFER")
        out.append(head)
        out += [
            f"    - {line.strip()}" if line.startswith("  ") else f"  - {line}"
            for line in r.explanation
            if r.agree is False
        ]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------------- markdown


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report) -> str:
    """A pull-request comment: totals table, reconciliation, then one collapsible table per graph."""
    rb = ratio(report.saved_bytes_after, report.saved_bytes_before)
    rm = ratio(report.measured_bytes_after, report.measured_bytes_before)
    base = report.baseline_backend or "no baseline"
    out = [
        f"### actpass inspect `{report.model_path}`",
        "",
        f"mesa config: `{_config_text(report.config)}`",
        "",
        "| activation bytes saved for backward | before | after | after/before |",
        "|---|---:|---:|---:|",
        f"| planned | {exact_bytes(report.saved_bytes_before)} ({human_bytes(report.saved_bytes_before)}) "
        f"| {exact_bytes(report.saved_bytes_after)} ({human_bytes(report.saved_bytes_after)}) "
        f"| {'n/a' if rb is None else f'{rb:.3f}'} |",
        f"| measured ({base} → mesa) | {exact_bytes(report.measured_bytes_before)} "
        f"| {exact_bytes(report.measured_bytes_after)} | {'n/a' if rm is None else f'{rm:.3f}'} |",
        "",
    ]
    for side, r in report.reconciliation().items():
        state = "agree" if r.agree else "not measured" if r.agree is None else "**differ**"
        out.append(f"- **{side}**: planned and measured {state}")
        out += [
            f"    - {_md_cell(line.strip())}" if line.startswith("  ") else f"  - {_md_cell(line)}"
            for line in r.explanation
            if r.agree is False
        ]
    out.append("")
    for p in report.plans:
        out += [f"<details><summary>{_md_cell(_graph_title(report, p))}</summary>", ""]
        if p.tensors:
            out.append("| " + " | ".join(_COLUMNS) + " |")
            out.append("|" + "|".join("---:" if i in (0, 8, 9) else "---" for i in range(len(_COLUMNS))) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in _rows(p)]
        else:
            out.append("saves nothing for backward")
        out += ["", "</details>", ""]
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------------------- plot


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def module_bars(report: Report, max_bars: int = 32) -> list[tuple[str, int, int]]:
    """(module, bytes before, bytes after) grouped by the deepest module-path prefix giving at most ``max_bars``."""
    mods = report.modules()
    depth = max((len(m["module_path"].split(".")) for m in mods), default=1)
    while True:
        acc: dict[str, list[int]] = {}
        for m in mods:
            key = ".".join(m["module_path"].split(".")[:depth]) or "(top)"
            row = acc.setdefault(key, [0, 0])
            row[0] += m["saved_bytes_before"]
            row[1] += m["saved_bytes_after"]
        if len(acc) <= max_bars or depth == 1:
            return [(k, v[0], v[1]) for k, v in acc.items()]
        depth -= 1


def plot(report: Report, path: str | os.PathLike[str]) -> None:
    """Write a PNG with bars of bytes saved before and after, per module.

    Raises:
        PlotUnavailable: matplotlib is missing (``pip install 'actpass[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("actpass: --plot needs matplotlib: pip install 'actpass[plot]'") from None
    bars = module_bars(report)
    n = max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.32 * n))
    ys = range(len(bars))
    mib = 1024 * 1024
    ax.barh([y - 0.2 for y in ys], [b[1] / mib for b in bars], height=0.4, label="before (exact)", color="#999999")
    ax.barh([y + 0.2 for y in ys], [b[2] / mib for b in bars], height=0.4, label="after (mesa)", color="#1f77b4")
    ax.set_yticks(list(ys), [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MiB saved for backward")
    rb = ratio(report.saved_bytes_after, report.saved_bytes_before)
    ax.set_title(
        f"{os.path.basename(report.model_path)}: {human_bytes(report.saved_bytes_before)} -> "
        f"{human_bytes(report.saved_bytes_after)}" + (f" (after/before {rb:.2f})" if rb is not None else "")
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)
