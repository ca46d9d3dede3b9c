"""The ``mesa`` torch.compile backend.

Pipeline for each graph Dynamo hands over::

    Dynamo FX graph
      -> AOTAutograd joint forward+backward graph
      -> min-cut partition (the one Inductor uses)     -> forward graph, backward graph
      -> analysis.plan_graph      (which saved tensors, what layout, what decision and why)
      -> rewrite.apply_plan       (quantize after production in forward, dequantize before first use in backward)
      -> inner compiler: Inductor (default) or the FX graphs as they are ("eager", for debugging)

Under ``torch.no_grad()``/inference mode AOTAutograd builds an inference graph, the partitioner never runs and the
graph is compiled unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import fnmatch
import functools
import inspect
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx

from actpass import cache  # hashes the pass's sources as imported (cache.pass_digest)
from actpass import ops as _ops  # noqa: F401  (registers torch.ops.actpass)
from actpass.analysis import (
    _op_short,
    gather_facts,
    module_path,
    normalize_module_path,
    op_id,
    outer_frame,
    producer_name,
    storage_root,
)
from actpass.config import Inner, MesaConfig
from actpass.plan import Decision, GraphPlan, Reason
from actpass.planner import BudgetError, plan_graph
from actpass.rewrite import apply_plan
from actpass.state import RunningStats, default_store

log = logging.getLogger(__name__)


class SkipReason(str, enum.Enum):
    """Why a compiled graph was left unmodified."""

    HIGHER_ORDER_BODY = "higher-order-op body"  # invoke_subgraph bodies: saved tensors cross the outer graph
    REWRITE_FAILED = "rewrite failed"  # the graphs broke an assumption; the unmodified partition is used
    NOTHING_SAVED = "nothing saved"


@dataclasses.dataclass(frozen=True)
class GraphSkip:
    graph_id: int
    reason: SkipReason
    detail: str


@dataclasses.dataclass(frozen=True)
class PassTiming:
    """Wall time the pass itself spent on one graph (the partition and the inner compiler are not included)."""

    graph_id: int
    analysis_seconds: float  # analysis.plan_graph
    rewrite_seconds: float  # rewrite.apply_plan (0 when nothing was quantized)


def _options_error_bases() -> tuple[type, ...]:
    try:
        from torch._dynamo.exc import ShortenTraceback
    except ImportError:  # pragma: no cover - older torch: Dynamo wraps it in BackendCompilerFailed
        return (ValueError,)
    return (ValueError, ShortenTraceback)


class OptionsError(*_options_error_bases()):  # type: ignore[misc]
    """Bad ``options=`` for ``torch.compile(model, backend="mesa", options=...)``: a ``ValueError``.

    Raised by the backend's first call, before any AOT tracing. Dynamo re-raises ``ShortenTraceback`` subclasses as
    they are, where any other exception from a backend is wrapped in ``BackendCompilerFailed`` with PyTorch's
    "please report" text; ``__str__`` stays our one line (Dynamo appends its hints to ``args``).
    """

    def __init__(self, message: str, frame: Any = None) -> None:
        ValueError.__init__(self, message)
        self.message = message
        self.first_useful_frame = frame  # Dynamo's remove_dynamo_frames() cuts the traceback to start here

    def __str__(self) -> str:
        return self.message


def _try_import_partitioner_base() -> type:
    try:
        from torch._inductor.custom_graph_pass import CustomPartitionerFn

        return CustomPartitionerFn
    except ImportError:  # torch < 2.9
        return object


class _Partitioner(_try_import_partitioner_base()):  # type: ignore[misc]
    """Min-cut partition, then plan and rewrite. Installed as Inductor's ``custom_partitioner_fn``."""

    def __init__(self, backend: MesaBackend, key_prefix: str, input_names: list[str] | None = None) -> None:
        self.backend = backend
        self.key_prefix = key_prefix
        self.input_names = input_names  # Dynamo graph inputs, in AOTAutograd's primals order
        self.cache_uuid: str | None = None  # set by MesaBackend._compile_inductor (actpass.cache.partitioner_uuid)

    def __call__(self, joint: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any):
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        num_fwd_outputs = kwargs["num_fwd_outputs"]
        fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
        names = self.input_names
        primals = joint_inputs[0] if len(joint_inputs) == 2 and isinstance(joint_inputs[0], (list, tuple)) else None
        if names is not None and (primals is None or len(primals) != len(names)):
            names = None  # AOTAutograd changed the inputs (deduplicated, synthetic bases...): leave them unnamed
        try:
            self.backend._rewrite(
                fw,
                bw,
                num_fwd_outputs,
                is_body=len(joint_inputs) == 0,
                key_prefix=self.key_prefix,
                input_names=names,
            )
        except _Fallback:
            # The rewrite may have modified the graphs before failing: partition again and use that, exact.
            return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
        return fw, bw

    def uuid(self) -> str:
        """Part of AOTAutograd's and Inductor's cache keys, so a cache entry is only ever served to the same rewrite:
        a hash of the pass's sources, the config, the store and key prefix, the graph's metadata and which inputs are
        handed-over activations (``actpass.cache.partitioner_uuid``); the sources' hash alone before that is known.
        """
        return self.cache_uuid or _sources_hash()

    # NOTE: Inductor's FX-graph cache key also pickles the whole inductor config, this object included. Pickled with
    # its backend, its bytes differed in every process, so mesa graphs never hit the cache. Pickled as its uuid, the
    # key is stable. Measured (examples/vit.py, warm cache dir, 3 interleaved rounds on the shared 2-core machine at
    # load 3-6.6): 2 misses -> 2 hits per run, warm compile median 18.1 s -> 7.7 s (faster in every round).
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_PartitionerKey, (self.uuid(),))

    def __deepcopy__(self, memo: dict[int, Any]) -> _Partitioner:
        return self  # stateless apart from the backend it reports to; a config copy must keep reporting there


