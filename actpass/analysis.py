"""Analysis: the facts about every tensor a partitioned forward graph saves for backward.

This module only reads graphs. :func:`gather_facts` returns one :class:`StorageFacts` per saved *storage*: what it
is (its :class:`~actpass.plan.Role`), its layout and size, whether something forces it to stay exact (a parameter,
a mask, a row statistic, ...), and whether it could be rebuilt in backward instead of stored (a :class:`Recipe`).
``planner.plan_graph`` turns facts into decisions; ``rewrite.apply_plan`` applies them.

Storage, not nodes. Several saved nodes can be views of one storage: with ``scaled_dot_product_attention`` the
forward saves ``q``, ``k`` and ``v`` as three ``select`` views of the fused qkv projection; with eager attention the
bmm operands are transposed 3-D views of a contiguous ``[B, H, N, D]`` copy. Quantizing each view separately would
keep the full-precision storage alive (a view holds its base). So saved nodes are grouped by their *storage root*:
the closest producer up the chain of view ops. The root is quantized once; in backward each saved view is replayed
from the dequantized root by the same view ops.
"""

from __future__ import annotations

import collections
import logging
import math
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from actpass.plan import Reason, Role
from actpass.symbols import SymSource

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


_LOSS_HOPS = 8


def _loss_inputs(user: list[fx.Node]) -> set[fx.Node]:
    """Nodes whose values the gradient of a scalar output (the loss) is computed from directly.

    From each 0-dim floating user output: back through scalar arithmetic and the reduction to a scalar (``mean``,
    ``sum``, ``mse_loss``, ``nll_loss_forward``...), then through at most ``_LOSS_HOPS`` elementwise ops, casts and
    views, stopping at (and including) the first op of another kind (a matmul, a normalization). A regression head's
    output under ``mse_loss`` is one; a hidden activation behind a matmul is not.
    """
    reached: set[fx.Node] = set()
    frontier = []
    for n in user:
        val = _tensor_val(n)
        if val is not None and val.dim() == 0 and val.dtype.is_floating_point:
            frontier.append((n, True))
    for _ in range(_LOSS_HOPS + 4):
        nxt = []
        for n, scalar in frontier:
            if n in reached:
                continue
            reached.add(n)
            if n.op != "call_function":
                continue
            val = _tensor_val(n)
            tuple_part = n.target is operator.getitem and isinstance(n.args[0], fx.Node)
            if scalar and (val is None or val.dim() == 0 or tuple_part):
                # a scalar, or the scalar's part of a tuple-valued loss op: every tensor it reads feeds it
                nxt += [(a, _tensor_val(a) is None or _tensor_val(a).dim() == 0) for a in _input_nodes(n)]
            elif is_view_node(n) or n.target in _COPY_OPS or is_pointwise(n):
                nxt += [(a, False) for a in _input_nodes(n)]
        frontier = nxt
    return reached


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
        elif (
            isinstance(a, fx.Node)
            and a.op == "call_function"
            and a.target
            in (
                aten.full.default,
                aten.scalar_tensor.default,
                aten.lift_fresh_copy.default,
            )
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


# ------------------------------------------------------------------------------------------- what can be replayed

_COPY_OPS = {aten._to_copy.default, aten.clone.default, aten.expand.default, aten.copy.default}
_CONST_OPS = {aten.full.default, aten.scalar_tensor.default, aten.zeros.default, aten.ones.default}
try:
    _COPY_OPS.add(torch.ops.prims.convert_element_type.default)
except AttributeError:  # pragma: no cover - prims always exist on supported torch versions
    pass
_CAST_OPS = {aten._to_copy.default, aten.clone.default, aten.copy.default, *_COPY_OPS} - {aten.expand.default}


_WHERE_OPS = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar}
_FILL_OPS = {aten.masked_fill.Scalar, aten.masked_fill.Tensor}
# copy.default's first argument is the destination, whose values it overwrites: not a source of the values
_VALUE_CASTS = _COPY_OPS - {aten.copy.default}


