"""Carrying symbolic sizes (dynamic shapes) from the forward graph into the backward graph.

A saved view replayed in backward, or a packed tensor's last dimension, can need a size such as ``4*s0`` that the
backward graph has no node for. The backward graph does have symbols: saved symint placeholders, and the symbolic
dims of its tensor placeholders. :class:`SymSource` finds each free symbol there and rebuilds the expression from
``sym_size``/``mul``/``add`` nodes.
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx

aten = torch.ops.aten


def expr_of(x: object) -> sympy.Expr | int | None:
    """The sympy expression of an int, SymInt or sym-valued fx node; None for anything else."""
    if isinstance(x, fx.Node):
        x = x.meta.get("val")
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        e = x.node.expr
        return int(e) if e.is_Integer else e
    return None


def _supported(e: sympy.Expr) -> bool:
    if e.is_Integer or e.is_Symbol:
        return True
    if isinstance(e, (sympy.Mul, sympy.Add)):
        return all(_supported(a) for a in e.args)
    return False


class SymSource:
    """Where each free symbol can be read in a graph: a symint placeholder, or a dim of a tensor placeholder."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.where: dict[sympy.Symbol, tuple[fx.Node, int | None]] = {}
        for ph in graph.find_nodes(op="placeholder"):
            self.add(ph)

    def add(self, node: fx.Node) -> None:
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            e = val.node.expr
            if e.is_Symbol:
                self.where.setdefault(e, (node, None))
        elif isinstance(val, torch.Tensor):
            for d, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                    self.where.setdefault(s.node.expr, (node, d))

    def can_emit(self, x: object, extra: set[sympy.Symbol] = frozenset()) -> bool:
        e = expr_of(x)
        if e is None:
            return False
        if isinstance(e, int):
            return True
        return _supported(e) and all(s in self.where or s in extra for s in e.free_symbols)

    def emit(self, x: object, val: object) -> int | fx.Node:
        """A backward-graph value for ``x`` (int, or a node computing it), inserted at the graph's current point.

        Args:
            x: an int, SymInt or sym-valued node from the forward graph.
            val: the SymInt value, set as the new node's ``meta["val"]``.
        """
        e = expr_of(x)
        if isinstance(e, int):
            return e
        assert e is not None
        return self._emit(e, val)

    def _emit(self, e: sympy.Expr, val: object) -> int | fx.Node:
        if e.is_Integer:
            return int(e)
        if e.is_Symbol:
            # No caching: callers insert at different points, and a cached node could end up after a later use.
            src, dim = self.where[e]
            if dim is None:
                return src
            node = self.graph.call_function(aten.sym_size.int, (src, dim))
            node.meta["val"] = src.meta["val"].shape[dim]
            return node
        op = operator.mul if isinstance(e, sympy.Mul) else operator.add
        parts = [self._emit(a, None) for a in e.args]
        acc = parts[0]
        for p in parts[1:]:
            node = self.graph.call_function(op, (acc, p))
            node.meta["val"] = _sym_val(op, acc, p)
            acc = node
        return acc


def _sym_val(op, a, b):
    va = a.meta["val"] if isinstance(a, fx.Node) else a
    vb = b.meta["val"] if isinstance(b, fx.Node) else b
    return op(va, vb)