@dataclasses.dataclass(frozen=True)
class _PartitionerKey:
    """What a pickled :class:`_Partitioner` becomes (only ever pickled for cache keys)."""

    uuid: str


@functools.cache
def _sources_hash() -> str:
    import hashlib
    from pathlib import Path

    h = hashlib.sha256(torch.__version__.encode())
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class MesaBackend:
    """A torch.compile backend that stores saved activations as low-bit codes.

    Args:
        config: the policy; defaults work for transformers.
        store: where running statistics live (``config.stats == "running"``); the process-wide default store if None.
        keep_graphs: keep the rewritten (forward, backward) graphs in ``graphs``.
        simulate: run the partition-boundary oracle (``actpass.oracle.simulate_plan``) instead of the rewrite.

    Attributes:
        plans: one :class:`~actpass.plan.GraphPlan` per compiled forward/backward pair, in compile order.
        skips: graphs left unmodified, with a typed reason.

    Example:
        >>> backend = actpass.mesa(MesaConfig(bits=8))
        >>> compiled = torch.compile(model, backend=backend)  # doctest: +SKIP
        >>> compiled(x).sum().backward()  # doctest: +SKIP
        >>> backend.plans[0].saved_bytes_after  # doctest: +SKIP
    """

    def __init__(
        self,
        config: MesaConfig | None = None,
        *,
        store: RunningStats | None = None,
        keep_graphs: bool = False,
        simulate: bool = False,
    ) -> None:
        self.config = config or MesaConfig()
        # Oracle mode (actpass/oracle.py): same partition and plan, but only the forward graph is rewritten, to hand
        # backward the values mesa's backward must rebuild. For testing the rewrite, not for training.
        self.simulate = simulate
        self.store = store if store is not None else default_store()
        self.plans: list[GraphPlan] = []
        self.skips: list[GraphSkip] = []
        self.keep_graphs = keep_graphs  # keep the rewritten (forward, backward) GraphModules, for tests and debugging
        self.graphs: list[tuple[fx.GraphModule, fx.GraphModule]] = []
        self.on_graph: Callable[[GraphPlan], None] | None = None  # progress hook (the CLI sets it)
        self.timings: list[PassTiming] = []  # the pass's own time per graph, in compile order
        self._seen: dict[str, set[str]] = {"module": set(), "op": set(), "tensor id": set()}
        self._warned_globs: set[str] = set()

    def __repr__(self) -> str:
        return f"MesaBackend({self.config!r}, store={self.store.name!r}, graphs={len(self.plans)})"

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        partitioner = _Partitioner(self, _key_prefix(gm), _input_names(gm, example_inputs))
        if self.config.inner is Inner.INDUCTOR:
            compiled = self._compile_inductor(gm, example_inputs, partitioner)
        else:
            from functorch.compile import make_boxed_func
            from torch._dynamo.backends.common import aot_autograd

            def boxed(g: fx.GraphModule, _inputs: Sequence[Any]) -> Callable[..., Any]:
                return make_boxed_func(g.forward)

            compiled = aot_autograd(fw_compiler=boxed, bw_compiler=boxed, partition_fn=partitioner)(gm, example_inputs)
        return self._watch(compiled)

    def _watch(self, compiled: Callable[..., Any]) -> Callable[..., Any]:
        """Check the policy's globs at the second run of a compiled graph: by then a whole step has compiled."""
        runs = 0

        @functools.wraps(compiled)
        def run(*args: Any) -> Any:
            nonlocal runs
            if runs < 2:
                runs += 1
                if runs == 2:
                    self.check_globs()
            return compiled(*args)

        return run

    def unmatched_globs(self) -> list[str]:
        """One line per policy glob that matches nothing in the graphs compiled so far, with the nearest names.

        ``include``/``exclude`` are matched against every module path in the graphs, ``include_ops``/``exclude_ops``
        against every op, ``overrides`` against the saved tensors' ids. Empty before any graph was compiled.
        """
        if not self.plans:
            return []
        c = self.config
        checks: list[tuple[str, Iterable[str], str]] = [
            ("include", [g for g in c.include if g != "*"], "module"),
            ("exclude", c.exclude, "module"),
            ("include_ops", c.include_ops, "op"),
            ("exclude_ops", c.exclude_ops, "op"),
            ("overrides", [g for g, _ in c.overrides], "tensor id"),
        ]
        lines = []
        for field, globs, kind in checks:
            names = self._seen[kind]
            for glob in globs:
                if any(fnmatch.fnmatchcase(name, glob) for name in names):
                    continue
                near = difflib.get_close_matches(glob, sorted(n for n in names if n), n=3, cutoff=0.5)
                hint = f"; nearest: {', '.join(near)}" if near else ""
                lines.append(f"actpass: {field} glob {glob!r} matches no {kind} in the compiled graphs{hint}")
        return lines

    def check_globs(self) -> list[str]:
        """Warn once per glob of :meth:`unmatched_globs` (a ``UserWarning``); returns the lines not warned before."""
        new = []
        for line in self.unmatched_globs():
            if line not in self._warned_globs:
                self._warned_globs.add(line)
                new.append(line)
                warnings.warn(line, UserWarning, stacklevel=2)
        return new

    def _compile_inductor(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], partitioner: _Partitioner
    ) -> Callable[..., Any]:
        """compile_fx with mesa's partitioner, through AOTAutograd's cache; the plans are kept beside it."""
        from torch._inductor.compile_fx import compile_fx

        # The oracle's graphs differ from mesa's for the same config: its cache entries must never be served to mesa.
        cfg = {**self.config.to_dict(), "simulate": True} if self.simulate else self.config.to_dict()
        partitioner.cache_uuid = cache.partitioner_uuid(
            cfg, self.store.name, partitioner.key_prefix, gm, partitioner.input_names
        )
        key = cache.plan_key(partitioner.cache_uuid, gm, example_inputs)
        patches = {"custom_partitioner_fn": partitioner}
        plans_before, skips_before = len(self.plans), len(self.skips)
        hits_before = _cache_hits()
        # keep_graphs needs the rewrite to run (a cache hit has no graphs to keep).
        with torch._functorch.config.patch(enable_autograd_cache=not self.keep_graphs and _cache_enabled()):
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
        if _cache_hits() == hits_before:
            # Compiled here (a miss, or no cache): keep what the partitioner recorded (nothing for an inference graph)
            # for the next process that hits this entry.
            cache.save_plans(key, self.plans[plans_before:], self.skips[skips_before:])
            return compiled
        saved = cache.load_plans(key)
        if saved is not None:
            self._restore(*saved)
            return compiled
        # A cache hit whose plan is not on disk: compile again with the cache off, so the plan is recorded.
        log.info("actpass: AOTAutograd cache hit without a saved plan; compiling again to record it")
        with torch._functorch.config.patch(enable_autograd_cache=False):
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
        cache.save_plans(key, self.plans[plans_before:], self.skips[skips_before:])
        return compiled

    def _restore(self, plans: list[GraphPlan], skips: list[GraphSkip]) -> None:
        """Record plans loaded from the cache, renumbered after this backend's own graphs."""
        ids = {}
        for plan in plans:
            ids[plan.graph_id] = new_id = len(self.plans)
            name = f"graph {new_id}" if plan.name == f"graph {plan.graph_id}" else plan.name
            restored = dataclasses.replace(plan, graph_id=new_id, name=name)
            skip = next((s for s in skips if s.graph_id == plan.graph_id), None)
            log.info("actpass: %s: plan restored with the compiled graphs from the cache", restored.name)
            self._record(restored, dataclasses.replace(skip, graph_id=new_id) if skip is not None else None)

    def reset(self) -> None:
        """Forget recorded plans (running statistics stay in the store)."""
        self.plans.clear()
        self.skips.clear()
        self.graphs.clear()
        self.timings.clear()
        for names in self._seen.values():
            names.clear()

    # -- the pass ---------------------------------------------------------------------------------------------
    def _rewrite(
        self,
        fw: fx.GraphModule,
        bw: fx.GraphModule,
        num_fwd_outputs: int,
        *,
        is_body: bool,
        key_prefix: str,
        input_names: list[str] | None = None,
    ) -> None:
        """Plan and rewrite ``fw``/``bw`` in place; raises ``_Fallback`` after recording a failed rewrite."""
        graph_id = len(self.plans)
        start = time.perf_counter()
        facts = gather_facts(fw, num_fwd_outputs, bw, activation_inputs=activation_inputs(input_names))
        budget = graph_budget(self.config, facts, self.plans)
        plan_args = dict(graph_id=graph_id, store_name=self.store.name, key_prefix=key_prefix)
        try:
            plan = plan_graph(facts, self.config, budget_bytes=budget, **plan_args)
        except BudgetError as e:
            if not self.plans:
                raise
            # The budget is shared by the graphs in compile order; earlier graphs left this one too little.
            spent = sum(p.saved_bytes_after for p in self.plans)
            msg = (
                f"actpass: graph {graph_id}: the budget ({self.config.budget}) is exceeded: earlier graphs use "
                f"{spent:,} B, this one needs at least {e.reachable:,} B and {max(budget or 0, 0):,} B are left"
            )
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
            plan = plan_graph(facts, self.config, budget_bytes=e.reachable, **plan_args)
        if input_names is not None:
            plan = _name_inputs(plan, fw, input_names)
        analysis_seconds = time.perf_counter() - start
        self._collect_names(fw, plan)
        if is_body:
            self.timings.append(PassTiming(graph_id, analysis_seconds, 0.0))
            plan = _all_kept(plan, Reason.UNSUPPORTED, "inside a higher-order-op body (invoke_subgraph): kept exact")
            self._record(plan, GraphSkip(graph_id, SkipReason.HIGHER_ORDER_BODY, "saved tensors kept exact"))
            return
        if not plan.quantized and not plan.recomputed:
            self.timings.append(PassTiming(graph_id, analysis_seconds, 0.0))
            self._record(plan)
            return
        start = time.perf_counter()
        try:
            if self.simulate:
                from actpass.oracle import simulate_plan

                reran = simulate_plan(fw, bw, plan, num_fwd_outputs, self.config, facts)
            else:
                reran = apply_plan(fw, bw, plan, num_fwd_outputs, self.config, facts)
            plan = _note_reruns(plan, reran)
        except Exception as e:  # noqa: BLE001 - any failure falls back to exact storage, and says so
            self.timings.append(PassTiming(graph_id, analysis_seconds, time.perf_counter() - start))
            msg = f"{type(e).__name__}: {e}".splitlines()[0]
            log.warning("actpass: graph %d kept exact, rewrite failed: %s", graph_id, msg)
            warnings.warn(f"actpass: graph {graph_id} kept exact (rewrite failed: {msg})", stacklevel=2)
            plan = _all_kept(plan, Reason.UNSUPPORTED, f"rewrite failed, graph kept exact: {msg}")
            self._record(plan, GraphSkip(graph_id, SkipReason.REWRITE_FAILED, msg))
            # The rewrite may have modified the graphs before failing: let the caller re-partition.
            raise _Fallback from e
        self.timings.append(PassTiming(graph_id, analysis_seconds, time.perf_counter() - start))
        if self.keep_graphs:
            self.graphs.append((fw, bw))
        self._record(plan)

    def _collect_names(self, fw: fx.GraphModule, plan: GraphPlan) -> None:
        """Remember the module paths, ops and tensor ids of a forward graph, for :meth:`unmatched_globs` (the
        policy's globs match the forward ops that produce saved tensors, and their modules)."""
        modules, ops = self._seen["module"], self._seen["op"]
        for node in fw.graph.nodes:
            if node.op != "call_function":
                continue
            short = _op_short(producer_name(node))
            ops.update((short, op_id(short)))
            stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
            modules.update(normalize_module_path(str(path)) for path, _ in stack.values())
            if not stack:
                modules.add(module_path(node))
        self._seen["tensor id"].update(t.tensor_id for t in plan.tensors if t.reason is not Reason.PARAM_OR_INPUT)

    def _record(self, plan: GraphPlan, skip: GraphSkip | None = None) -> None:
        self.plans.append(plan)
        if skip is not None:
            self.skips.append(skip)
        log.info(
            "actpass: %s: %d saved tensors, %d quantized, %d -> %d bytes",
            plan.name,
            len(plan.tensors),
            len(plan.quantized),
            plan.saved_bytes_before,
            plan.saved_bytes_after,
        )
        if self.on_graph is not None:
            self.on_graph(plan)


