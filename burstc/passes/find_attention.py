"""find_attention: every SDPA call of a Dynamo graph becomes an AttentionSite (shapes, scale, causal
flag, mask kind, GQA ratio, dropout, source line); the graph is not changed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from burstc.runtime.masked_sdpa import additive_attention, masked_sdpa
from burstc.runtime.modified_sdpa import modified_sdpa

# SDPA, and its form with score modifiers (F.scaled_dot_product_attention's arguments plus sinks=, softcap=)
SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention, modified_sdpa)
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# masked_sdpa: a recognised mask construction, as descriptors (burstc.passes.masks)
_MASKED_PARAMS = ("query", "key", "value", "key_padding", "document_ids", "is_causal", "window_left",
                  "window_right", "scale", "enable_gqa", "fill", "mask_mod", "mask_buffers", "proof", "proof_buffers")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False,
             "key_padding": None, "document_ids": None, "window_left": None, "window_right": None, "fill": None,
             "mask_mod": "", "mask_buffers": (), "proof": "", "proof_buffers": (), "sinks": None,
             "softcap": None}


@dataclass
class AttentionSite:
    """One attention call of the graph, as the passes see it."""

    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: Any  # None, or the mask's node
    dropout_p: Any  # a float, or a node when it is computed
    is_causal: Any
    scale: Any
    enable_gqa: Any
    source: str  # "file:line  code" of the user's call, or "" when Dynamo kept no stack
    # a recognised mask (a masked_sdpa node): descriptor nodes / constants, all over global positions
    key_padding: Any = None
    document_ids: Any = None
    window_left: Optional[int] = None
    window_right: Optional[int] = None
    fill: Optional[float] = None
    mask_mod: str = ""  # a registered FlexAttention mask_mod (burstc.runtime.mask_mods)
    mask_buffers: tuple = ()  # its captured tensors
    proof: str = ""  # the model's own mask code the descriptors came from (burstc.passes.mask_code), registered
    proof_buffers: tuple = ()  # its leaves
    sinks: Any = None  # per-head sink logits (burstc.runtime.sinks), a node, or None
    softcap: Optional[float] = None  # scores soft-capped as softcap * tanh(S / softcap) (modified_sdpa)

    @property
    def name(self) -> str:
        """The node's name in the graph (Dynamo derives it from the user's variable, e.g. 'y_1')."""
        return self.node.name

    def matches(self, entry: str) -> bool:
        """Whether an 'exclude' entry names this site: its node name, or its 'file.py:line'."""
        where = self.source.split()[0] if self.source else ""
        return entry == self.name or (":" in entry and where.endswith(entry))

    def tensor(self, which: str) -> Optional[torch.Tensor]:
        """The fake tensor (shapes may be SymInts) of query/key/value, if Dynamo recorded it."""
        return getattr(self, which).meta.get("example_value")

    @property
    def recognised_mask(self) -> bool:
        return self.node.target is masked_sdpa

    @property
    def mask_kind(self) -> str:
        if self.attn_mask is not None:
            return "tensor"
        if self.recognised_mask:
            return "recognised"
        return "causal" if self.is_causal is True else "none" if self.is_causal is False else "dynamic"


def _bind(node: fx.Node) -> dict:
    bound = dict(_DEFAULTS)
    params = _MASKED_PARAMS if node.target is masked_sdpa else _PARAMS[:4] if node.target is additive_attention else _PARAMS
    bound.update(zip(params, node.args))
    bound.update(node.kwargs)
    return bound


def is_attention(node: fx.Node) -> bool:
    """SDPA, or what the masks pass made of it (descriptors; an additive mask run as eager math)."""
    return node.op == "call_function" and (node.target in SDPA_TARGETS or node.target in (masked_sdpa, additive_attention))


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    return [AttentionSite(node=node, source=source_line(node), **_bind(node)) for node in gm.graph.nodes
            if is_attention(node)]


def rebind(site: AttentionSite) -> None:
    """Point the site at its node's current arguments (after a pass replaced some of its inputs)."""
    for name, value in _bind(site.node).items():
        setattr(site, name, value)


def source_line(node: fx.Node) -> str:
    """The innermost user frame of the node's stack trace, as 'file:line  code'."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            where = lines[i].split(",")
            file = where[0][len("File "):].strip('"')
            line = where[1].strip().removeprefix("line ") if len(where) > 1 else "?"
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{file}:{line}  {code}"
    return ""
