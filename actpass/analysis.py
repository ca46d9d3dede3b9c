"""Analysis: which tensors does a partitioned forward graph save for backward, and what should happen to each.

This module only reads graphs. :func:`plan_graph` returns a :class:`~actpass.plan.GraphPlan` of frozen records;
``rewrite.apply_plan`` applies it.

Storage, not nodes. Several saved nodes can be views of one storage: with ``scaled_dot_product_attention`` the
forward saves ``q``, ``k`` and ``v`` as three ``select`` views of the fused qkv projection; with eager attention the
bmm operands are transposed 3-D views of a contiguous ``[B, H, N, D]`` copy. Quantizing each view separately would
keep the full-precision storage alive (a view holds its base). So saved nodes are grouped by their *storage root*:
the closest producer up the chain of view ops. The root is quantized once; in backward each saved view is replayed
from the dequantized root by the same view ops.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from actpass import _reference
from actpass.config import MesaConfig, Stats
from actpass.plan import Decision, GraphPlan, Layout, Reason, SavedTensor
from actpass.symbols import SymSource, expr_of

log = logging.getLogger(__name__)
aten = torch.ops.aten

# Ops that are aliases in practice even where the schema does not mark them as views.
_EXTRA_VIEW_OPS = {aten._unsafe_view.default, aten.alias.default, aten.detach.default}
# Multi-output ops whose outputs are views of the input (reached through operator.getitem).
_MULTI_VIEW_OPS = {
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.unbind.int,
    aten.chunk.default,
    aten.tensor_split.sections,
}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ATTENTION_HINTS = ("attention", "softmax", "bmm", "baddbmm")
_NORM_OR_ATTN = re.compile(r"(norm|attention|attn)", re.IGNORECASE)


def is_view_node(node: fx.Node) -> bool:
    """Whether ``node``'s output shares storage with its first tensor input."""
    if node.op != "call_function":
        return False
    t = node.target
    if t is operator.getitem:
        src = node.args[0]
        return isinstance(src, fx.Node) and src.op == "call_function" and src.target in _MULTI_VIEW_OPS
    if t in _EXTRA_VIEW_OPS:
        return True
    return isinstance(t, torch._ops.OpOverload) and t.is_view


def view_chain(node: fx.Node) -> list[fx.Node]:
    """The view ops from the storage root (exclusive) down to ``node`` (inclusive), root first.

    A view reached through ``getitem`` of a multi-output view op (split, unbind) contributes both nodes.
    """
    chain: list[fx.Node] = []
    cur = node
    while is_view_node(cur):
        chain.append(cur)
        if cur.target is operator.getitem:
            cur = cur.args[0]  # type: ignore[assignment]
            chain.append(cur)
        cur = cur.args[0]  # type: ignore[assignment]
    chain.reverse()
    return chain


def storage_root(node: fx.Node) -> fx.Node:
    cur = node
    while is_view_node(cur):
        src = cur.args[0]
        if cur.target is operator.getitem:
            src = src.args[0]  # type: ignore[union-attr]
        cur = src  # type: ignore[assignment]
    return cur


def hint(x: int | torch.SymInt) -> int:
    """A concrete value for a possibly-symbolic size (its size hint)."""
    if isinstance(x, int):
        return x
    node = x.node
    h = getattr(node, "hint", None)
    if h is not None:
        return int(h)
    return int(node.shape_env.size_hint(node.expr))


def shape_repr(shape) -> tuple[int | str, ...]:
    return tuple(s if isinstance(s, int) else str(s) for s in shape)


def is_dense(val: torch.Tensor) -> bool:
    """Non-overlapping and dense, judged on size hints (symbolic strides follow the same permutation)."""
    sizes = [hint(s) for s in val.shape]
    strides = [hint(s) for s in val.stride()]
    dims = sorted((i for i in range(len(sizes)) if sizes[i] != 1), key=lambda i: strides[i])
    expected = 1
    for i in dims:
        if strides[i] != expected:
            return False
        expected *= sizes[i]
    return True