class _Fallback(Exception):
    pass


def _note_reruns(plan: GraphPlan, names: set[str]) -> GraphPlan:
    """Say in each saved tensor's detail that backward re-runs the attention it feeds (``actpass.attention``)."""
    if not names:
        return plan
    note = "; backward re-runs the attention forward on it (consistent softmax)"
    tensors = tuple(dataclasses.replace(t, detail=t.detail + note) if t.name in names else t for t in plan.tensors)
    return dataclasses.replace(plan, tensors=tensors)


def _all_kept(plan: GraphPlan, reason: Reason, detail: str) -> GraphPlan:
    tensors = tuple(
        dataclasses.replace(
            t,
            decision=Decision.KEPT,
            reason=reason,
            detail=detail,
            bytes_after=t.bytes_before,
            bits=None,
            stats_key="",
        )
        if t.quantized
        else t
        for t in plan.tensors
    )
    return dataclasses.replace(plan, tensors=tensors)


_PRIMAL = re.compile(r"primals_(\d+)")
_SOURCE = re.compile(r"L\[['\"]([^'\"]+)['\"]\](.*)")


def _source_name(node: fx.Node) -> str:
    """What a Dynamo graph placeholder is: ``parameter blocks.0.fc1.weight``, ``buffer bn.running_mean``,
    ``input x``; "" if Dynamo recorded no source."""
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    if source is None:
        return ""
    name = source.name() if callable(source.name) else source.name
    m = _SOURCE.fullmatch(str(name))
    if m is None:
        return f"input {name}"
    root, rest = m.groups()
    if not rest or not rest.startswith(("._modules", "._parameters", "._buffers")):
        return f"input {root}{normalize_module_path(rest) and '.' + normalize_module_path(rest)}"
    kind = "parameter" if "._parameters[" in rest else "buffer" if "._buffers[" in rest else "input"
    path = normalize_module_path(rest.replace("._parameters", "").replace("._buffers", ""))
    return f"{kind} {path}"


