"""attention_gqa: K and V repeated over heads (HF repeat_kv, repeat_interleave) are passed unrepeated to SDPA
with enable_gqa=True when both repeat each head the same number of times in a row."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from burstc.passes.attention_spellings import arg_of, is_call, is_reshape, rank_of, same_sizes, shape_of


def ungroup_kv(k: fx.Node | None, v: fx.Node):
    """K and V without a repeat over heads (same repeat count for both), that count, and the
    repeat nodes (erased if dead after the rewrite)."""
    if k is None:
        return k, v, 1, []
    k_base, k_groups, k_nodes = unrepeat_heads(k)
    v_base, v_groups, v_nodes = unrepeat_heads(v)
    if k_groups > 1 and k_groups == v_groups:
        return k_base, v_base, k_groups, k_nodes + v_nodes
    return k, v, 1, []


def unrepeat_heads(node: fx.Node) -> tuple[fx.Node, int, list[fx.Node]]:
    """(x, n, repeat nodes) when node is x [B, Hkv, T, D] with every head repeated n times in a
    row (HF repeat_kv, or repeat_interleave(n, dim=1)), else (node, 1, [])."""
    if is_call(node, (torch.repeat_interleave,), ("repeat_interleave",)):
        x, n, dim = node.args[0], arg_of(node, 1, "repeats"), arg_of(node, 2, "dim")
        if isinstance(x, fx.Node) and rank_of(x) == 4 and isinstance(n, int) and n > 1 \
                and isinstance(dim, int) and dim % 4 == 1 and set(node.kwargs) <= {"repeats", "dim"}:
            return x, n, [node]
        return node, 1, []
    if not is_reshape(node) or not is_call(node.args[0], (), ("expand",)):
        return node, 1, []
    expanded = node.args[0]
    x = unsqueezed_at_2(expanded.args[0])
    if x is None or rank_of(x) != 4 or rank_of(expanded) != 5 or rank_of(node) != 4:
        return node, 1, []
    (b, h, t, d), e, out = shape_of(x), shape_of(expanded), shape_of(node)
    n = e[2]
    if not isinstance(n, int) or n < 2:
        return node, 1, []
    if same_sizes(e, (b, h, n, t, d)) and same_sizes(out, (b, h * n, t, d)):
        return x, n, [node, expanded, expanded.args[0]]
    return node, 1, []


def unsqueezed_at_2(node: fx.Node) -> fx.Node | None:
    """x for node = x[:, :, None] (or x.unsqueeze(2)) of a 4-D x."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    if is_call(node, (torch.unsqueeze,), ("unsqueeze",)) and arg_of(node, 1, "dim") in (2, -3):
        return x
    if node.target is operator.getitem and isinstance(node.args[1], tuple):
        index = node.args[1]
        full = slice(None, None, None)
        if index[:3] == (full, full, None) and all(i == full or i is Ellipsis for i in index[3:]):
            return x
    return None