def memory_perm(val: torch.Tensor) -> tuple[int, ...] | None:
    """Permutation that makes a dense tensor contiguous (outermost dim first); None if already contiguous."""
    sizes = [hint(s) for s in val.shape]
    strides = [hint(s) for s in val.stride()]
    # Size-1 dims have arbitrary strides: keep them in place relative order by sorting on (stride, -index).
    perm = sorted(range(len(sizes)), key=lambda i: (-strides[i] if sizes[i] != 1 else -math.inf, i))
    # Size-1 dims go first (outermost); that is always a valid contiguous order.
    perm = [i for i in range(len(sizes)) if sizes[i] == 1] + [i for i in perm if sizes[i] != 1]
    if perm == list(range(len(sizes))):
        return None
    return tuple(perm)


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return normalize_module_path(str(path))


_L_PREFIX = re.compile(r"^(L\[['\"][^'\"]*['\"]\]|self)\.?")


def normalize_module_path(path: str) -> str:
    """``L['self'].blocks[0].attn`` -> ``blocks.0.attn``; ``L['self']._modules['fc']`` -> ``fc``."""
    path = _L_PREFIX.sub("", path)
    path = re.sub(r"_modules\[['\"]([^'\"]+)['\"]\]", r"\1", path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    return path.strip(".").replace("..", ".")


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def source_line(node: fx.Node) -> str:
    """``file.py:LINE`` of the user's code that produced ``node`` (innermost frame), or ""."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    file, line, _fn = frames[-1]
    return f"{file.rsplit('/', 1)[-1]}:{line}"


def outer_frame(node: fx.Node) -> str:
    """``file.py:function`` of the outermost frame in ``node``'s stack trace (the compiled function), or ""."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    file, _line, fn = frames[0]
    return f"{file.rsplit('/', 1)[-1]}:{fn}"


def producer_name(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return f"{producer_name(node.args[0])}[{node.args[1]}]"
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{t.__name__}" if t.namespace == "aten" else str(t)
    return getattr(t, "__name__", str(t))


def _op_short(producer: str) -> str:
    """``aten.gelu.default`` -> ``gelu``; ``aten.native_layer_norm.default[1]`` -> ``native_layer_norm[1]``."""
    p = producer[5:] if producer.startswith("aten.") else producer
    base, sep, idx = p.partition("[")
    base = base.rsplit(".", 1)[0] if "." in base else base
    return base + (sep + idx if sep else "")


@dataclass
class _Group:
    """Saved nodes sharing one storage root (internal to analysis and rewrite)."""

    root: fx.Node
    members: list[fx.Node] = field(default_factory=list)


def _saved_tensor_outputs(fw: fx.GraphModule, num_fwd_outputs: int) -> tuple[list[fx.Node], list[fx.Node]]:
    out = next(iter(fw.graph.find_nodes(op="output")))
    outs = list(out.args[0])
    user = [n for n in outs[:num_fwd_outputs] if isinstance(n, fx.Node)]
    saved = [
        n for n in outs[num_fwd_outputs:] if isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)
    ]
    return user, saved


def _near(root: fx.Node, depth: int = 3) -> list[str]:
    """Producer names of nodes within ``depth`` hops of ``root`` (users and inputs)."""
    seen = {root}
    frontier = [root]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for m in [*n.users, *(a for a in n.args if isinstance(a, fx.Node))]:
                if m not in seen:
                    seen.add(m)
                    nxt.append(m)
        frontier = nxt
    return [producer_name(n) for n in seen if n.op == "call_function"]


def _attention_context(root: fx.Node, shape) -> bool:
    """Whether a 4-D root is an attention tensor: ``[B, H, N, N]`` scores, or softmax/sdpa/bmm nearby."""
    if hint(shape[1]) >= hint(shape[2]):
        return False  # [B, N, H, D] (heads after tokens) is channel-last, not per-head; heads are fewer than tokens
    if hint(shape[-1]) == hint(shape[-2]):
        return True
    return any(h in name for name in _near(root) for h in _ATTENTION_HINTS)


_CONV_HINTS = ("convolution", "batch_norm", "group_norm", "pool", "upsample")


_MASK_PRODUCERS = {
    aten.where.self,
    aten.where.ScalarOther,
    aten.where.ScalarSelf,
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
    aten.full.default,
    aten.scalar_tensor.default,
    aten.mul.Tensor,
    aten.mul.Scalar,
}
# NOTE: float16's finfo.min (-65504) is the mask value of fp16 models (torch.finfo(q.dtype).min under fp16
# autocast); a 1e30 threshold missed it and log_softmax of such masked scores lost 30% of its gradient at 8 bits
# (tools/fuzz.py seed 321). No activation a model means to keep is that large in fp16 anyway: 65504 is its maximum.
_HUGE = float(torch.finfo(torch.float16).max)


def _huge_constant(args) -> bool:
    for a in args:
        if isinstance(a, (list, tuple)):
            if _huge_constant(a):
                return True
        elif isinstance(a, (int, float)) and not isinstance(a, bool) and (math.isinf(a) or abs(a) >= _HUGE):
            return True
        elif isinstance(a, fx.Node) and a.op == "call_function" and a.target in (
            aten.full.default,
            aten.scalar_tensor.default,
            aten.lift_fresh_copy.default,
        ):
            if _huge_constant(a.args):
                return True
    return False


def _is_mask(root: fx.Node, grp: _Group) -> bool:
    """An additive attention mask: consumed as sdpa's ``attn_mask``, or built from ±inf / huge constants.

    Affine integer codes cannot hold ``-inf`` or ``finfo.min`` next to 0: the group's step becomes infinite or ~1e36,
    and the dequantized mask turns into NaN or garbage (measured: HF Llama with sdpa trained to NaN at step 2).
    """
    for n in (root, *grp.members):
        for u in n.users:
            name = producer_name(u)
            if "attention" in name and (
                (len(u.args) > 3 and u.args[3] is n) or u.kwargs.get("attn_mask") is n or u.kwargs.get("attn_bias") is n
            ):
                return True
    return root.target in _MASK_PRODUCERS and _huge_constant(root.args)


# Ops whose output carries an additive mask's ±inf / finfo.min values into the saved tensor: scores + mask, the
# log_softmax of masked scores (-inf or ~-3e38 where masked), and casts, copies, views and triangles of them.
_MASK_CARRIERS = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.div.Tensor,
    aten.div.Scalar,
    aten.neg.default,
    aten._log_softmax.default,
    aten.where.self,
    aten.where.ScalarOther,
    aten.where.ScalarSelf,
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
    aten.baddbmm.default,
    aten.triu.default,
    aten.tril.default,
    aten.cat.default,
    aten.clone.default,
    aten._to_copy.default,
    torch.ops.prims.convert_element_type.default,
}


