"""pipeline: the passes before planning, one sequence for compiling (burstc.backend) and for `explain`:
checkpoint regions inlined, then canonicalize, autocast's casts, masks and shifted losses on the graph and
on every higher-order op's body left in it."""
from __future__ import annotations

import torch.fx as fx

from burstc.passes.autocast import spell_out_autocast
from burstc.passes.canonicalize import canonicalize_attention
from burstc.passes.higher_order import graphs, inline_checkpoints
from burstc.passes.masks import recognize_masks
from burstc.passes.shifts import unshift_losses


def front_passes(gm: fx.GraphModule, example_inputs, selective: bool) -> fx.GraphModule:
    """gm rewritten in place (returned). selective: inline selective checkpoint regions too (their policy
    needs Inductor's joint-graph pass: burstc.passes.selective_checkpoint)."""
    gm = inline_checkpoints(gm, selective=selective)
    for graph in graphs(gm):
        recognize_masks(spell_out_autocast(canonicalize_attention(graph, example_inputs if graph is gm else None)))
        unshift_losses(graph)
    return gm
