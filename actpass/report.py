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
import textwrap
from collections.abc import Callable, Iterable, Sequence
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
    "input_name",
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


def producer_text(producer: str) -> str:
    """``view.default of aten.gelu.default`` -> ``view of gelu``."""
    return re.sub(r"\.default\b", "", producer.replace("aten.", ""))


def dtype_text(dtype: str) -> str:
    return dtype.removeprefix("torch.")


# -------------------------------------------------------------------------------------------------- reconciliation


@dataclasses.dataclass(frozen=True)
class Reconciliation:
    """Planned against measured bytes for one side (``before`` = Inductor baseline, ``after`` = mesa).

    ``causes`` are the parts of the difference that have a known cause, in bytes (signed, measured - planned);
    ``unexplained`` counts the bytes left over: storages that match no planned tensor, planned tensors that match
    no storage, quantized codes that do not add up. When it is 0 and the causes sum to the difference, every byte
    is accounted for and the state is ``explained``.
    """

    side: str
    planned: int
    measured: int | None
    explanation: tuple[str, ...]
    causes: tuple[tuple[str, int], ...] = ()
    unexplained: int = 0

    @property
    def difference(self) -> int | None:
        return None if self.measured is None else self.measured - self.planned

    @property
    def agree(self) -> bool | None:
        return None if self.measured is None else self.measured == self.planned

    @property
    def explained(self) -> bool | None:
        """True when every byte of the difference has a cause (also when there is none); None if not measured."""
        if self.measured is None:
            return None
        return self.unexplained == 0 and sum(b for _, b in self.causes) == self.difference

    @property
    def state(self) -> str:
        """``agree``, ``explained``, ``differ`` or ``not measured``."""
        if self.measured is None:
            return "not measured"
        return "agree" if self.agree else "explained" if self.explained else "differ"

    def to_dict(self) -> dict[str, Any]:
        return {
            "planned": self.planned,
            "measured": self.measured,
            "difference": self.difference,
            "agree": self.agree,
            "explanation": list(self.explanation),
            "explained": self.explained,
            "unexplained_bytes": None if self.measured is None else self.unexplained,
            "causes": [{"cause": c, "bytes": b} for c, b in self.causes],
        }