def _carries_mask(root: fx.Node, depth: int = 8) -> bool:
    """Whether ``root`` may hold an additive mask's ±inf/huge values: built from one by ops that keep them.

    Example: ``log_softmax(scores + mask)`` is -inf (or ``finfo.min``) wherever the mask is, and log_softmax saves its
    output. Codes cannot hold those values: measured 8-bit gradient error 47% with a finfo.min padding mask, NaN
    gradients with a -inf causal mask (tools/fuzz.py seeds 1006 and 1036).
    """
    seen = {root}
    frontier = [root]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n.op != "call_function":
                continue
            if n.target in _MASK_PRODUCERS and _huge_constant(n.args):
                return True
            if n.target not in _MASK_CARRIERS and not is_view_node(n):
                continue
            for a in _flat_args([*n.args, *n.kwargs.values()]):
                if isinstance(a, fx.Node) and a not in seen:
                    seen.add(a)
                    nxt.append(a)
        frontier = nxt
    return False


# NOTE: per-channel statistics cost 8 bytes per channel against `rows` code bytes per channel: 1.6% on the examples'
# 512-row activations, which put mesa (3.697x) behind PyTorch's fp8 pass on GPT. Adjacent channels then share a group
# until statistics are under 0.5% of the codes; at training sizes (thousands of rows) every channel keeps its own.
_STATS_BUDGET = 0.005
_MAX_CHUNK = 4
_MIN_CHUNK_ROWS = 128


def _channel_chunk(hshape: list[int], bits: int) -> int:
    """How many adjacent channels share a group (a power of two dividing C, at most ``_MAX_CHUNK``)."""
    c, rows = hshape[-1], math.prod(hshape[:-1])
    if rows < _MIN_CHUNK_ROWS:
        return 1  # small tensors: accuracy first (4-bit with 16 channels per group measured 16.6% at 34 rows)
    code_bytes = rows * c * bits / 8
    k = 1
    while 2 * 4 * c / k > _STATS_BUDGET * code_bytes and k < _MAX_CHUNK and c % (2 * k) == 0:
        k *= 2
    while k > 1 and (k * bits) % 8:  # packed codes along the chunk must fill whole bytes
        k *= 2
        if c % k:
            return 1
    return k


