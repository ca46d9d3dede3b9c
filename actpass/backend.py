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
import enum
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from actpass import ops as _ops  # noqa: F401  (registers torch.ops.actpass)
from actpass.analysis import outer_frame, plan_graph
from actpass.config import Inner, MesaConfig
from actpass.plan import Decision, GraphPlan, Reason
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


def _try_import_partitioner_base() -> type:
    try:
        from torch._inductor.custom_graph_pass import CustomPartitionerFn

        return CustomPartitionerFn
    except ImportError:  # torch < 2.9
        return object


class _Partitioner(_try_import_partitioner_base()):  # type: ignore[misc]
    """Min-cut partition, then plan and rewrite. Installed as Inductor's ``custom_partitioner_fn``."""

    def __init__(self, backend: MesaBackend, key_prefix: str) -> None:
        self.backend = backend
        self.key_prefix = key_prefix

    def __call__(self, joint: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any):
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        num_fwd_outputs = kwargs["num_fwd_outputs"]
        fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
        try:
            self.backend._rewrite(fw, bw, num_fwd_outputs, is_body=len(joint_inputs) == 0, key_prefix=self.key_prefix)
        except _Fallback:
            # The rewrite may have modified the graphs before failing: partition again and use that, exact.
            return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
        return fw, bw

    def uuid(self) -> None:
        # NOTE: None disables Inductor's FX-graph/AOTAutograd caches for these graphs. On a cache hit the partitioner
        # would not run, so the backend would record no plan and `actpass inspect` would report nothing.
        return None


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
        # backward the dequantized values mesa's backward must rebuild. For testing the rewrite, not for training.
        self.simulate = simulate
        self.store = store if store is not None else default_store()
        self.plans: list[GraphPlan] = []
        self.skips: list[GraphSkip] = []
        self.keep_graphs = keep_graphs  # keep the rewritten (forward, backward) GraphModules, for tests and debugging
        self.graphs: list[tuple[fx.GraphModule, fx.GraphModule]] = []
        self.on_graph: Callable[[GraphPlan], None] | None = None  # progress hook (the CLI sets it)

    def __repr__(self) -> str:
        return f"MesaBackend({self.config!r}, store={self.store.name!r}, graphs={len(self.plans)})"

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        partitioner = _Partitioner(self, _key_prefix(gm))
        if self.config.inner is Inner.INDUCTOR:
            from torch._inductor.compile_fx import compile_fx

            # NOTE: the AOTAutograd cache ignores the partitioner's uuid(); a hit would skip the partitioner, serve
            # another process's rewritten graphs and record no plan. Measured on torch 2.13: without this patch the
            # second process compiling the same model recorded 0 plans.
            with torch._functorch.config.patch(enable_autograd_cache=False):
                return compile_fx(gm, example_inputs, config_patches={"custom_partitioner_fn": partitioner})
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def boxed(g: fx.GraphModule, _inputs: Sequence[Any]) -> Callable[..., Any]:
            return make_boxed_func(g.forward)

        return aot_autograd(fw_compiler=boxed, bw_compiler=boxed, partition_fn=partitioner)(gm, example_inputs)

    def reset(self) -> None:
        """Forget recorded plans (running statistics stay in the store)."""
        self.plans.clear()
        self.skips.clear()
        self.graphs.clear()

    # -- the pass ---------------------------------------------------------------------------------------------
    def _rewrite(
        self, fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, *, is_body: bool, key_prefix: str
    ) -> None:
        """Plan and rewrite ``fw``/``bw`` in place; raises ``_Fallback`` after recording a failed rewrite."""
        graph_id = len(self.plans)
        plan = plan_graph(
            fw,
            num_fwd_outputs,
            self.config,
            bw=bw,
            graph_id=graph_id,
            store_name=self.store.name,
            key_prefix=key_prefix,
        )
        if is_body:
            plan = _all_kept(plan, Reason.UNSUPPORTED, "inside a higher-order-op body (invoke_subgraph): kept exact")
            self._record(plan, GraphSkip(graph_id, SkipReason.HIGHER_ORDER_BODY, "saved tensors kept exact"))
            return
        if not plan.quantized:
            self._record(plan)
            return
        try:
            if self.simulate:
                from actpass.oracle import simulate_plan

                simulate_plan(fw, bw, plan, num_fwd_outputs, self.config)
            else:
                apply_plan(fw, bw, plan, num_fwd_outputs, self.config)
        except Exception as e:  # noqa: BLE001 - any failure falls back to exact storage, and says so
            msg = f"{type(e).__name__}: {e}".splitlines()[0]
            log.warning("actpass: graph %d kept exact, rewrite failed: %s", graph_id, msg)
            warnings.warn(f"actpass: graph {graph_id} kept exact (rewrite failed: {msg})", stacklevel=2)
            plan = _all_kept(plan, Reason.UNSUPPORTED, f"rewrite failed, graph kept exact: {msg}")
            self._record(plan, GraphSkip(graph_id, SkipReason.REWRITE_FAILED, msg))
            # The rewrite may have modified the graphs before failing: let the caller re-partition.
            raise _Fallback from e
        if self.keep_graphs:
            self.graphs.append((fw, bw))
        self._record(plan)

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


def _all_kept(plan: GraphPlan, reason: Reason, detail: str) -> GraphPlan:
    tensors = tuple(
        dataclasses.replace(
            t, decision=Decision.KEPT, reason=reason, detail=detail, bytes_after=t.bytes_before, bits=None,
            stats_key="",
        )
        if t.quantized
        else t
        for t in plan.tensors
    )
    return dataclasses.replace(plan, tensors=tensors)


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
    config = MesaConfig.from_dict(options or {})
    backend = _DEFAULT_BACKENDS.get(config)
    if backend is None:
        backend = _DEFAULT_BACKENDS[config] = MesaBackend(config)
    return backend(gm, example_inputs)


def recorded_backend(options: dict[str, Any] | None = None) -> MesaBackend | None:
    """The backend ``torch.compile(..., backend="mesa", options=options)`` used in this process, if any."""
    return _DEFAULT_BACKENDS.get(MesaConfig.from_dict(options or {}))