# Short names of the causes a difference can have (keys of Reconciliation.causes).
CAUSE_EAGER = "saved by eager code around graph breaks"
CAUSE_COPIES = "copies of parameters or inputs"  # e.g. Inductor's channels-last convolution input and weight
CAUSE_HANDED_OVER = "activations entering a graph as inputs"  # graph breaks
CAUSE_VIEWS = "saved views of larger buffers"  # the measurement counts whole storages
CAUSE_SHARED = "storage shared by saved tensors"  # counted once by the plan


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
    side: str,
    where: str,
    plans: Sequence[GraphPlan],
    records: Sequence[StorageRecord],
    notes: list[str],
    causes: dict[str, int],
) -> int:
    """Explain the difference inside one compiled graph (``where``) by matching saved tensors to storages by size.

    Adds the explained bytes to ``causes``; returns the unexplained bytes (sum of absolute leftovers).
    """
    attr = f"bytes_{side}"
    planned = sum(getattr(p, f"saved_bytes_{side}") for p in plans)
    measured = sum(r.nbytes for r in records)
    if planned == measured:
        return 0
    unexplained = 0
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
        causes[CAUSE_COPIES] = causes.get(CAUSE_COPIES, 0) + n
        notes.append(
            f"  {len(copies)} storage(s) ({n:,} B) are copies of parameters or inputs (same shape, dtype and values, "
            f"another storage; e.g. Inductor converts a convolution's input and weight to channels-last and saves the "
            f"copy). The plan leaves parameters and inputs out; the measurement counts the copies, which are extra "
            f"memory: {_describe_records(copies)}"
        )
    if handed_over:
        n = sum(r.nbytes for r in handed_over)
        causes[CAUSE_HANDED_OVER] = causes.get(CAUSE_HANDED_OVER, 0) + n
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
            unexplained += rest - q_total
            notes.append(
                f"  the {len(quantized)} quantized tensors plan {q_total:,} B of codes and statistics; the other "
                f"measured storages of this graph hold {rest:,} B ({rest - q_total:+,} B): "
                f"{_describe_records(sorted(pool, key=lambda r: -r.nbytes))}"
            )
        else:
            unexplained += q_total - rest
            notes.append(
                f"  the {len(quantized)} quantized tensors plan {q_total:,} B of codes and statistics, but only "
                f"{rest:,} B of measured storage is left for them"
            )
    if pool and not quantized:
        unexplained += sum(r.nbytes for r in pool)
        notes.append(
            f"  {len(pool)} measured storage(s) ({sum(r.nbytes for r in pool):,} B) match no planned tensor by size: "
            f"{_describe_records(pool)}"
        )
    if unmatched:
        unexplained += sum(getattr(t, attr) for t in unmatched)
        notes.append(
            f"  {len(unmatched)} planned tensor(s) ({sum(getattr(t, attr) for t in unmatched):,} B) match no measured "
            f"storage by size: {_describe_tensors(unmatched, attr)}"
        )
    if excess:
        causes[CAUSE_VIEWS] = causes.get(CAUSE_VIEWS, 0) + excess
        notes.append(
            f"  {excess:+,} B on storages matched to planned tensors: the measurement counts whole storages (a saved "
            f"view of a larger buffer counts the buffer), the plan what each saved tensor spans"
        )
    shared = sum(p.shared_bytes for p in plans)
    if shared:
        causes[CAUSE_SHARED] = causes.get(CAUSE_SHARED, 0) + shared
        notes.append(f"  the plan counts {shared:,} B of storage shared by several saved tensors once")
    return unexplained


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
    causes: dict[str, int] = {}
    unexplained = 0
    eager = [r for r in measured.records if r.graph is None]
    if eager:
        causes[CAUSE_EAGER] = sum(r.nbytes for r in eager)
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
            unexplained += _reconcile_group(side, where, group, [r for r in inside if r.graph == g], notes, causes)
    else:
        unexplained += _reconcile_group(side, "all compiled graphs", plans, inside, notes, causes)
    if measured.graphs and measured.graphs != len(plans):
        notes.append(f"Dynamo compiled {measured.graphs} graph(s) and the backend recorded {len(plans)} plan(s)")
    if side == "before":
        notes.append(
            f"the baseline is a separate compilation with {measured.backend!r}; its partition can differ from the one "
            f"the mesa plan started from"
        )
    return Reconciliation(side, planned, measured.total, tuple(notes), tuple(causes.items()), unexplained)


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
    timings: dict[int, tuple[float, float]] = dataclasses.field(default_factory=dict)  # graph_id -> pass seconds

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
        timings: dict[int, tuple[float, float]] | None = None,
    ) -> Report:
        """Collect the report; ``timings`` maps graph_id -> (analysis, rewrite) seconds of the pass itself."""
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
            timings=dict(timings or {}),
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

    def measured_less_copies(self) -> tuple[int, int] | None:
        """Measured bytes (before, after) less the copies of parameters or inputs found on both sides: Inductor makes
        them while lowering (a convolution's channels-last input and weight), after the plan, so neither the plan nor
        a budget counts them. None when a side has none or nothing was measured."""
        rec = self.reconciliation()
        before = dict(rec["before"].causes).get(CAUSE_COPIES, 0)
        after = dict(rec["after"].causes).get(CAUSE_COPIES, 0)
        if not (before and after) or self.measured_bytes_before is None or self.measured_bytes_after is None:
            return None
        return self.measured_bytes_before - before, self.measured_bytes_after - after

    def notes(self) -> list[str]:
        """Things the user can fix that the plan cannot: e.g. a KV cache returned while training."""
        out = []
        m = self.measured_after
        if m is not None and m.returned_cache_bytes:
            out.append(
                f"the model returns a KV cache while training (past_key_values, {human_bytes(m.returned_cache_bytes)} "
                f"kept alive while the caller holds the output): pass use_cache=False to the model or set "
                f"model.config.use_cache = False"
            )
        return out

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
        "input_name": t.input_name,
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
        "notes": report.notes(),
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
                "pass_seconds": _pass_seconds(report, p.graph_id),
                "tensors": [_tensor_json(t) for t in p.tensors],
            }
            for p in report.plans
        ],
        "modules": report.modules(),
    }