def _constant(a) -> float | None:
    """The value of a constant argument: a Python number, or a ``full``/``scalar_tensor``/``zeros``/``ones`` node
    (the same value everywhere)."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    if not (isinstance(a, fx.Node) and a.op == "call_function"):
        return None
    v = {
        aten.full.default: lambda: a.args[1],
        aten.scalar_tensor.default: lambda: a.args[0],
        aten.zeros.default: lambda: 0.0,
        aten.ones.default: lambda: 1.0,
    }.get(a.target, lambda: None)()
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def two_values(root: fx.Node) -> tuple[float, float] | None:
    """``(a, b)`` when ``root`` holds only the two constants ``a`` and ``b`` (not NaN) by construction:
    ``where(cond, a, b)`` or ``full(b).masked_fill(cond, a)``, e.g. an additive causal mask ``where(allowed, 0.0,
    -inf)``. 1 bit per element (``x == a``) stores it losslessly. None otherwise."""
    val = _tensor_val(root)
    root = _through_views(root, _VALUE_CASTS)  # a cast, copy or view of a two-valued tensor holds the two values
    if root.op != "call_function" or len(root.args) != 3:
        return None
    if root.target in _WHERE_OPS:
        a, b = _constant(root.args[1]), _constant(root.args[2])
    elif root.target in _FILL_OPS:
        a, b = _constant(root.args[2]), _constant(root.args[0])
    else:
        return None
    if val is None or not val.dtype.is_floating_point or a is None or b is None or math.isnan(a) or math.isnan(b):
        return None
    # the values as stored: the constants in the output's dtype
    a, b = (float(torch.tensor(v, dtype=torch.float64).to(val.dtype)) for v in (a, b))
    return (a, b)


def is_pointwise(node: fx.Node) -> bool:
    """A deterministic elementwise op (``torch.Tag.pointwise``, not seeded-random)."""
    t = node.target
    return (
        node.op == "call_function"
        and isinstance(t, torch._ops.OpOverload)
        and torch.Tag.pointwise in t.tags
        and torch.Tag.nondeterministic_seeded not in t.tags
    )


def replayable(node: fx.Node) -> bool:
    """Whether backward may recompute ``node`` from its inputs: views, copies, casts, constants, pointwise math.

    Reductions, matmuls and random ops are not: they are either expensive or would not give the same values.
    """
    if node.op != "call_function":
        return False
    if is_view_node(node) or node.target in _COPY_OPS or is_pointwise(node):
        return True
    return node.target in _CONST_OPS and not any(isinstance(a, fx.Node) for a in _flat_args(node.args))


def _flat_args(args) -> list:
    out: list = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out += _flat_args(a)
        elif isinstance(a, dict):
            out += _flat_args(list(a.values()))
        else:
            out.append(a)
    return out


def _tensor_val(node: fx.Node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _input_nodes(node: fx.Node) -> list[fx.Node]:
    return [a for a in _flat_args([node.args, node.kwargs]) if isinstance(a, fx.Node)]


@dataclass(frozen=True)
class Recipe:
    """How backward can rebuild a storage instead of loading it: replay ``nodes`` on ``sources``.

    ``sources`` are forward nodes whose values backward must have: other saved storage roots, or graph inputs
    (parameters, which are alive anyway). ``nodes`` are the forward nodes to replay, in topological order; the last
    one is the storage root itself.
    """

    nodes: tuple[str, ...]
    sources: tuple[str, ...]
    ops: tuple[str, ...]  # short names of the replayed ops that are not views, for the report


# NOTE: recipes are meant for cheap elementwise chains: a LayerNorm affine output from the normalized input (2 ops),
# GELU/SiLU outputs from their inputs (erf-GELU 5 ops, tanh-GELU 8), casts of parameters (1). 32 nodes bounds the
# replayed work at a few elementwise passes per rebuilt tensor.
_RECIPE_MAX_NODES = 32
_RECIPE_MAX_SOURCES = 8


def find_recipe(root: fx.Node, is_source, syms: SymSource | None, free=lambda n: True) -> Recipe | None:
    """A recipe for ``root`` whose leaves are all sources (``is_source(node)``) or graph inputs, or None.

    Args:
        root: a saved storage root.
        is_source: whether a forward node's value is available to backward (another stored saved root).
        free: whether a graph input may be read (parameters and model inputs: alive anyway).
        syms: where backward can read symbolic sizes; a replayed op that needs one it cannot rebuild fails the recipe.
    """
    order: list[fx.Node] = []
    sources: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def visit(n: fx.Node) -> bool:
        if n in seen:
            return True
        seen.add(n)
        if n is not root and ((n.op == "placeholder" and free(n)) or is_source(n)):
            if _tensor_val(n) is None:
                return False
            sources.append(n)
            return len(sources) <= _RECIPE_MAX_SOURCES
        if not replayable(n):
            return False
        for a in _input_nodes(n):
            if _tensor_val(a) is not None:
                if not visit(a):
                    return False
            elif isinstance(a.meta.get("val"), torch.SymInt):
                if syms is None or not syms.can_emit(a):
                    return False
            else:
                return False
        order.append(n)
        return len(order) <= _RECIPE_MAX_NODES

    if root.op != "call_function" or is_view_node(root) or not visit(root):
        return None
    ops = tuple(_op_short(producer_name(n)) for n in order if not is_view_node(n))
    if not ops:
        return None
    return Recipe(tuple(n.name for n in order), tuple(n.name for n in sources), ops)


# ---------------------------------------------------------------------------------------------------------- roles

_SOFTMAX_OPS = {aten._softmax.default, getattr(aten, "_safe_softmax", aten._softmax).default}
_LOG_SOFTMAX_OPS = {aten._log_softmax.default}
_ACT_FUNCS = {
    aten.gelu.default,
    aten.silu.default,
    aten.relu.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.erf.default,
    aten.hardswish.default,
    aten.hardtanh.default,
    aten.elu.default,
    aten.leaky_relu.default,
    aten.mish.default,
    aten.softplus.default,
}
_ROW_NORM_OPS = {aten.native_layer_norm.default, aten.var_mean.correction, aten.var.correction}
_SDPA = ("scaled_dot_product",)


def _is_row_shaped(node: fx.Node) -> bool:
    """``[..., 1]`` with at least 2 dims: a per-row statistic (mean, rstd, logsumexp, softmax max/sum)."""
    v = _tensor_val(node)
    return v is not None and v.dim() >= 2 and hint(v.shape[-1]) == 1


def _cone(root: fx.Node, limit: int = 8) -> tuple[list[fx.Node], list[fx.Node]]:
    """Nodes ``root`` is computed from through replayable ops (inner, up to ``limit``), and the leaves."""
    inner: list[fx.Node] = []
    leaves: list[fx.Node] = []
    if not replayable(root):
        return [root], [a for a in _input_nodes(root) if _tensor_val(a) is not None]
    stack, seen = collections.deque([root]), {root}
    while stack:
        n = stack.popleft()  # breadth first: the nodes nearest the root decide what it is
        if n is not root and (not replayable(n) or len(inner) >= limit):
            leaves.append(n)
            continue
        inner.append(n)
        for a in _input_nodes(n):
            if a not in seen and _tensor_val(a) is not None:
                seen.add(a)
                stack.append(a)
    return inner, leaves


def _through_views(node: fx.Node, copies=_COPY_OPS) -> fx.Node:
    """Up the view/copy chain (views and ``copies``) to the first node that is neither."""
    cur = node
    while cur.op == "call_function" and (is_view_node(cur) or cur.target in copies):
        ins = _input_nodes(cur)
        if not ins:
            break
        cur = ins[0]
    return cur


def _feeds(root: fx.Node, members, pred, depth: int = 1) -> bool:
    """Whether ``pred(user)`` holds for a user of ``root`` (or of its saved views), through up to ``depth`` hops of
    views and pointwise ops."""
    frontier = {root, *members}
    seen = set(frontier)
    for _ in range(depth):
        nxt = set()
        for n in frontier:
            for u in n.users:
                if pred(u, n):
                    return True
                if u not in seen and (is_view_node(u) or is_pointwise(u) or u.target in _COPY_OPS):
                    seen.add(u)
                    nxt.add(u)
        frontier = nxt
    return False


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and any(s in producer_name(node) for s in _SDPA)


def _is_param_vector(node: fx.Node) -> bool:
    """A 1-D parameter or input (LayerNorm/RMSNorm weight or bias), possibly cast."""
    n = _through_views(node)
    v = _tensor_val(n)
    return n.op == "placeholder" and v is not None and v.dim() == 1


_SOFTMAX_INPUT_OPS = {aten._log_softmax.default, aten._softmax.default, aten.amax.default, aten.logsumexp.default}


def _feeds_softmax(root: fx.Node, members) -> bool:
    """Whether the storage is what a (log-)softmax reads: its row max (Inductor's decomposition) or the op itself."""
    # depth 5: attention scores reach the softmax through a view, the scale, the mask
    return _feeds(root, members, lambda u, n: u.target in _SOFTMAX_INPUT_OPS and u.args and u.args[0] is n, depth=5)


# NOTE: LayerNorm's input gradient is the upstream gradient with the mean and the normalized direction projected out,
# divided by the row's std; over a few elements little is left after the projection, and rounding of the input (which
# moves the normalized direction) is amplified. Measured with tools/fuzz.py seed 52 (fp16, LayerNorms over C, 8-bit):
# global gradient error 186% at C=3, 26-105% at C=4..8, 0.25% at C=12, 0.33% at C=16; seed 15 (C=3, dynamic batch)
# 6.6%; seed 148 (BatchNorm1d over a batch of 4) 13%; seed 10629 (a LayerNorm over 32 channels behind two softmax
# gates) 5.9%, and the same program over 16 channels 5.7-6.9%, over 64 to 256 under the 8-bit bound. Real models
# normalize over >= 64 elements; below that the codes save little and such inputs stay exact.
_MIN_NORM_WIDTH = 64
_RMS_NORM_OPS = {getattr(aten, "_fused_rms_norm", aten.native_layer_norm).default}
_BATCH_NORM_OPS = {
    aten._native_batch_norm_legit_functional.default,
    aten._native_batch_norm_legit.default,
    aten.native_batch_norm.default,
}


def _norm_width(u: fx.Node, n: fx.Node) -> int | None:
    """How many elements ``u`` normalizes ``n`` over (LayerNorm/RMSNorm rows, BatchNorm's N*H*W per channel, a
    variance or ``mean(n ** 2)`` over some dims), or None if ``u`` is not a normalization of ``n``."""
    v = _tensor_val(n)
    if not u.args or u.args[0] is not n or v is None or v.dim() == 0:
        return None
    shape = [hint(d) for d in v.shape]
    if u.target is aten.native_layer_norm.default or u.target in _RMS_NORM_OPS:
        return math.prod(hint(d) for d in u.args[1]) if len(u.args) > 1 else shape[-1]
    if u.target in _BATCH_NORM_OPS:
        return math.prod(shape) // max(shape[1], 1) if len(shape) >= 2 else shape[0]
    reduces = u.target in (aten.var_mean.correction, aten.var.correction) or (
        u.target is aten.mean.dim and n.op == "call_function" and n.target is aten.pow.Tensor_Scalar
    )
    if not reduces:
        return None
    dims = u.args[1] if len(u.args) > 1 and u.args[1] is not None else list(range(len(shape)))
    dims = [dims] if isinstance(dims, int) else dims
    return math.prod(shape[d] for d in dims)


def _norm_widths(root: fx.Node, members) -> list[int]:
    """How many elements each normalization reading the storage normalizes over. The walk goes through views, casts
    and pointwise ops (3 hops): the norm's own input may be recomputed from this storage in backward."""
    frontier = {root, *members}
    seen = set(frontier)
    widths = []
    for _ in range(3):
        nxt = set()
        for n in frontier:
            for u in n.users:
                reads = [(u, n)]
                if u.target is aten.pow.Tensor_Scalar:
                    reads += [(m, u) for m in u.users]
                for a, b in reads:
                    w = _norm_width(a, b)
                    if w is not None:
                        widths.append(w)
                if u not in seen and (is_view_node(u) or u.target in _COPY_OPS or is_pointwise(u)):
                    seen.add(u)
                    nxt.add(u)
        frontier = nxt
    return widths


def _short_norm_width(root: fx.Node, members) -> int | None:
    """How many elements a normalization reading the storage normalizes over, when under ``_MIN_NORM_WIDTH``; else
    None (seed 786: an RMSNorm over 3 channels whose input, a residual sum, was rebuilt from a quantized operand: 9.2%
    gradient error, 0.8% with that operand exact)."""
    # NOTE: the narrowest one found, not the first: the walk goes over sets of nodes, whose order is not the same in
    # two compiles of one graph (fuzz seed 10457: a storage read by norms over 21 and 16 elements was reported with
    # either width, so mesa's and the oracle's plans differed in their text).
    short = [w for w in _norm_widths(root, members) if w < _MIN_NORM_WIDTH]
    return min(short) if short else None


_PRODUCTS = {aten.mm.default: 0, aten.bmm.default: 0, aten.addmm.default: 1, aten.baddbmm.default: 1}


def _outer_product(root: fx.Node) -> bool:
    """Whether ``root`` is (a view or cast of) a matrix product over a single element: ``[N, 1] @ [1, C]``, rank one
    (a ``Linear(1, C)``), plus at most a per-column bias."""
    n = _through_views(root)
    if n.op != "call_function" or n.target not in _PRODUCTS:
        return False
    a, out = _tensor_val(n.args[_PRODUCTS[n.target]]), _tensor_val(n)
    return a is not None and out is not None and hint(a.shape[-1]) == 1 and hint(out.shape[-1]) > 1


_POOL_OPS = {aten.mean.dim, aten.sum.dim_IntList}


def _pooled(root: fx.Node) -> bool:
    """Whether ``root`` is (a view or cast of) a pooling: a mean or sum that leaves one row of features per sample,
    over the tokens of ``[B, N, C]`` (``hidden.mean(1)``) or the pixels of an NCHW ``[B, C, H, W]``. Not a sum over
    a stacking dim (dim 0), nor one that leaves other dims (a manual attention's sum over keys)."""
    n = _through_views(root)
    if n.op != "call_function" or n.target not in _POOL_OPS or len(n.args) < 2 or n.args[1] is None:
        return False
    src = _tensor_val(n.args[0])
    if src is None or src.dim() < 3:
        return False
    dims = {d % src.dim() for d in ([n.args[1]] if isinstance(n.args[1], int) else n.args[1])}
    left = [d for d in range(src.dim()) if d not in dims]
    return left == [0, src.dim() - 1] or (src.dim() == 4 and left == [0, 1])


def _classify_by_use(root: fx.Node, members: list[fx.Node]) -> Role:
    """The role of a graph input that is an activation (no producer in this graph): from how it is used."""
    if _feeds_softmax(root, members):
        return Role.LOGITS
    if _feeds(root, members, lambda u, n: u.target in _ROW_NORM_OPS and u.args and u.args[0] is n, depth=2):
        return Role.NORM_INPUT
    if _feeds(root, members, lambda u, n: u.target in _ACT_FUNCS, depth=6):
        return Role.ACT_INPUT
    return Role.OTHER


def classify(root: fx.Node, members: list[fx.Node]) -> Role:
    """What a saved storage is (see :class:`~actpass.plan.Role`), from the forward graph around its root.

    Works on both the aten graphs of ``inner="eager"`` (``native_layer_norm``, ``_softmax``, ``gelu``) and the
    decomposed graphs Inductor partitions (``var_mean``/``rsqrt``/``mul``, ``exp``/``sum``/``div``, ``erf``...).
    """
    val = _tensor_val(root)
    if root.op == "placeholder":
        return Role.INPUT
    if val is None:
        return Role.OTHER
    if val.dtype is torch.bool:
        return Role.BOOL_MASK
    t = root.target
    name = producer_name(root)
    if t is operator.getitem and isinstance(root.args[0], fx.Node):
        src, idx = root.args[0], root.args[1]
        if _is_sdpa(src):
            return Role.ATTN_OUT if idx == 0 else Role.ROW_STAT
        if src.target in _ROW_NORM_OPS or "norm" in producer_name(src):
            return Role.NORM_OUTPUT if idx == 0 else Role.ROW_STAT
    if _is_row_shaped(root):
        return Role.ROW_STAT
    if t in _SOFTMAX_OPS:
        return Role.PROBS
    if t in _LOG_SOFTMAX_OPS:
        return Role.LOG_PROBS
    ins = _input_nodes(root)
    if t is aten.div.Tensor and ins and _through_views(ins[0]).target is aten.exp.default:
        return Role.PROBS  # softmax as Inductor decomposes it: exp(x - max) / sum
    if t is aten.sub.Tensor and len(ins) == 2 and ins[1].target is aten.log.default:
        return Role.LOG_PROBS  # log_softmax decomposed: (x - max) - log(sum(exp))
    if "embedding" in name:
        return Role.EMBED
    inner, leaves = _cone(root)
    if (
        leaves
        and all(lf.op == "placeholder" for lf in leaves)
        and all(is_view_node(n) or n.target in _CAST_OPS for n in inner)
    ):
        return Role.CAST
    # Softmax probabilities further on (dropout applied, a cast): exp(x - max) / sum in the cone.
    if any(n.target is aten.div.Tensor and _through_views(n.args[0]).target is aten.exp.default for n in inner):
        return Role.PROBS
    # Normalization: a multiplication by a per-row statistic (rstd) in the elementwise cone.
    normed = any(
        n.target in (aten.mul.Tensor, aten.div.Tensor) and any(_is_row_shaped(a) for a in _input_nodes(n))
        for n in inner
    )
    if normed:
        top = _through_views(root)
        if top.target in (aten.add.Tensor, aten.mul.Tensor) and any(_is_param_vector(a) for a in _input_nodes(top)):
            return Role.NORM_OUTPUT
        if any(n.target in _ACT_FUNCS for n in inner):
            return Role.ACT_OUTPUT  # e.g. a normalization followed by an activation in one fused region
        return Role.NORM_HAT
    if any(n.target in _ACT_FUNCS for n in inner) or t in _ACT_FUNCS:
        return Role.ACT_OUTPUT
    shape = list(val.shape)
    if len(shape) == 4 and any(h in name for h in _CONV_HINTS):
        return Role.CONV
    if _feeds_softmax(root, members):
        if len(shape) >= 3 and hint(shape[-1]) == hint(shape[-2]):
            return Role.SCORES
        if len(shape) <= 3:
            return Role.LOGITS
    if _feeds(root, members, lambda u, n: u.target in _ROW_NORM_OPS and u.args and u.args[0] is n, depth=2):
        return Role.NORM_INPUT
    if _feeds(root, members, lambda u, n: _is_sdpa(u) and n in u.args[:3], depth=3):
        return Role.QKV
    # Attention output: the elementwise cone reaches sdpa's output or a bmm of probabilities and values.
    for lf in leaves:
        if lf.op != "call_function":
            continue
        if lf.target is operator.getitem and _is_sdpa(lf.args[0]) and lf.args[1] == 0:
            return Role.ATTN_OUT
        if lf.target in (aten.bmm.default, aten.matmul.default) and lf.args:
            a = _through_views(lf.args[0])
            if a.target in _SOFTMAX_OPS or (
                a.target is aten.div.Tensor and _through_views(a.args[0]).target is aten.exp.default
            ):
                return Role.ATTN_OUT
    bmm = (aten.bmm.default, aten.baddbmm.default)
    if len(shape) in (3, 4) and _feeds(root, members, lambda u, n: u.target in bmm, depth=3):
        if len(shape) == 3 or hint(shape[1]) < hint(shape[2]):
            return Role.QKV
    if _feeds(root, members, lambda u, n: u.target in _ACT_FUNCS, depth=6):
        return Role.ACT_INPUT
    return Role.OTHER


# ---------------------------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class StorageFacts:
    """What one saved storage is. Read off the graphs; independent of any policy."""

    root: str  # forward node name of the storage root
    position: int  # the root's position in the forward graph (topological order)
    members: tuple[str, ...]  # saved forward nodes on this storage (the root and/or views of it), in output order
    tensor_id: str  # "module.path:op#k", what overrides and running-statistics keys match
    producer: str  # producing op of the root, e.g. "aten.gelu.default"
    module_path: str
    role: Role
    dtype: torch.dtype | None
    shape: tuple  # logical shape (ints or SymInts)
    perm: tuple[int, ...] | None  # permutation to memory order (None: contiguous)
    mshape: tuple[int, ...]  # memory-order shape, size hints
    nbytes: int  # storage bytes (size hints)
    heads: int | None  # H for [B, H, N, D]-like attention tensors (logical dim 1)
    attn_layout: str  # "bhnd" ([B, H, N, *] in memory), "bnhd" (heads after tokens in memory), or ""
    is_output: bool  # (a view of) a forward output returned to the caller, or an activation handed over as input
    handed_over: bool  # an activation computed before this graph, entering as a graph input (a graph break)
    fixed: tuple[Reason, str] | None  # forced to stay exact whatever the policy, and why
    compared: bool  # backward compares it (e.g. a ReLU output's mask): rebuilt only from exact sources
    recipe: Recipe | None  # how backward could rebuild it instead (None: it must be stored)
    static: bool  # every dim is a plain int
    last_static: bool  # the memory-innermost dim is a plain int
    rebuildable: bool  # backward can rebuild every symbolic size it needs for the saved views (any layout)
    rebuildable_packed: bool  # ... also when the codes' last dim is packed (4/2 bits)
    feeds_loss: bool = False  # the loss reads it through elementwise ops only: its values are the loss gradient's
    two_values: tuple[float, float] | None = None  # where(cond, a, b) between constants: (a, b), 1 bit stores it


@dataclass(frozen=True)
class GraphFacts:
    """Facts about one partitioned forward/backward pair."""

    storages: tuple[StorageFacts, ...]  # in order of first appearance among the saved outputs
    saved: tuple[str, ...]  # saved forward output node names, in output order
    nodes: dict = field(default_factory=dict)  # name -> fx.Node of the forward graph (for the rewrite)


def _fixed(root: fx.Node, val, members: list[fx.Node], handed: bool = False) -> tuple[Reason, str] | None:
    if root.op == "placeholder" and not handed:
        return (Reason.PARAM_OR_INPUT, f"{'view of ' if root not in members else ''}graph input {root.name}")
    if val is None:
        return (Reason.UNSUPPORTED, "storage root has no tensor metadata")
    if val.dtype is torch.bool:
        if not is_dense(val):
            return (Reason.ALIAS, "storage root is a broadcast or overlapping view")
        return None  # packed to bits, losslessly (planner)
    if not val.dtype.is_floating_point and not val.dtype.is_complex:
        return (Reason.NOT_FLOAT, f"{val.dtype} is stored exactly")
    if val.dtype not in _FLOAT_DTYPES:
        return (Reason.UNSUPPORTED, f"dtype {val.dtype} is not supported (float32, bfloat16, float16 are)")
    if val.dim() == 0:
        return (Reason.TOO_SMALL, "a scalar")
    if not is_dense(val):
        return (Reason.ALIAS, "storage root is a broadcast or overlapping view")
    if _is_mask(root, _Group(root, members)):
        return (Reason.MASK, "attention mask (±inf or huge constants): integer codes cannot hold them")
    if _carries_mask(root):
        return (Reason.MASK, "holds an additive mask's ±inf/huge values (e.g. log_softmax of masked scores): exact")
    for m in members:
        if m is root:
            continue
        for step in view_chain(m):
            if any(isinstance(a, fx.Node) and not isinstance(a.meta.get("val"), torch.SymInt) for a in step.args[1:]):
                return (Reason.UNSUPPORTED, f"view {step.name} takes a tensor argument; cannot replay it")
    return None


_COMPARISONS = {
    aten.le.Scalar, aten.le.Tensor, aten.lt.Scalar, aten.lt.Tensor, aten.ge.Scalar, aten.ge.Tensor,
    aten.gt.Scalar, aten.gt.Tensor, aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.ne.Tensor,
    aten.sign.default, aten.threshold_backward.default,
}  # fmt: skip
_NONNEGATIVE = {aten.relu.default, aten.sigmoid.default, aten.exp.default, aten.abs.default}


def _compared_in_backward(
    root: fx.Node, members: list[fx.Node], bw_ph: dict[str, fx.Node], depth: int = 12, allow_direct: bool = True
) -> bool:
    """Whether backward compares a value computed from the storage (a ReLU/clamp mask), other than comparing the
    non-negative output of a ReLU-like op with 0 directly, which zero-preserving codes keep exact (unless
    ``allow_direct`` is False)."""
    direct_ok = allow_direct and root.target in _NONNEGATIVE
    frontier: list[tuple[fx.Node, bool]] = [(bw_ph[m.name], True) for m in members if m.name in bw_ph]
    seen = {n for n, _ in frontier}
    for _ in range(depth):
        nxt: list[tuple[fx.Node, bool]] = []
        for n, direct in frontier:
            for u in n.users:
                if u.target in _COMPARISONS:
                    scalar_zero = all(not isinstance(a, (int, float)) or a == 0 for a in u.args[1:])
                    if not (direct and direct_ok and scalar_zero):
                        return True
                    continue
                if u in seen:
                    continue
                if is_view_node(u) or u.target in _COPY_OPS:
                    seen.add(u)
                    nxt.append((u, direct))
                elif is_pointwise(u):
                    seen.add(u)
                    nxt.append((u, False))
        frontier = nxt
        if not frontier:
            break
    return False


def _rebuildable(shape, members: list[fx.Node], root: fx.Node, syms: SymSource | None, packed: bool) -> bool:
    if syms is None:
        return True
    # The codes' placeholder carries every dim but a packed last one; views need their symbolic arguments.
    carried = {s.node.expr for s in (shape[:-1] if packed else shape) if isinstance(s, torch.SymInt)}
    carried = {e for e in carried if e.is_Symbol}
    needed: list = [shape[-1]]
    for m in members:
        for step in view_chain(m) if m is not root else []:
            needed += _flat_args(step.args[1:])
    return all(not isinstance(n, (fx.Node, torch.SymInt)) or syms.can_emit(n, carried) for n in needed)


def gather_facts(
    fw: fx.GraphModule,
    num_fwd_outputs: int,
    bw: fx.GraphModule | None = None,
    activation_inputs: set[str] | frozenset[str] = frozenset(),
) -> GraphFacts:
    """The facts about every storage ``fw`` saves for backward.

    Args:
        fw: the partitioned forward graph (outputs: user outputs, then saved tensors, then symints).
        num_fwd_outputs: how many leading outputs are the user's.
        bw: the backward graph; with dynamic shapes it tells which symbolic sizes backward can rebuild.
        activation_inputs: names of forward placeholders that are activations computed before this graph (handed
            over by a graph break), not parameters or the model's inputs: saving them is saving an activation.
    """
    user, saved = _saved_tensor_outputs(fw, num_fwd_outputs)
    syms = SymSource(bw.graph) if bw is not None else None
    bw_ph = {n.name: n for n in bw.graph.find_nodes(op="placeholder")} if bw is not None else {}
    user_roots = {storage_root(n) for n in user}
    loss_inputs = _loss_inputs(user)
    groups: dict[fx.Node, _Group] = {}
    for n in saved:
        groups.setdefault(storage_root(n), _Group(storage_root(n))).members.append(n)
    roots = set(groups)
    position = {n: i for i, n in enumerate(fw.graph.nodes)}

    ordinals: dict[tuple[str, str], int] = {}
    out: list[StorageFacts] = []
    for root, grp in groups.items():
        val = _tensor_val(root)
        mpath = module_path(root) or module_path(grp.members[0])
        producer = producer_name(root)
        short = tensor_op_name(producer)
        k = ordinals.setdefault((mpath, short), 0)
        ordinals[(mpath, short)] = k + 1
        handed = root.op == "placeholder" and root.name in activation_inputs
        fixed = _fixed(root, val, grp.members, handed)
        # An additive mask made by where(cond, 0, -inf) holds two values: stored as 1 bit per element, losslessly,
        # instead of exactly (HF Llama's causal mask [8, 1, 128, 128]: 17% of its bytes at bits=4).
        pair = two_values(root) if fixed is None or fixed[0] is Reason.MASK else None
        if pair is not None and not all(isinstance(d, int) for d in val.shape):  # (dense: _fixed checked it)
            pair = None
        if pair is not None:
            fixed = None
        is_bool = val is not None and (val.dtype is torch.bool or pair is not None)  # lossless: comparisons stay exact
        compared = bool(bw_ph) and not is_bool and _compared_in_backward(root, grp.members, bw_ph, allow_direct=False)
        if fixed is None and bw_ph and not is_bool and _compared_in_backward(root, grp.members, bw_ph):
            fixed = (
                Reason.MASK_SOURCE,
                "backward derives a mask from it by comparison (e.g. ReLU after a recomputed BatchNorm): rounding "
                "would flip mask bits",
            )
        if fixed is not None and fixed[0] is Reason.PARAM_OR_INPUT:
            role = Role.INPUT
        else:
            role = classify(root, grp.members) if not handed else _classify_by_use(root, grp.members)
        if pair is not None:
            role = Role.MASK
        if fixed is None and role is Role.ROW_STAT:
            fixed = (Reason.ROW_STATISTIC, "normalization/attention row statistic: it scales whole gradient rows")
        lossy = pair is None  # what follows keeps rounding away from ill-conditioned inputs; 1 bit of a pair is exact
        width = _short_norm_width(root, grp.members) if fixed is None and lossy and role is not Role.ROW_STAT else None
        if width is not None:
            fixed = (
                Reason.SENSITIVE,
                f"input of a normalization over only {width} elements: its gradient is ill-conditioned, rounding is "
                f"amplified (kept exact under {_MIN_NORM_WIDTH})",
            )
        if fixed is None and lossy and _outer_product(root) and _norm_widths(root, grp.members):
            # Fuzz seed 40389: Linear(1, 16) -> BatchNorm1d -> LayerNorm. After the BatchNorm every channel is +-one
            # value per row and the LayerNorm is invariant to its scale, so the exact gradient into the BatchNorm input
            # cancels to rounding level; 8-bit codes of it left 178% global error (fp32), exact 0.01%.
            fixed = (
                Reason.SENSITIVE,
                "input of a normalization, and a product over one element (rank one): normalizing it leaves +-one "
                "value per row, whose gradient cancels; rounding would dominate it",
            )
        if fixed is None and lossy and _pooled(root):
            # Fuzz seed 11850: a mean over tokens feeding a 2-class head, batch 2. The head's weight gradient sums one
            # outer product per pooled row, so rounding does not average out over tokens; the rows were nearly one
            # vector and their logit gradients nearly opposite, so that sum cancelled: 8-bit codes left 9.7% global
            # error, exact 0.99%. A pooled tensor is 1/seq of the activations it summarizes: exact costs little.
            fixed = (
                Reason.SENSITIVE,
                "pooled (a mean/sum over tokens or pixels, one row of features per sample): its rounding is not "
                "averaged over tokens in the weight gradient it feeds; small next to what it pools",
            )
        if fixed is not None and fixed[0] is Reason.MASK:
            role = Role.MASK
        if val is not None:
            perm = memory_perm(val) if fixed is None else None
            shape = tuple(val.shape)
            mshape = tuple(hint(shape[i]) for i in perm) if perm else tuple(hint(s) for s in shape)
            nbytes = math.prod(hint(s) for s in shape) * val.element_size()
            lshape = [hint(s) for s in shape]
            heads, attn_layout = None, ""
            if (
                len(shape) == 4
                and perm in (None, (0, 2, 1, 3))
                and lshape[1] < lshape[2]
                and role
                in (
                    Role.QKV,
                    Role.PROBS,
                    Role.ATTN_OUT,
                    Role.OTHER,
                )
                and (role is not Role.OTHER or _attention_context(root, shape))
            ):
                heads, attn_layout = lshape[1], ("bhnd" if perm is None else "bnhd")
                if role is Role.OTHER:
                    role = Role.QKV
            mem_shape = [shape[i] for i in perm] if perm else list(shape)
            static = all(isinstance(s, int) for s in shape)
            last_static = isinstance(mem_shape[-1], int) if mem_shape else True
            rb = _rebuildable(mem_shape, grp.members, root, syms, packed=False) if mem_shape else True
            rbp = _rebuildable(mem_shape, grp.members, root, syms, packed=True) if mem_shape else True
        else:
            perm, shape, mshape, nbytes, heads, attn_layout = None, (), (), 0, None, ""
            static = last_static = rb = rbp = True
        recipe = None
        if fixed is None and not handed:
            # A graph input is a free source (alive anyway) unless it is a handed-over activation nobody stores.
            recipe = find_recipe(
                root,
                lambda n, r=root: n in roots and n is not r,
                syms,
                free=lambda n: n.name not in activation_inputs,
            )
        out.append(
            StorageFacts(
                root=root.name,
                position=position[root],
                members=tuple(m.name for m in grp.members),
                tensor_id=f"{mpath}:{short}#{k}",
                producer=producer,
                module_path=mpath,
                role=role,
                dtype=val.dtype if val is not None else None,
                shape=shape,
                perm=perm,
                mshape=mshape,
                nbytes=nbytes,
                heads=heads,
                attn_layout=attn_layout,
                is_output=root in user_roots or handed,
                handed_over=handed,
                fixed=fixed,
                compared=compared,
                recipe=recipe,
                static=static,
                last_static=last_static,
                rebuildable=rb,
                rebuildable_packed=rbp,
                feeds_loss=root in loss_inputs or any(m in loss_inputs for m in grp.members),
                two_values=pair,
            )
        )
    nodes = {n.name: n for n in fw.graph.nodes}
    return GraphFacts(storages=tuple(out), saved=tuple(n.name for n in saved), nodes=nodes)


# Device-specific spellings of one op, under one name in tensor ids: an override written on CPU must match on CUDA.
# Their outputs agree where ids use them: .0 is the attention output, .1 the logsumexp.
_OP_ID_ALIASES = {
    "_scaled_dot_product_flash_attention_for_cpu": "sdpa",
    "_scaled_dot_product_flash_attention": "sdpa",
    "_scaled_dot_product_efficient_attention": "sdpa",
    "_scaled_dot_product_cudnn_attention": "sdpa",
    "_scaled_dot_product_fused_attention_overrideable": "sdpa",
}


def op_id(short: str) -> str:
    """The op part of a tensor id from a short op name: ``gelu`` -> ``gelu``, ``var_mean[1]`` -> ``var_mean.1``, and
    every device-specific sdpa variant (``_scaled_dot_product_flash_attention_for_cpu[0]``) -> ``sdpa.0``.

    ``[k]`` would be a character class in an override glob, so multi-output ops are ``op.k`` in ids.
    """
    base, sep, idx = short.partition("[")
    base = _OP_ID_ALIASES.get(base, base)
    return base + (f".{idx.rstrip(']')}" if sep else "")


def tensor_op_name(producer: str) -> str:
    """The op part of a tensor id for a producer name: ``aten.gelu.default`` -> ``gelu`` (see :func:`op_id`)."""
    return op_id(_op_short(producer))