def _input_names(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> list[str]:
    """Names of AOTAutograd's primals for this Dynamo graph: its own parameters and buffers (lifted first, when
    Dynamo did not inline them), then its placeholders. A placeholder whose example value is a non-leaf tensor that
    requires grad is an activation computed before this graph (a graph break handed it over): ``activation NAME``."""
    fqn = gm.meta.get("dynamo_flat_name_to_original_fqn", {})
    names = [f"parameter {fqn.get(k, k)}" for k, _ in gm.named_parameters(remove_duplicate=False)]
    names += [f"buffer {fqn.get(k, k)}" for k, _ in gm.named_buffers(remove_duplicate=False)]
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    values = list(example_inputs) if len(example_inputs) == len(placeholders) else [None] * len(placeholders)
    for node, value in zip(placeholders, values, strict=True):
        name = _source_name(node)
        if isinstance(value, torch.Tensor) and value.requires_grad and value.grad_fn is not None:
            name = "activation " + (name.partition(" ")[2] or node.name)
        names.append(name)
    return names


def _name_inputs(plan: GraphPlan, fw: fx.GraphModule, input_names: list[str]) -> GraphPlan:
    """Name the saved graph inputs (parameters, buffers, model inputs) of ``plan`` after what they are."""
    nodes = {n.name: n for n in fw.graph.nodes}
    tensors = []
    for t in plan.tensors:
        node = nodes.get(t.name)
        root = storage_root(node) if node is not None else None
        m = _PRIMAL.fullmatch(root.name) if root is not None and root.op == "placeholder" else None
        if t.reason is Reason.PARAM_OR_INPUT and m and int(m.group(1)) <= len(input_names):
            what = input_names[int(m.group(1)) - 1]
            if what:
                _, _, name = what.partition(" ")
                detail = f"{'view of ' if root is not node else ''}{what} (graph input {root.name}): alive anyway"
                t = dataclasses.replace(t, input_name=name, detail=detail)
        tensors.append(t)
    return dataclasses.replace(plan, tensors=tuple(tensors))


def activation_inputs(input_names: Sequence[str] | None) -> set[str]:
    """Forward placeholders (``primals_N``) that are activations handed over by a graph break (see
    :func:`_input_names`)."""
    return {f"primals_{i + 1}" for i, what in enumerate(input_names or []) if what.startswith("activation ")}


def graph_budget(config: MesaConfig, facts: Any, plans: Sequence[GraphPlan]) -> int | None:
    """The bytes this graph may use of ``config.budget``, given the plans of the graphs compiled before it.

    A byte count is shared in compile order: a graph gets what the earlier ones left. A fraction holds for the graphs
    compiled so far together: a graph whose own share is out of reach (a small loss graph of row statistics) may use
    what earlier graphs left under theirs.
    """
    budget = config.budget
    if budget is None:
        return None
    spent = sum(p.saved_bytes_after for p in plans)
    if isinstance(budget, float):
        before = sum(f.nbytes for f in facts.storages if f.fixed is None or f.fixed[0] is not Reason.PARAM_OR_INPUT)
        return int(budget * (before + sum(p.saved_bytes_before for p in plans))) - spent
    return budget - spent


def _cache_hits() -> int:
    from torch._dynamo.utils import counters

    return int(counters["aot_autograd"]["autograd_cache_hit"])


def _cache_enabled() -> bool:
    """AOTAutograd's cache setting as the user left it (mesa does not turn it on where it is off)."""
    return bool(torch._functorch.config.enable_autograd_cache)


def _key_prefix(gm: fx.GraphModule) -> str:
    """``file.py:function/`` of the compiled frame, so graphs of different functions do not share statistics."""
    for node in gm.graph.nodes:
        frame = outer_frame(node)
        if frame:
            return f"{frame}/"
    return ""


def mesa(
    config: MesaConfig | None = None, *, store: RunningStats | None = None, keep_graphs: bool = False, **options: Any
) -> MesaBackend:
    """Build a mesa backend from a config object and/or keyword options.

    Example:
        >>> backend = mesa(bits=4)
        >>> model = torch.compile(model, backend=backend)  # doctest: +SKIP
    """
    if options:
        base = (config or MesaConfig()).to_dict()
        base.update(options)
        config = MesaConfig.from_dict(base)
    return MesaBackend(config, store=store, keep_graphs=keep_graphs)


_DEFAULT_BACKENDS: dict[MesaConfig, MesaBackend] = {}


def mesa_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None, **kwargs: Any
) -> Callable[..., Any]:
    """Entry point for ``torch.compile(model, backend="mesa", options={...})``.

    One :class:`MesaBackend` per distinct config is kept for the process, with the default running-statistics store,
    so running statistics persist across recompiles and ``recorded_backend(...)`` can show the plans.
    """
    if kwargs.get("mode") not in (None, "default"):
        warnings.warn(f"actpass: mode={kwargs['mode']!r} is ignored by the mesa backend", stacklevel=2)
    try:
        config = MesaConfig.from_dict(options or {})
    except ValueError as e:
        raise OptionsError(str(e), inspect.currentframe()) from None
    backend = _DEFAULT_BACKENDS.get(config)
    if backend is None:
        backend = _DEFAULT_BACKENDS[config] = MesaBackend(config)
    return backend(gm, example_inputs)


def recorded_backend(options: dict[str, Any] | None = None) -> MesaBackend | None:
    """The backend ``torch.compile(..., backend="mesa", options=options)`` used in this process, if any."""
    return _DEFAULT_BACKENDS.get(MesaConfig.from_dict(options or {}))