def _pass_seconds(report: Report, graph_id: int) -> dict[str, float] | None:
    t = report.timings.get(graph_id)
    return None if t is None else {"analysis": round(t[0], 6), "rewrite": round(t[1], 6)}


def render_json(report: Report) -> str:
    return json.dumps(to_json(report), indent=2) + "\n"


# ------------------------------------------------------------------------------------------------------------ table

TABLE_WIDTH = 120  # the default table fits a terminal this wide (`--wide` lifts it)
_BITS_PREFIX = re.compile(r"^\d+-bit, ")  # the decision column says it already

# Short words for the table's reason column; the long text is each record's `detail` (`--verbose`, JSON).
_REASON_WORDS = {"parameter or input": "param/input", "excluded by policy": "policy"}
# The decision column: "8-bit", "8-bit sqrt" (square-root codes), "exact", "recompute".
_DECISION_WORDS = {"kept": "exact", "recomputed": "recompute"}


_SHORT_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "int64": "i64"}


def short_dtype(dtype: str) -> str:
    """``torch.float32`` -> ``f32`` (the table's dtype column; JSON keeps the full name)."""
    d = dtype_text(dtype)
    return _SHORT_DTYPES.get(d, d.replace("int", "i").replace("float", "f"))


def decision_text(t: SavedTensor) -> str:
    split = getattr(t, "split", None)
    if t.quantized and t.bits and split is not None:  # leading rows stored another way: "exact+4-bit", "8+4-bit"
        return f"{'exact' if split.bits is None else split.bits}+{t.bits}-bit"
    if t.quantized and t.bits:
        return f"{t.bits}-bit sqrt" if getattr(t, "code", "uniform") == "sqrt" else f"{t.bits}-bit"
    value = str(getattr(t.decision, "value", t.decision))
    return _DECISION_WORDS.get(value, value)


def reason_text(t: SavedTensor) -> str:
    """A few words: the groups of a quantized tensor, else why it is not quantized."""
    if t.quantized:
        if t.groups and t.groups > 0:
            return f"{t.groups} groups"
        return "per (B, head)" if t.heads else "per row"
    value = str(getattr(t.reason, "value", t.reason))
    return _REASON_WORDS.get(value, value)


def role_text(t: SavedTensor) -> str:
    role = getattr(t, "role", None)  # set by the planner, where there is one
    return "" if role is None else str(getattr(role, "value", role))


_DIGITS = re.compile(r"(?<=\.)\d+(?=[.:])|^\d+(?=[.:])")


def id_glob(tensor_id: str) -> str:
    """The id with its module-path indices as ``*``: ``blocks.3.mlp.fc1:addmm#0`` -> ``blocks.*.mlp.fc1:addmm#0``.

    The op ordinal after ``#`` is kept. The result is an ``--override`` glob matching every folded row.
    """
    path, sep, op = tensor_id.partition(":")
    return _DIGITS.sub("*", path + sep) + op if sep else tensor_id


