"""attention_spellings: what a node of a Dynamo graph is, for the attention matcher (burstc.passes.canonicalize):
the calls that spell matmul, softmax, dropout, casts and einsum, constants and scales known at compile time,
and shapes and dtypes read from example values without adding guards."""
from __future__ import annotations

import math
import operator
import re
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import is_concrete_float, is_concrete_int, statically_known_true

MATMUL_FNS = (operator.matmul, torch.matmul)
SOFTMAX_FNS = (F.softmax, torch.softmax)
MUL_FNS = (operator.mul, torch.mul)
DIV_FNS = (operator.truediv, torch.div, torch.true_divide)
ADD_FNS = (operator.add, torch.add)
TRANSPOSE_FNS = (torch.transpose, torch.swapaxes, torch.swapdims)
TRANSPOSE_METHODS = ("transpose", "swapaxes", "swapdims")
CAST_METHODS = ("to", "type", "type_as", "float", "half", "bfloat16", "double", "bool")
ONES_FNS = (torch.ones, torch.ones_like)



class NotAttention(Exception):
    """The softmax is not followed by a P @ V product: nothing to record."""


class Skip(Exception):
    """Looks like attention but is not provably exact to rewrite; the message is the reason."""



def is_call(node, functions=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return any(node.target is f for f in functions)
    return node.op == "call_method" and node.target in methods


def arg_of(node: fx.Node, position: int, name: str, default: Any = None) -> Any:
    """Argument by position (the tensor/self is position 0) or by keyword."""
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def is_softmax(node: fx.Node) -> bool:
    return is_call(node, SOFTMAX_FNS, ("softmax",))


def is_einsum(node: fx.Node) -> bool:
    return is_call(node, (torch.einsum,)) and isinstance(node.args[0], str)


def einsum_parts(node: fx.Node):
    """(equation, a, b) of a two-operand einsum, operands given inline or as one list."""
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    if len(operands) != 2 or not all(isinstance(o, fx.Node) for o in operands):
        return "", None, None
    return node.args[0], operands[0], operands[1]


def einsum_form(equation: str) -> str | None:
    """4-D batched matmul spellings: "ab" for abij,abjk->abik (x @ y), "abt" for abij,abkj->abik
    (x @ yᵀ); the batch letters lead in every operand. Anything else: None."""
    match = re.fullmatch(r"(\w{4}),(\w{4})->(\w{4})", equation.replace(" ", ""))
    if match is None:
        return None
    x, y, out = match.groups()
    distinct = all(len(set(t)) == 4 for t in (x, y, out)) and len(set(x + y + out)) == 5
    if not distinct or not x[:2] == y[:2] == out[:2] or out[2] != x[2]:
        return None
    if y[2] == x[3] and out[3] == y[3]:
        return "ab"
    if y[3] == x[3] and out[3] == y[2]:
        return "abt"
    return None


def pv_value(node: fx.Node, probs: fx.Node) -> fx.Node | None:
    """v when node is probs @ v (matmul, bmm or einsum), else None. bmm is only matched so that
    3-D attention is reported with its reason; the 4-D check rejects it."""
    if is_call(node, MATMUL_FNS + (torch.bmm,), ("matmul", "bmm")) and len(node.args) == 2:
        p, v = node.args
        return v if p is probs and v is not probs and isinstance(v, fx.Node) else None
    if is_einsum(node):
        equation, p, v = einsum_parts(node)
        if p is probs and v is not probs and einsum_form(equation) == "ab":
            return v
    return None


def is_prob_passthrough(node: fx.Node) -> bool:
    return is_dropout(node) or is_dtype_cast(node)


def is_dropout(node: fx.Node) -> bool:
    return is_call(node, (F.dropout, torch.dropout))


def dropout_is_noop(node: fx.Node) -> bool:
    p = constant_of(arg_of(node, 1, "p", 0.5))
    training = arg_of(node, 2, "training" if node.target is F.dropout else "train", True)
    return p == 0 or training is False


def is_dtype_cast(node: fx.Node) -> bool:
    """x.to(dtype), x.type_as(y), x.float() and friends: nothing but a dtype change."""
    if not is_call(node, (), CAST_METHODS) or not isinstance(node.args[0], fx.Node):
        return False
    if node.target in ("to", "type"):
        dtypes = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k == "dtype"]
        return len(dtypes) == 1 and len(node.args) + len(node.kwargs) == 2 and isinstance(dtypes[0], torch.dtype)
    if node.target == "type_as":
        return len(node.args) == 2 and not node.kwargs
    return len(node.args) == 1 and not node.kwargs


def is_noop_cast(node: fx.Node) -> bool:
    return is_dtype_cast(node) and dtype_of(node) == dtype_of(node.args[0])


def is_reshape(node) -> bool:
    return is_call(node, (torch.reshape,), ("view", "reshape")) and isinstance(node.args[0], fx.Node)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def constant_of(x) -> float | None:
    """x as a float when its value is fixed at compile time: a literal, or a node whose SymInt /
    SymFloat Dynamo already specialised (module floats are graph inputs under dynamic=True, with
    a guard on their value)."""
    if isinstance(x, fx.Node):
        x = x.meta.get("example_value")
    if is_number(x):
        return float(x)
    if isinstance(x, torch.SymInt) and is_concrete_int(x) or isinstance(x, torch.SymFloat) and is_concrete_float(x):
        return float(x)
    return None


def is_scale(c: float | None) -> bool:
    return c is not None and math.isfinite(c) and c != 0


def example_value(node: fx.Node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def rank_of(node) -> int | None:
    value = example_value(node)
    return value.dim() if isinstance(value, torch.Tensor) else None


def shape_of(node) -> tuple:
    value = example_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def dtype_of(node) -> torch.dtype | None:
    value = example_value(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def swap_last2(shape: tuple) -> tuple:
    return shape[:-2] + (shape[-1], shape[-2])


def same_size(a, b) -> bool:
    """Sizes known equal without adding a guard (SymInts compare symbolically)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def same_sizes(a, b) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def same_shape(a: fx.Node, b: fx.Node) -> bool:
    return rank_of(a) is not None and rank_of(b) is not None and same_sizes(shape_of(a), shape_of(b))


def last_frame(stack_trace: str | None) -> str:
    """`file:line` of the innermost frame of a stack trace, or '?' ."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', stack_trace or "")
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else "?"
