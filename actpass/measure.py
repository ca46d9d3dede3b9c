"""Count the activation bytes a training step saves for backward, independently of any plan.

The count comes from ``torch.autograd.graph.saved_tensors_hooks`` opened *outside* the compiled call: the pack hook
sees every tensor that the compiled autograd function (and any eager code between graph breaks) saves for backward.
Storages are deduplicated by ``untyped_storage().data_ptr()`` and counted whole (``untyped_storage().nbytes()``).
Parameters, buffers and the example inputs are left out: they are alive anyway, whatever the compiler saves.

This is the "measured" side of ``actpass inspect`` (against the plan's "planned" side), the number ``actpass check``
holds to a budget, and a library API for benchmarks.

Example:
    >>> import actpass
    >>> from actpass.measure import measure_saved_bytes
    >>> base = measure_saved_bytes(model, (x,), backend="inductor")  # doctest: +SKIP
    >>> mesa = measure_saved_bytes(model, (x,), backend=actpass.mesa())  # doctest: +SKIP
    >>> mesa.total / base.total  # doctest: +SKIP
    0.27
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)

_FUNCTION_APPLY = "torch/autograd/function.py"


@dataclasses.dataclass(frozen=True)
class StorageRecord:
    """One distinct storage saved for backward (the first tensor seen on it describes it)."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int  # whole storage
    tensor_nbytes: int  # numel * element size of the first tensor seen on this storage
    saves: int  # how many saved tensors point into this storage
    compiled: bool  # saved by an autograd.Function (a compiled graph); False: by an eager op (graph-break code)
    graph: int | None = None  # which compiled graph (0-based, in compile order) was running; None: outside any
    copy: bool = False  # same shape, dtype and values as a parameter, buffer or input, in another storage

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclasses.dataclass(frozen=True)
class SavedBytes:
    """What one forward saved for backward, parameters and inputs left out.

    ``total`` is the number compared against the plan and held to budgets.
    """

    backend: str  # "inductor", "mesa", ...
    total: int  # bytes of distinct saved storages
    storages: int  # distinct storages counted in ``total``
    saved_tensors: int  # pack-hook calls counted (a storage saved under two views counts twice here, once in total)
    by_dtype: dict[str, int]  # bytes per dtype, e.g. {"torch.float32": 123, "torch.uint8": 45}
    excluded_bytes: int  # saved storages left out because they are parameters, buffers or inputs
    excluded_tensors: int
    graphs: int  # graphs the backend compiled during the measurement (0 if compiled before it)
    seconds: float  # wall time of compile + forward (+ backward)
    records: tuple[StorageRecord, ...] = ()
    plan_graphs: dict[int, int] = dataclasses.field(default_factory=dict)  # backend plan index -> compiled graph
    returned_cache_bytes: int = 0  # a KV cache the model returned while training (past_key_values), 0 if none

    def graph_total(self, graph: int | None) -> int:
        """Bytes saved while compiled graph ``graph`` (0-based) ran; ``None``: by eager code outside any graph."""
        return sum(r.nbytes for r in self.records if r.graph == graph)

    @property
    def eager_bytes(self) -> int:
        """Bytes saved by eager code outside compiled graphs (between graph breaks)."""
        return sum(r.nbytes for r in self.records if not r.compiled)

    @property
    def view_excess_bytes(self) -> int:
        """Bytes of saved storages beyond the saved tensors themselves (a saved view of a larger buffer)."""
        return sum(max(r.nbytes - r.tensor_nbytes, 0) for r in self.records if r.saves == 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "total": self.total,
            "storages": self.storages,
            "saved_tensors": self.saved_tensors,
            "by_dtype": dict(sorted(self.by_dtype.items())),
            "excluded_bytes": self.excluded_bytes,
            "excluded_tensors": self.excluded_tensors,
            "eager_bytes": self.eager_bytes,
            "graphs": self.graphs,
            "seconds": round(self.seconds, 3),
        }


def _storage_key(t: torch.Tensor) -> tuple[int, int, str]:
    try:
        s = t.untyped_storage()
        return (s.data_ptr(), s.nbytes(), str(t.device))
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclass without a plain storage
        return (id(t), t.numel() * t.element_size(), str(t.device))


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)


def _is_fake(t: torch.Tensor) -> bool:
    if t.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        return False
    return bool(is_fake(t))


