"""What the pass decided for each saved tensor: plain frozen records.

``analysis.gather_facts`` reads a partitioned graph pair and returns facts (what each saved storage *is*);
``planner.plan_graph`` turns facts into a :class:`GraphPlan` (what to *do* with each one); ``rewrite.apply_plan``
applies it. The report and the budget check read the same objects, so what ``actpass inspect`` prints is what
training does.
"""

from __future__ import annotations

import dataclasses
import enum
import math


class Layout(str, enum.Enum):
    """How a quantized tensor's statistics groups are laid out."""

    PER_HEAD = "per-head"  # attention tensor [B, H, N, D] / [B, H, N, N], or its 3-D bmm view [B*H, N, D]
    CHANNEL_LAST = "channel-last"  # activation whose last (memory-innermost) dim is channels/features
    PER_ROW = "per-row"  # one group per row of the last dim (LayerNorm inputs, attention probabilities)
    OTHER = "other"


class Decision(str, enum.Enum):
    QUANTIZED = "quantized"
    KEPT = "kept"
    RECOMPUTED = "recomputed"  # not stored: rebuilt in backward from other saved tensors and parameters


class Role(str, enum.Enum):
    """What a saved storage is, read off the forward graph (``analysis.classify``)."""

    INPUT = "input"  # a parameter or graph input (or a view of one): alive anyway
    CAST = "cast"  # a cast or copy of parameters/inputs only (bf16 weight under autocast, channels-last copy)
    MASK = "mask"  # additive attention mask or bias built from -inf / huge constants
    BOOL_MASK = "bool-mask"  # a bool tensor (dropout mask, attention mask): stored as 1 bit per element
    ROW_STAT = "row-stat"  # per-row statistic: LayerNorm mean/rstd, RMSNorm rsqrt, attention logsumexp
    NORM_INPUT = "norm-in"  # input of a LayerNorm/RMSNorm
    NORM_HAT = "norm-hat"  # normalized input, before the affine weight and bias
    NORM_OUTPUT = "norm-out"  # normalization output, after the affine weight/bias
    PROBS = "probs"  # softmax output (attention probabilities)
    LOG_PROBS = "log-probs"  # log_softmax output
    LOGITS = "logits"  # what a (log-)softmax over classes reads: a language model's logits before its loss
    SCORES = "scores"  # attention scores [.., N, N] that backward turns into probabilities again (softmax)
    QKV = "qkv"  # attention query/key/value
    ATTN_OUT = "attn-out"  # attention output (sdpa output, or probabilities @ values), input of the output projection
    ACT_INPUT = "act-in"  # input of a nonlinearity (GELU/SiLU/ReLU/tanh...), e.g. the first MLP linear's output
    ACT_OUTPUT = "act-out"  # output of a nonlinearity
    CONV = "conv"  # NCHW convolution / normalization activation
    EMBED = "embed"  # embedding lookup output
    OTHER = "other"


class Reason(str, enum.Enum):
    """Why a saved tensor was quantized, recomputed or kept exact."""

    QUANTIZED = "quantized"
    RECOMPUTED = "recomputed"  # rebuilt in backward by replaying cheap ops on tensors that are stored anyway
    PARAM_OR_INPUT = "parameter or input"  # stays alive anyway: storing a copy would add memory
    USER_OUTPUT = "user output"  # returned to the user, stays alive anyway
    NOT_FLOAT = "integer/bool"  # indices, masks: exact by nature
    TOO_SMALL = "too small"  # under min_bytes, or codes + statistics would not be smaller
    ALIAS = "alias"  # shares storage with another saved tensor or is a broadcast/overlapping view
    POLICY = "excluded by policy"  # include/exclude globs, op kinds or an override
    ROW_STATISTIC = "row statistic"  # LayerNorm mean/rstd, RMSNorm rsqrt, attention logsumexp: scale whole rows
    MASK = "attention mask"  # additive mask (0 / -inf or finfo.min): integer codes cannot hold it
    MASK_SOURCE = "mask source"  # backward compares a value computed from it (ReLU/clamp masks): rounding flips bits
    SENSITIVE = "sensitive"  # the planner's role table keeps this kind exact (measured by training)
    BUDGET = "budget"  # the budget solver chose this precision
    UNSUPPORTED = "unsupported"  # dtype, shape or graph form the pass cannot quantize; detail says which


