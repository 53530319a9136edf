"""program_order(*ops): the burst ops that talk to other ranks run in the graph's program order on every
rank, in the forward and in the backward.

Inductor schedules independent extern kernels by its own heuristics, which depend on shapes. Ranks of
uneven shards (3 ranks over 64 tokens hold 20, 22 and 22) compile graphs of different shapes, and one
rank ran a ring attention while another ran an all-gather: a crash on gloo ("Received data size doesn't
match"), a hang or worse on NCCL. Two guards: registered as ORDERED effects, AOTAutograd threads one
token through these ops (`with_effects`), so its partitioner never recomputes one in the backward on one
rank only and keeps their order in both graphs; and the backend turns off Inductor's size-driven
peak-memory reordering (`reorder_for_peak_memory`), the pass that moved them past each other.
"""
from __future__ import annotations

import logging

log = logging.getLogger("burstc.runtime")


def program_order(*ops) -> None:
    """Give each op (an OpOverload) an ORDERED effect."""
    try:
        from torch._higher_order_ops.effects import _EffectType, _register_effectful_op
    except ImportError:  # an older torch: nothing orders the ops; ranks must compile alike
        log.warning("burst: this torch cannot order effectful ops; ranks with uneven shards may schedule "
                    "their collectives differently (use torch >= 2.6)")
        return
    for op in ops:
        _register_effectful_op(op, _EffectType.ORDERED)