class SavedTensorCounter:
    """Context manager that counts the storages saved for backward while it is open.

    Args:
        exclude: tensors (parameters, buffers, inputs) whose storages are not activations.
        backend: label stored in the result.

    Example:
        >>> with SavedTensorCounter(exclude=[*model.parameters(), x]) as counter:  # doctest: +SKIP
        ...     out = compiled(x)
        >>> counter.result().total  # doctest: +SKIP
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), backend: str = "") -> None:
        exclude = [t for t in exclude if isinstance(t, torch.Tensor) and not _is_fake(t)]
        self._excluded_ptrs = {_storage_key(t)[0] for t in exclude}
        # To recognise copies of them (e.g. Inductor converting a convolution's weight to channels-last and saving it).
        self._by_signature: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        for t in exclude:
            self._by_signature.setdefault((tuple(t.shape), t.dtype), []).append(t)
        self._backend = backend
        self._seen: dict[
            tuple[int, int, str], list[Any]
        ] = {}  # key -> [shape, dtype, nbytes, saves, compiled, graph, copy]
        self._keep: list[torch.Tensor] = []
        self._excluded: dict[int, int] = {}
        self._excluded_tensors = 0
        self._hooks: Any = None
        self._start = 0.0
        self.graphs = 0
        self.current_graph: int | None = None  # set by measure_saved_bytes while a compiled graph runs
        self.plan_graphs: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or _is_fake(t):
            return t
        key = _storage_key(t)
        if key[0] in self._excluded_ptrs:
            self._excluded[key[0]] = key[1]
            self._excluded_tensors += 1
            return t
        caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
        rec = self._seen.get(key)
        if rec is None:
            compiled = caller.endswith(_FUNCTION_APPLY)
            shape, nbytes = tuple(t.shape), t.numel() * t.element_size()
            self._seen[key] = [shape, str(t.dtype), nbytes, 1, compiled, self.current_graph, self._is_copy(t)]
            self._keep.append(t)  # keep the storage alive so its address is not reused during the count
        else:
            rec[3] += 1
        return t

    def _is_copy(self, t: torch.Tensor) -> bool:
        candidates = self._by_signature.get((tuple(t.shape), t.dtype), ())
        with torch.no_grad():
            return any(c.device == t.device and torch.equal(c, t) for c in candidates)

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> SavedTensorCounter:
        self._start = time.perf_counter()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._seconds = time.perf_counter() - self._start

    def result(self) -> SavedBytes:
        records = tuple(
            StorageRecord(
                shape=v[0],
                dtype=v[1],
                nbytes=k[1],
                tensor_nbytes=v[2],
                saves=v[3],
                compiled=v[4],
                graph=v[5],
                copy=v[6],
            )
            for k, v in self._seen.items()
        )
        by_dtype: dict[str, int] = {}
        for r in records:
            by_dtype[r.dtype] = by_dtype.get(r.dtype, 0) + r.nbytes
        self._keep.clear()
        return SavedBytes(
            backend=self._backend,
            total=sum(r.nbytes for r in records),
            storages=len(records),
            saved_tensors=sum(r.saves for r in records),
            by_dtype=by_dtype,
            excluded_bytes=sum(self._excluded.values()),
            excluded_tensors=self._excluded_tensors,
            graphs=self.graphs,
            seconds=getattr(self, "_seconds", 0.0),
            records=records,
            plan_graphs=dict(self.plan_graphs),
        )


def returned_cache_bytes(output: Any) -> int:
    """Bytes of the KV cache a model returned (``past_key_values``, as Hugging Face models do with ``use_cache``).

    In training the cache is useless and the caller keeps it alive as long as it holds the output.
    """
    cache = getattr(output, "past_key_values", None)
    if cache is None and isinstance(output, Mapping):
        cache = output.get("past_key_values")
    if cache is None:
        return 0
    seen: dict[tuple[int, int, str], int] = {}

    def walk(obj: Any, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            key = _storage_key(obj)
            seen[key] = key[1]
        elif depth > 0 and isinstance(obj, Mapping):
            for v in obj.values():
                walk(v, depth - 1)
        elif depth > 0 and isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth - 1)
        elif depth > 0 and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                walk(v, depth - 1)

    walk(cache, 5)
    return sum(seen.values())


def backend_label(backend: Any) -> str:
    if isinstance(backend, str):
        return backend
    name = getattr(backend, "name", None) or getattr(backend, "compiler_name", None)
    if isinstance(name, str):
        return name
    return type(backend).__name__.lower().removesuffix("backend") or "custom"


def _compile_fn(backend: Any) -> Callable[..., Any]:
    if isinstance(backend, str):
        from torch._dynamo import lookup_backend

        return lookup_backend(backend)
    return backend


class _ProgressBackend:
    """Wrap a dynamo backend: log each compiled graph (``compiling graph 3 ...``), and tag what each graph saves.

    The compiled callable is wrapped to tell the counter which graph is running, and for a backend that records
    plans (``backend.plans``, as :class:`actpass.backend.MesaBackend` does) which plans each graph produced.
    """

    def __init__(self, backend: Any, label: str, counter: SavedTensorCounter | None = None) -> None:
        self._backend = backend
        self._fn = _compile_fn(backend)
        self._label = label
        self._counter = counter
        self._ids = itertools.count(0)
        self.count = 0  # graphs compiled so far

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any], **kw: Any) -> Any:
        i = next(self._ids)
        self.count = i + 1
        nodes = sum(1 for n in gm.graph.nodes if n.op == "call_function")
        log.info("actpass: [%s] compiling graph %d (%d ops) ...", self._label, i, nodes)
        plans = getattr(self._backend, "plans", None)
        first = len(plans) if isinstance(plans, list) else 0
        t0 = time.perf_counter()
        fn = self._fn(gm, example_inputs, **kw)
        log.info("actpass: [%s] graph %d compiled in %.1f s", self._label, i, time.perf_counter() - t0)
        counter = self._counter
        if counter is None:
            return fn
        if isinstance(plans, list):
            for k in range(first, len(plans)):
                counter.plan_graphs[k] = i

        def run(*args: Any, **kwargs: Any) -> Any:
            outer, counter.current_graph = counter.current_graph, i
            try:
                return fn(*args, **kwargs)
            finally:
                counter.current_graph = outer

        run._boxed_call = getattr(fn, "_boxed_call", False)  # type: ignore[attr-defined]  # dynamo's calling convention
        return run


def exclusions(model: torch.nn.Module, inputs: Any = ()) -> list[torch.Tensor]:
    """Parameters, buffers and tensor inputs: storages that a saved-bytes count leaves out."""
    return [*model.parameters(), *model.buffers(), *_tensors(inputs)]


def measure_saved_bytes(
    model: torch.nn.Module,
    args: tuple[Any, ...] | list[Any] = (),
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    backend: Any = "inductor",
    *,
    kwargs: Mapping[str, Any] | None = None,
    backward: bool = True,
    reset: bool = True,
) -> SavedBytes:
    """Compile ``model`` with ``backend``, run one forward (and backward) and count what forward saved for backward.

    Args:
        model: the module to train.
        args, kwargs: its example inputs.
        loss_fn: turns the output into a scalar loss; default :func:`actpass.modelfile.default_loss`.
        backend: a ``torch.compile`` backend: ``"inductor"`` (the baseline), a name, or a callable such as
            ``actpass.mesa(config)`` (whose ``plans`` are filled by this call).
        backward: run backward after the count (frees the saved tensors; the backward graph gets compiled). Gradients
            that existed before the call are restored afterwards.
        reset: call ``torch._dynamo.reset()`` first, so a previous compile with another backend is not reused.

    Returns:
        :class:`SavedBytes` for the forward. The loss is computed outside the count (it is not part of the model).

    Example:
        >>> measure_saved_bytes(nn.Linear(8, 8), (torch.randn(4, 8),)).total  # doctest: +SKIP
        0
    """
    from actpass.modelfile import default_loss

    kwargs = dict(kwargs or {})
    loss_fn = loss_fn or default_loss
    label = backend_label(backend)
    if reset:
        torch._dynamo.reset()
    counter = SavedTensorCounter(exclusions(model, (args, kwargs)), backend=label)
    wrapped = _ProgressBackend(backend, label, counter)
    compiled = torch.compile(model, backend=wrapped)
    t0 = time.perf_counter()
    with counter:
        output = compiled(*args, **kwargs)
    counter.graphs = wrapped.count
    cache_bytes = returned_cache_bytes(output) if model.training else 0
    if backward:
        old = {p: p.grad for p in model.parameters()}
        for p in old:
            p.grad = None  # backward would accumulate into an existing gradient in place
        loss = loss_fn(output)
        del output
        loss.backward()
        del loss
        for p, g in old.items():
            p.grad = g
    else:
        del output
    result = counter.result()
    result = dataclasses.replace(result, seconds=time.perf_counter() - t0, returned_cache_bytes=cache_bytes)
    log.info("actpass: [%s] %d bytes saved for backward in %d storages", label, result.total, result.storages)
    return result


def peak_bytes(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Peak memory allocated while ``fn()`` runs, above what was allocated before it.

    On CUDA: ``torch.cuda.max_memory_allocated`` after a reset. On CPU: the profiler's allocation events
    (``torch.profiler.profile(profile_memory=True)``), each op's ``self_cpu_memory_usage`` (not
    ``cpu_memory_usage``, which counts a parent op and its children twice) summed in time order; the maximum of the
    running sum.

    Example:
        >>> peak_bytes(lambda: torch.ones(1024, 1024).sum()) >= 4 * 1024 * 1024
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak
