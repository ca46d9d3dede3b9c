"""What the pass decided for each saved tensor: plain frozen records.

``analysis.plan_graph`` produces a :class:`GraphPlan`; ``rewrite.apply_plan`` applies it; the report and the budget
check read the same objects, so what ``actpass inspect`` prints is what training does.
"""

from __future__ import annotations

import dataclasses
import enum


class Layout(str, enum.Enum):
    PER_HEAD = "per-head"  # attention tensor [B, H, N, D] / [B, H, N, N], or its 3-D bmm view [B*H, N, D]
    CHANNEL_LAST = "channel-last"  # activation whose last (memory-innermost) dim is channels/features
    OTHER = "other"


class Decision(str, enum.Enum):
    QUANTIZED = "quantized"
    KEPT = "kept"


class Reason(str, enum.Enum):
    """Why a saved tensor was quantized or kept exact."""

    QUANTIZED = "quantized"
    PARAM_OR_INPUT = "parameter or input"  # stays alive anyway: storing a copy would add memory
    USER_OUTPUT = "user output"  # returned to the user, stays alive anyway
    NOT_FLOAT = "integer/bool"  # indices, masks: exact by nature
    TOO_SMALL = "too small"  # under min_bytes
    ALIAS = "alias"  # shares storage with another saved tensor or is a broadcast/overlapping view
    POLICY = "excluded by policy"  # include/exclude globs, op kinds or an override
    ROW_STATISTIC = "row statistic"  # LayerNorm mean/rstd, RMSNorm rsqrt, attention logsumexp: scale whole rows
    MASK = "attention mask"  # additive mask (0 / -inf or finfo.min): integer codes cannot hold it
    UNSUPPORTED = "unsupported"  # dtype, shape or graph form the pass cannot quantize; detail says which


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    """One tensor the forward graph saves for backward."""

    index: int  # position among the graph's saved tensors
    name: str  # forward graph node name
    tensor_id: str  # stable id "module.path:op#k", used by overrides and running-statistics keys
    producer: str  # producing op, e.g. "aten.gelu.default"
    module_path: str  # module that produced the storage, e.g. "blocks.0.mlp.fc1" ("" = top); policy globs match it
    source: str  # user's source line, "file.py:42" (best effort; "" if unknown)
    shape: tuple[int | str, ...]  # symbolic dims shown as strings
    dtype: str  # e.g. "torch.float32"
    layout: Layout
    heads: int | None  # H for per-head tensors
    decision: Decision
    reason: Reason
    detail: str  # one line of explanation
    bytes_before: int  # storage bytes as saved by the baseline partition (size hints for symbolic shapes)
    bytes_after: int  # bytes actually saved after the rewrite (codes + statistics), == bytes_before if kept
    bits: int | None = None  # code width if quantized
    gend: int | None = None  # grouping, see _reference.py
    groups: int | None = None
    perm: tuple[int, ...] | None = None  # memory-order permutation applied before quantizing, if not contiguous
    chunk: int = 1  # channels sharing one group (per-channel layouts); >1 views [.., C] as [rows, C/chunk, chunk]
    stats_key: str = ""  # running-statistics entry ("" for per-step statistics)
    input_name: str = ""  # graph inputs: the parameter, buffer or model input it is, e.g. "blocks.0.fc1.weight"

    @property
    def quantized(self) -> bool:
        return self.decision is Decision.QUANTIZED

    @property
    def counted(self) -> bool:
        """Whether this tensor counts toward activation memory (parameters and inputs do not)."""
        return self.reason is not Reason.PARAM_OR_INPUT

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("layout", "decision", "reason"):
            d[k] = d[k].value
        d["shape"] = list(self.shape)
        d["perm"] = list(self.perm) if self.perm is not None else None
        return d


@dataclasses.dataclass(frozen=True)
class GraphPlan:
    """The plan for one compiled forward/backward pair."""

    graph_id: int  # order of compilation within the backend, from 0
    name: str  # e.g. "graph 0" or the higher-order-op body it came from
    tensors: tuple[SavedTensor, ...]
    shared_bytes: int = 0  # bytes of saved tensors that alias another saved tensor's storage (counted once)

    # Totals leave out parameters and inputs (they are alive anyway, and the saved-tensor-hook measurement leaves
    # them out too) and count storage shared by several saved tensors once.
    @property
    def saved_bytes_before(self) -> int:
        return sum(t.bytes_before for t in self.tensors if t.counted) - self.shared_bytes

    @property
    def saved_bytes_after(self) -> int:
        return sum(t.bytes_after for t in self.tensors if t.counted) - self.shared_bytes

    @property
    def quantized(self) -> tuple[SavedTensor, ...]:
        return tuple(t for t in self.tensors if t.quantized)

    def to_dict(self) -> dict:
        return {
            "graph_id": self.graph_id,
            "name": self.name,
            "saved_bytes_before": self.saved_bytes_before,
            "saved_bytes_after": self.saved_bytes_after,
            "shared_bytes": self.shared_bytes,
            "tensors": [t.to_dict() for t in self.tensors],
        }