@dataclasses.dataclass
class _Row:
    """One table row: a saved tensor, or several folded together (repeated blocks, or views of one storage)."""

    tensors: list[SavedTensor]
    label: str  # the id shown: the tensor id, its glob when folded, or a graph input's name with --all

    @property
    def first(self) -> SavedTensor:
        return self.tensors[0]


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column. New columns are one line in :data:`COLUMNS`."""

    title: str
    cell: Callable[[_Row, bool], str]  # (row, verbose) -> text
    right: bool = False  # right-aligned (numbers)
    wide: bool = False  # only with --wide
    shrink: bool = False  # may be cut (from the left) to fit TABLE_WIDTH
    optional: bool = False  # left out when empty in every row


def _bytes_cell(attr: str) -> Callable[[_Row, bool], str]:
    return lambda r, v: human_bytes(sum(getattr(t, attr) for t in r.tensors))


COLUMNS: tuple[Column, ...] = (
    Column(
        "#",
        lambda r, v: ",".join(str(t.index) for t in r.tensors[:3]) + ("..." if len(r.tensors) > 3 else ""),
        right=True,
        wide=True,
    ),
    Column("tensor id", lambda r, v: r.label, shrink=True),
    Column("n", lambda r, v: f"x{len(r.tensors)}" if len(r.tensors) > 1 else "", right=True, optional=True),
    Column("role", lambda r, v: role_text(r.first), optional=True),
    Column("producer", lambda r, v: producer_text(r.first.producer), wide=True),
    Column("module", lambda r, v: r.first.module_path or "(top)", wide=True),
    Column("shape", lambda r, v: shape_text(r.first.shape)),
    Column("dtype", lambda r, v: short_dtype(r.first.dtype), optional=True),
    Column("layout", lambda r, v: layout_text(r.first) if r.first.quantized else ""),
    Column("decision", lambda r, v: decision_text(r.first)),
    Column(
        "reason", lambda r, v: _BITS_PREFIX.sub("", r.first.detail) if v and r.first.detail else reason_text(r.first)
    ),
    Column("before", _bytes_cell("bytes_before"), right=True),
    Column("after", _bytes_cell("bytes_after"), right=True),
    Column("source", lambda r, v: r.first.source, wide=True),
)


def _rows(plan: GraphPlan, *, all_rows: bool) -> tuple[list[_Row], list[SavedTensor], list[SavedTensor]]:
    """Table rows of a graph, and the graph inputs and extra views left out of them (both empty with ``all_rows``).

    By default parameters and inputs are left out (summed on one line), a storage saved through several views shows
    once, and rows that differ only in their module-path indices (repeated blocks) fold into one row whose id is a
    glob and whose bytes are totals.
    """
    if all_rows:
        return [_Row([t], t.input_name or t.tensor_id) for t in plan.tensors], [], []
    inputs = [t for t in plan.tensors if not t.counted]
    seen: set[str] = set()
    views, storages = [], []
    for t in plan.tensors:
        if not t.counted:
            continue
        if t.tensor_id in seen:
            views.append(t)  # a further view of a storage listed already (counted there)
            continue
        seen.add(t.tensor_id)
        storages.append(t)
    folded: dict[tuple, _Row] = {}
    for t in storages:
        key = (
            id_glob(t.tensor_id),
            t.shape,
            t.dtype,
            layout_text(t),
            decision_text(t),
            reason_text(t),
            role_text(t),
            t.bytes_before,
            t.bytes_after,
        )
        row = folded.get(key)
        if row is None:
            folded[key] = _Row([t], t.tensor_id)
        else:
            row.tensors.append(t)
            row.label = key[0]
    return list(folded.values()), inputs, views


def _columns(rows: Sequence[_Row], *, wide: bool, verbose: bool, uniform_dtype: bool) -> list[Column]:
    cols = []
    for c in COLUMNS:
        if c.wide and not wide:
            continue
        if c.title == "dtype" and uniform_dtype and not wide:
            continue  # said once in the graph's title
        if c.optional and not any(c.cell(r, verbose) for r in rows):
            continue
        cols.append(c)
    return cols


def _cut(text: str, width: int) -> str:
    """Cut ``text`` to ``width`` characters from the left, at a dot if one fits: the end of an id (leaf module and
    op) tells rows apart; ``bert.encoder.layer.*.attention.output.LayerNorm:mul#0`` -> ``~.output.LayerNorm:mul#0``.
    """
    if len(text) <= width:
        return text
    tail = text[len(text) - (width - 1) :]
    dot = tail.find(".")
    return "~" + (tail[dot:] if 0 <= dot < len(tail) - 1 else tail)


def _grid(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: set[int],
    indent: str = "  ",
    *,
    width: int | None = None,
    shrink: Sequence[int] = (),
) -> list[str]:
    """Aligned columns; with ``width``, the ``shrink`` columns are cut (from the left) until lines fit it."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    if width is not None:
        over = len(indent) + sum(widths) + 2 * (len(widths) - 1) - width
        for i in shrink:
            if over <= 0:
                break
            cut = min(over, widths[i] - max(len(header[i]), 12))
            if cut > 0:
                widths[i] -= cut
                over -= cut

    def fmt(row: Sequence[str]) -> str:
        cells = [
            _cut(c, w).rjust(w) if i in right else _cut(c, w).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return (indent + "  ".join(cells)).rstrip()

    return [fmt(header), indent + "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def _config_text(config: MesaConfig) -> str:
    d = config.to_dict()
    default = MesaConfig().to_dict()
    changed = [f"{k}={v}" for k, v in d.items() if v != default[k]]
    base = f"bits={config.bits}, stats={config.stats.value}, inner={config.inner.value}"
    extra = [c for c in changed if not c.startswith(("bits=", "stats=", "inner="))]
    return base + (", " + ", ".join(extra) if extra else "")


def _graph_title(report: Report, p: GraphPlan, *, verbose: bool = False) -> str:
    title = (
        f"{p.name}: {len(p.tensors)} saved tensors, {len(p.quantized)} quantized, {len(p.recomputed)} recomputed, "
        f"{human_bytes(p.saved_bytes_before)} -> {human_bytes(p.saved_bytes_after)}"
    )
    dtypes = {t.dtype for t in p.tensors if t.counted}
    if len(dtypes) == 1:
        title += f", all {dtype_text(dtypes.pop())}"
    if p.quantized or p.recomputed:  # the error model's (the shipped table's bound, or a calibrated one's)
        title += f", est. gradient error {p.est_error:.2%}"
    if verbose and p.graph_id in report.timings:
        analysis, rewrite = report.timings[p.graph_id]
        title += f"  [pass: analysis {analysis * 1e3:.1f} ms, rewrite {rewrite * 1e3:.1f} ms]"
    if p.graph_id in report.skips:
        title += f"  [left unmodified: {report.skips[p.graph_id]}]"
    return title


def _folded_line(inputs: Sequence[SavedTensor], views: Sequence[SavedTensor]) -> str | None:
    parts = []
    if inputs:
        parts.append(
            f"{len(inputs)} parameters and inputs ({human_bytes(sum(t.bytes_before for t in inputs))}, kept: "
            f"alive anyway)"
        )
    if views:
        parts.append(f"{len(views)} more views of the storages above")
    return f"  + {' and '.join(parts)}: --all lists them" if parts else None


def _graph_table(
    report: Report, p: GraphPlan, *, all_rows: bool, wide: bool, verbose: bool, width: int | None
) -> list[str]:
    rows, inputs, views = _rows(p, all_rows=all_rows)
    out = []
    if rows:
        uniform = len({t.dtype for r in rows for t in r.tensors}) == 1
        cols = _columns(rows, wide=wide, verbose=verbose, uniform_dtype=uniform)
        cells = [[c.cell(r, verbose) for c in cols] for r in rows]
        right = {i for i, c in enumerate(cols) if c.right}
        shrink = [i for i, c in enumerate(cols) if c.shrink]
        out += _grid([c.title for c in cols], cells, right, width=width, shrink=shrink)
    folded = _folded_line(inputs, views)
    if folded:
        out.append(folded)
    return out or ["  (saves nothing for backward)"]


def _reconciliation_lines(report: Report, *, verbose: bool) -> list[str]:
    out = []
    base = report.baseline_backend or "no baseline"
    for side, r in report.reconciliation().items():
        head = f"{side} ({base if side == 'before' else 'mesa'}): "
        if r.state == "explained":
            causes = ", ".join(f"{c} {b:+,} B" for c, b in r.causes if b)
            head += f"explained ({causes})"
        elif r.state == "differ":
            head += f"DIFFER by {r.difference:+,} B, {r.unexplained:,} B unexplained"
        else:
            head += r.state
        out.append(head)
        if r.state == "differ" or (verbose and r.state == "explained"):
            out += [f"    - {line.strip()}" if line.startswith("  ") else f"  - {line}" for line in r.explanation]
    return out


def _wrap(lines: Sequence[str], width: int | None) -> list[str]:
    """Wrap prose lines longer than ``width`` (tables are fitted, not wrapped), indenting the continuation."""
    if width is None:
        return list(lines)
    out = []
    for line in lines:
        if len(line) <= width:
            out.append(line)
            continue
        indent = " " * (len(line) - len(line.lstrip(" -")) + 2)
        out += textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False)
    return out


def render_table(
    report: Report,
    *,
    all_rows: bool = False,
    wide: bool = False,
    verbose: bool = False,
    width: int = TABLE_WIDTH,
) -> str:
    """The terminal report: one table per compiled graph, then totals and the reconciliation.

    Args:
        report: the report.
        all_rows: one row per saved tensor: parameters and inputs (by name), every view, no folding.
        wide: every column (index, producer, module, source), no width limit.
        verbose: the long reason text, the pass's own time per graph, the whole reconciliation.
        width: the most characters per line unless ``wide`` or ``verbose`` (ids are cut from the left to fit).

    Returns:
        The text, ending with a newline.
    """
    limit = None if wide or verbose else width
    out = [f"actpass inspect {report.model_path}  (mesa: {_config_text(report.config)})", ""]
    if not report.plans:
        out += ["no graph was compiled for training (nothing saved for backward)", ""]
    for p in report.plans:
        out.append(_graph_title(report, p, verbose=verbose))
        out += _graph_table(report, p, all_rows=all_rows, wide=wide, verbose=verbose, width=limit)
        out.append("")
    rb = ratio(report.saved_bytes_after, report.saved_bytes_before)
    rm = ratio(report.measured_bytes_after, report.measured_bytes_before)
    base = report.baseline_backend or "no baseline"
    totals = [
        ("planned", report.saved_bytes_before, report.saved_bytes_after, rb),
        (f"measured ({base} -> mesa)", report.measured_bytes_before, report.measured_bytes_after, rm),
    ]
    less = report.measured_less_copies()
    if less is not None:  # what the plan (and a budget) covers, measured: comparable with the planned row
        totals.append(("measured, less param/input copies", *less, ratio(less[1], less[0])))
    out.append("totals (activation bytes saved for backward; parameters and inputs left out)")
    rows = [
        (label, exact_bytes(b), human_bytes(b) if b is not None else "", exact_bytes(a), human_bytes(a), ratio_text(r))
        for label, b, a, r in totals
    ]
    out += _grid(("", "before", "", "after", "", "ratio after/before"), rows, {1, 2, 3, 4})
    out.append("")
    out += _reconciliation_lines(report, verbose=verbose)
    out += [f"note: {n}" for n in report.notes()]
    if not verbose:
        out.append(
            "(--verbose: the long reasons, the pass's own time and the reconciliation in full; --all: every row)"
        )
    return "\n".join(_wrap(out, limit)).rstrip() + "\n"


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
    ]
    less = report.measured_less_copies()
    if less is not None:
        rc = ratio(less[1], less[0])
        out.append(
            f"| measured, less copies of parameters or inputs | {exact_bytes(less[0])} | {exact_bytes(less[1])} "
            f"| {'n/a' if rc is None else f'{rc:.3f}'} |"
        )
    out.append("")
    for side, r in report.reconciliation().items():
        state = {"differ": "**differ**"}.get(r.state, r.state)
        out.append(f"- **{side}**: planned and measured {state}")
        if r.state == "explained":
            out += [f"  - {b:+,} B {_md_cell(c)}" for c, b in r.causes if b]
        out += [
            f"    - {_md_cell(line.strip())}" if line.startswith("  ") else f"  - {_md_cell(line)}"
            for line in r.explanation
            if r.state == "differ"
        ]
    out.append("")
    for p in report.plans:
        out += [f"<details><summary>{_md_cell(_graph_title(report, p))}</summary>", ""]
        rows, inputs, views = _rows(p, all_rows=False)
        if rows:
            cols = _columns(rows, wide=False, verbose=False, uniform_dtype=False)
            out.append("| " + " | ".join(c.title for c in cols) + " |")
            out.append("|" + "|".join("---:" if c.right else "---" for c in cols) + "|")
            out += ["| " + " | ".join(_md_cell(c.cell(r, False)) for c in cols) + " |" for r in rows]
        folded = _folded_line(inputs, views)
        if folded:
            out += ["", folded.strip().replace(": --all lists them", " (`actpass inspect --all` lists them)")]
        if not rows and not folded:
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