@dataclasses.dataclass(frozen=True)
class Part:
    """The leading rows of a storage stored another way than the rest (a budget fill, ``planner.split_option``).

    Rows ``[0, rows)`` of the storage's memory-order dim 0 are stored as this says; the rows after them as the
    :class:`SavedTensor` record itself says. Each part has its own statistics; backward concatenates the two.
    """

    rows: int
    bits: int | None  # code width, or None: the rows are stored exactly (a copy of them)
    gend: int | None = None
    groups: int | None = None
    chunk: int = 1
    row_block: int = 1
    layout: Layout = Layout.OTHER


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
    role: Role = Role.OTHER  # what the storage is (analysis.classify)
    est_error: float = 0.0  # estimated contribution to the global relative gradient error (planner's error model)
    recompute: tuple[str, ...] = ()  # ops replayed in backward, in order (RECOMPUTED only)
    recompute_from: tuple[str, ...] = ()  # what they are replayed from: tensor ids of stored tensors, or "param/input"
    row_block: int = 1  # rows sharing one group (per-row layouts); >1 views [.., N] as [rows/row_block, row_block*N]
    input_name: str = ""  # graph inputs: the parameter, buffer or model input it is, e.g. "blocks.0.fc1.weight"
    code: str = "uniform"  # "uniform": codes of x; "sqrt": per-row codes of sqrt(x - row min) (fused.sqrt_*_math);
    # "select": 1 bit per element of a tensor that holds two values a, b (where(cond, a, b)): x == a
    split: Part | None = None  # the leading rows stored another way (exact or wider codes); None: one way for all

    @property
    def quantized(self) -> bool:
        return self.decision is Decision.QUANTIZED

    @property
    def recomputed(self) -> bool:
        return self.decision is Decision.RECOMPUTED

    @property
    def counted(self) -> bool:
        """Whether this tensor counts toward activation memory (parameters and inputs do not)."""
        return self.reason is not Reason.PARAM_OR_INPUT

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("layout", "decision", "reason", "role"):
            d[k] = d[k].value
        d["shape"] = list(self.shape)
        d["perm"] = list(self.perm) if self.perm is not None else None
        d["recompute"] = list(self.recompute)
        d["recompute_from"] = list(self.recompute_from)
        if self.split is not None:
            d["split"]["layout"] = self.split.layout.value
        return d


@dataclasses.dataclass(frozen=True)
class GraphPlan:
    """The plan for one compiled forward/backward pair."""

    graph_id: int  # order of compilation within the backend, from 0
    name: str  # e.g. "graph 0" or the higher-order-op body it came from
    tensors: tuple[SavedTensor, ...]
    shared_bytes: int = 0  # bytes of saved tensors that alias another saved tensor's storage (counted once)
    budget: int | None = None  # bytes this graph's plan was asked to fit in (budget mode), else None
    min_bytes_reachable: int | None = None  # smallest size the planner could reach (budget mode)

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

    @property
    def recomputed(self) -> tuple[SavedTensor, ...]:
        return tuple(t for t in self.tensors if t.recomputed)

    @property
    def est_error(self) -> float:
        """The planner's estimate of the global relative gradient error (independent errors add in quadrature)."""
        return math.sqrt(sum(t.est_error**2 for t in self.tensors))

    def to_dict(self) -> dict:
        return {
            "graph_id": self.graph_id,
            "name": self.name,
            "saved_bytes_before": self.saved_bytes_before,
            "saved_bytes_after": self.saved_bytes_after,
            "shared_bytes": self.shared_bytes,
            "est_error": self.est_error,
            "budget": self.budget,
            "min_bytes_reachable": self.min_bytes_reachable,
            "tensors": [t.to_dict() for t in self.tensors],
        }