_ROW_NORM_OPS = {aten.native_layer_norm.default, aten.var_mean.correction, aten.var.correction}


def _feeds_row_norm(root: fx.Node, grp: _Group) -> bool:
    """Whether the storage is the input of a LayerNorm-style per-row normalization (directly or through views)."""
    for n in (root, *grp.members):
        for u in n.users:
            if u.target in _ROW_NORM_OPS and u.args and u.args[0] is n:
                return True
            if is_view_node(u) and any(w.target in _ROW_NORM_OPS for w in u.users):
                return True
    return False


def _matches(patterns: tuple[str, ...], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def plan_graph(
    fw: fx.GraphModule,
    num_fwd_outputs: int,
    config: MesaConfig,
    *,
    bw: fx.GraphModule | None = None,
    graph_id: int = 0,
    name: str | None = None,
    store_name: str = "",
    key_prefix: str = "",
) -> GraphPlan:
    """Decide, for every tensor ``fw`` saves for backward, whether and how to quantize it.

    Args:
        fw: the partitioned forward graph (outputs: user outputs, then saved tensors, then symints).
        num_fwd_outputs: how many leading outputs are the user's.
        config: the policy.
        bw: the backward graph; with dynamic shapes it tells which symbolic sizes backward can rebuild.
        graph_id: position of this graph in the backend's compile order.
        store_name: running-statistics store (only used when ``config.stats`` is running).
        key_prefix: prefix of running-statistics entry names (e.g. the graph's code location).

    Returns:
        A :class:`GraphPlan` with one :class:`SavedTensor` per saved tensor, in output order.
    """
    user, saved = _saved_tensor_outputs(fw, num_fwd_outputs)
    syms = SymSource(bw.graph) if bw is not None else None
    user_roots = {storage_root(n) for n in user}
    groups: dict[fx.Node, _Group] = {}
    for n in saved:
        groups.setdefault(storage_root(n), _Group(storage_root(n))).members.append(n)

    ordinals: dict[tuple[str, str], int] = {}
    records: dict[str, SavedTensor] = {}
    for root, grp in groups.items():
        root_val = root.meta.get("val")
        mpath = module_path(root) or module_path(grp.members[0])
        producer = producer_name(root)
        k = ordinals.setdefault((mpath, _op_short(producer)), 0)
        ordinals[(mpath, _op_short(producer))] = k + 1
        tensor_id = f"{mpath}:{_op_short(producer)}#{k}"
        decision = _decide(root, root_val, grp, user_roots, config, tensor_id, mpath, syms)
        first = grp.members[0]
        for i, m in enumerate(grp.members):
            mval = m.meta["val"]
            common = dict(
                index=-1,
                name=m.name,
                tensor_id=tensor_id,
                producer=producer_name(m) if m is root else f"{producer_name(m)} of {producer}",
                module_path=mpath,  # the producing module: the same path the policy globs match
                source=source_line(m) or source_line(root),
                shape=shape_repr(mval.shape),
                dtype=str(mval.dtype),
            )
            if i == 0:
                records[m.name] = SavedTensor(**common, **decision)
            else:
                shared = dict(decision)
                shared.update(bytes_before=0, bytes_after=0, detail=f"shares storage with {first.name}")
                records[m.name] = SavedTensor(**common, **shared)

    tensors = tuple(dataclasses.replace(records[n.name], index=i) for i, n in enumerate(saved))
    if config.stats is Stats.RUNNING:
        tensors = tuple(
            dataclasses.replace(t, stats_key=f"{store_name}/{key_prefix}{t.tensor_id}")
            if t.quantized and t.bytes_after
            else t
            for t in tensors
        )
    return GraphPlan(graph_id=graph_id, name=name or f"graph {graph_id}", tensors=tensors)


def _flat_args(args) -> list:
    out: list = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out += _flat_args(a)
        else:
            out.append(a)
    return out


def _storage_bytes(val: torch.Tensor) -> int:
    return math.prod(hint(s) for s in val.shape) * val.element_size()


def _decide(
    root: fx.Node,
    val: torch.Tensor | None,
    grp: _Group,
    user_roots: set[fx.Node],
    config: MesaConfig,
    tensor_id: str,
    mpath: str,
    syms: SymSource | None,
) -> dict:
    """Decision fields of the group's first record (layout, decision, reason, bytes, grouping)."""
    nbytes = _storage_bytes(val) if isinstance(val, torch.Tensor) else 0

    def kept(reason: Reason, detail: str, layout: Layout = Layout.OTHER, heads: int | None = None) -> dict:
        return dict(
            layout=layout,
            heads=heads,
            decision=Decision.KEPT,
            reason=reason,
            detail=detail,
            bytes_before=nbytes,
            bytes_after=nbytes,
        )

    if root.op == "placeholder":
        return kept(Reason.PARAM_OR_INPUT, f"{'view of ' if root not in grp.members else ''}graph input {root.name}")
    if not isinstance(val, torch.Tensor):
        return kept(Reason.UNSUPPORTED, "storage root has no tensor metadata")
    if root in user_roots and not config.quantize_outputs:
        return kept(
            Reason.USER_OUTPUT, "returned to the caller, alive anyway if kept (quantize_outputs=True if it is dropped)"
        )
    if not val.dtype.is_floating_point and not val.dtype.is_complex:
        return kept(Reason.NOT_FLOAT, f"{val.dtype} is stored exactly")
    if val.dtype not in _FLOAT_DTYPES:
        return kept(Reason.UNSUPPORTED, f"dtype {val.dtype} is not supported (float32, bfloat16, float16 are)")
    if val.dim() == 0 or nbytes < config.min_bytes:
        return kept(Reason.TOO_SMALL, f"{nbytes} B < min_bytes={config.min_bytes}")
    if not is_dense(val):
        return kept(Reason.ALIAS, "storage root is a broadcast or overlapping view")
    if _is_mask(root, grp):
        return kept(Reason.POLICY, "attention mask (±inf or huge constants): kept exact, codes cannot hold them")
    if _carries_mask(root):
        return kept(Reason.POLICY, "holds an additive mask's ±inf/huge values (log_softmax of masked scores): exact")
    for m in grp.members:
        if m is root:
            continue
        for step in view_chain(m):
            if any(isinstance(a, fx.Node) and not isinstance(a.meta.get("val"), torch.SymInt) for a in step.args[1:]):
                return kept(Reason.UNSUPPORTED, f"view {step.name} takes a tensor argument; cannot replay it")

    perm = memory_perm(val)
    shape = [val.shape[i] for i in perm] if perm else list(val.shape)
    hshape = [hint(s) for s in shape]
    producer = producer_name(root)
    short = _op_short(producer)

    # Row statistics (LayerNorm mean/rstd, RMSNorm rsqrt, attention logsumexp) scale whole rows of the gradient;
    # they are ~1/C of the activation bytes, so they stay exact.
    row_stat = "[" in short and not short.endswith("[0]") and _NORM_OR_ATTN.search(short)
    if (hshape[-1] == 1 and len(hshape) >= 2) or row_stat:
        return kept(Reason.POLICY, "row statistic (normalization/attention): kept exact, it scales whole rows")

    bits = config.bits
    for pattern, obits in config.overrides:
        if fnmatch.fnmatchcase(tensor_id, pattern):
            if obits == 0:
                return kept(Reason.POLICY, f"override {pattern!r} keeps it exact")
            bits = obits
            break
    else:
        if not _matches(config.include, mpath) or _matches(config.exclude, mpath):
            return kept(Reason.POLICY, f"module {mpath or '<top>'!r} excluded by include/exclude globs")
        if (config.include_ops and not _matches(config.include_ops, short)) or _matches(config.exclude_ops, short):
            return kept(Reason.POLICY, f"op {short!r} excluded by include_ops/exclude_ops")

    running = config.stats is Stats.RUNNING
    layout, heads, chunk = Layout.CHANNEL_LAST, None, 1
    lshape = list(val.shape)  # logical order decides the layout; memory order decides the grouping
    if len(shape) == 4 and perm is None and any(h in producer for h in _CONV_HINTS):
        layout = Layout.OTHER  # NCHW conv activations: per (sample, channel)
        gend, groups = 2, (shape[1] if running else -1)
    elif len(lshape) == 4 and perm in (None, (0, 2, 1, 3)) and _attention_context(root, lshape):
        layout, heads = Layout.PER_HEAD, lshape[1]
        if perm is None:  # [B, H, N, D] in memory: per (batch, head), or per head for running statistics
            gend, groups = 2, (lshape[1] if running else -1)
        else:  # [B, N, H, D] in memory (e.g. sdpa's output): runs of D folded per head
            gend, groups = 3, lshape[1]
    elif len(shape) == 1:
        layout = Layout.OTHER
        gend, groups = 0, 1
    elif perm is None and len(shape) >= 2 and not running and _feeds_row_norm(root, grp):
        # NOTE: the input of a LayerNorm is normalized per row in backward, so its error matters relative to each
        # row's own range: per-row groups. Measured (tests/test_compat.py ViT, inner="eager"): per channel 1.49%
        # global gradient error (the class-token row is ~22x smaller than patch rows), per row 0.37%.
        gend, groups = len(shape) - 1, -1
    elif isinstance(shape[-1], int):
        # NOTE: one group per channel. Global gradient error vs eager, 8-bit / 4-bit, per channel vs per row (CPU,
        # examples' module-level models, inner="eager"): vit 0.98/19.7% vs 0.72/12.2%; gpt 0.73/12.7% vs 0.76/13.1%;
        # hf_llama 0.67/13.4% vs 0.75/14.0%. Per channel wins on 2 of 3, and trained transformers have outlier
        # channels (LLM.int8, Dettmers et al. 2022) that would set every per-row range.
        gend, groups = len(shape), shape[-1]
        # Running statistics need group counts that do not depend on batch or sequence: no sharing there.
        chunk = 1 if running else _channel_chunk(hshape, bits)
        if chunk > 1:
            gend, groups = 2, shape[-1] // chunk  # of the view [rows, C/chunk, chunk]
    else:
        gend, groups = len(shape) - 1, -1  # channel count is symbolic: fall back to per-row statistics
    if running and (not isinstance(groups, int) or groups == -1):
        return kept(Reason.UNSUPPORTED, "running statistics need a static group count (heads/channels)", layout)
    if not isinstance(heads, (int, type(None))):
        heads = hint(heads)
    qshape = [math.prod(hshape[:-1]), hshape[-1] // chunk, chunk] if chunk > 1 else hshape
    g = hint(groups) if groups != -1 else math.prod(qshape[:gend])
    qbytes = math.prod(qshape[:-1]) * _reference.packed_last_dim(qshape[-1], bits)
    after = qbytes + 2 * 4 * g
    if after >= nbytes:
        return kept(Reason.TOO_SMALL, f"codes+statistics ({after} B) would not be smaller than {nbytes} B", layout)
    if syms is not None:
        # Backward must rebuild every symbolic size it needs: the replayed views' arguments and, for packed codes,
        # the last dim. The codes' own shape carries every dim but a packed last one.
        carried = {s.node.expr for s in (shape if bits == 8 else shape[:-1]) if isinstance(s, torch.SymInt)}
        carried = {e for e in carried if e.is_Symbol} if chunk == 1 else set()
        needed: list = [shape[-1]] if chunk == 1 else list(shape)  # a chunked view is reshaped back in backward
        for m in grp.members:
            for step in view_chain(m) if m is not root else []:
                needed += _flat_args(step.args[1:])
        for n in needed:
            if isinstance(n, (fx.Node, torch.SymInt)) and not syms.can_emit(n, carried):
                return kept(Reason.UNSUPPORTED, f"symbolic size {expr_of(n)} is not available in backward", layout)
    detail = f"{bits}-bit, {'per-head' if layout is Layout.PER_HEAD else 'per-group'} " + (
        f"statistics over {g} groups" if groups != -1 else f"statistics per {'(batch, head)' if heads else 'row'}"
    )
    if chunk > 1:
        detail += f" ({chunk} adjacent channels per group: statistics stay under ~0.5% of the codes)"
    if perm:
        detail += f", quantized in memory order {list(perm)}"
    return dict(
        layout=layout,
        heads=heads,
        decision=Decision.QUANTIZED,
        reason=Reason.QUANTIZED,
        detail=detail,
        bytes_before=nbytes,
        bytes_after=after,
        bits=bits,
        gend=gend,
        groups=groups if isinstance(groups, int) else -1,
        perm=perm,
        chunk=chunk,
    )
