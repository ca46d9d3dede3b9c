"""Running quantization statistics (Mesa's EMA of each group's range) and where they live.

Design. Mutable state inside a compiled graph is awkward: the forward graph's inputs are fixed by AOTAutograd before
the pass runs, Inductor treats ``get_attr`` tensors as constants it may fold or copy, and functionalization rejects an
op that mutates a tensor the graph cannot see. So the running ranges do not live in the graph at all:

* A :class:`RunningStats` store owns a dict ``entry name -> [2, G] fp32 tensor`` (row 0: low, row 1: high; NaN
  until the first step). Each store has a name, registered in a process-wide table.
* The pass inserts ``actpass::quantize_saved(x, ..., key="<store>/<entry>")``. Inductor keeps that custom op as an
  opaque call; when it runs, it looks the buffer up by key and runs the ``actpass::quantize`` kernel, which updates
  the buffer in place and quantizes with the updated range, in one kernel.
* Entry names come from the saved tensor's module path, producer op and ordinal, not from graph node names, so the
  same activation finds the same statistics after a recompile (new shapes, ``mark_dynamic``, a new graph break).
  Group counts never depend on batch or sequence length (per-head or per-channel), so dynamic shapes share entries.
* Buffers are created on the activation's device at first use, and moved there if a checkpoint restored them
  elsewhere. ``state_dict()``/``load_state_dict()`` round-trip them with a training checkpoint.

The graph-level op is declared free of side effects on its inputs; its only side effect is the EMA update, which is
exactly one update per forward execution. Under activation checkpointing the forward can run twice; the second run
updates the EMA again, which only moves it further toward the current range.
"""

from __future__ import annotations

import threading
import uuid
import weakref

import torch

_STORES: weakref.WeakValueDictionary[str, RunningStats] = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


class RunningStats:
    """A named store of running per-group ranges.

    Args:
        name: unique store name; a random one by default. Graphs refer to entries as ``"<name>/<entry>"``.

    Example:
        >>> store = RunningStats("demo")
        >>> backend = actpass.mesa(MesaConfig(stats="running"), store=store)  # doctest: +SKIP
        >>> torch.save({"model": model.state_dict(), "actpass": store.state_dict()}, "ckpt.pt")  # doctest: +SKIP
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"store-{uuid.uuid4().hex[:12]}"
        if "/" in self.name:
            raise ValueError(f"actpass: store name must not contain '/': {self.name!r}")
        self._entries: dict[str, torch.Tensor] = {}
        with _LOCK:
            if self.name in _STORES:
                raise ValueError(f"actpass: a RunningStats store named {self.name!r} already exists")
            _STORES[self.name] = self

    def key(self, entry: str) -> str:
        return f"{self.name}/{entry}"

    def get(self, entry: str, groups: int, device: torch.device) -> torch.Tensor:
        buf = self._entries.get(entry)
        if buf is not None and buf.shape[1] != groups:
            # NOTE: a recompile (a new batch size marked dynamic) can give the same tensor another statistics layout
            # (fuzz seed 30178: 4 groups at batch 1, 33 after): each group count keeps its own running entry, which
            # starts like any new one (this step's statistics). Raising here crashed training.
            entry = f"{entry}@{groups}"
            buf = self._entries.get(entry)
        if buf is None:
            buf = torch.full((2, groups), float("nan"), dtype=torch.float32, device=device)
            self._entries[entry] = buf
        elif buf.device != device:
            buf = buf.to(device)
            self._entries[entry] = buf
        return buf

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: str) -> bool:
        return entry in self._entries

    def entries(self) -> dict[str, torch.Tensor]:
        """The live buffers (not copies), by entry name."""
        return dict(self._entries)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of every buffer, for a training checkpoint."""
        return {k: v.detach().clone() for k, v in self._entries.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore buffers saved by :meth:`state_dict`. Existing buffers are updated in place."""
        for k, v in state.items():
            if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[0] != 2:
                raise ValueError(f"actpass: running statistics {k!r} must be a [2, G] tensor")
            cur = self._entries.get(k)
            if cur is not None and cur.shape == v.shape:
                cur.copy_(v)
            else:
                self._entries[k] = v.detach().to(torch.float32).clone()

    def reset(self) -> None:
        """Forget every entry (the next step starts the averages afresh)."""
        for v in self._entries.values():
            v.fill_(float("nan"))


def lookup(key: str, groups: int, device: torch.device) -> torch.Tensor:
    """Resolve ``"<store>/<entry>"`` to its buffer (used by ``actpass::quantize_saved``)."""
    name, _, entry = key.partition("/")
    store = _STORES.get(name)
    if store is None:
        if name == DEFAULT_STORE_NAME:
            store = default_store()
        else:
            raise RuntimeError(f"actpass: no RunningStats store named {name!r} is alive (key {key!r})")
    return store.get(entry, groups, device)


DEFAULT_STORE_NAME = "default"
_DEFAULT: list[RunningStats] = []


def default_store() -> RunningStats:
    """The store used by ``torch.compile(..., backend="mesa")`` when no store is given."""
    with _LOCK:
        if not _DEFAULT:
            store = RunningStats.__new__(RunningStats)
            store.name = DEFAULT_STORE_NAME
            store._entries = {}
            _STORES[DEFAULT_STORE_NAME] = store
            _DEFAULT.append(store)
        return _DEFAULT[0]
