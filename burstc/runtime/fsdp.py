"""fsdp: parameters managed by FSDP2 (`fully_shard`) whose gradient reduction already spans the ring's ranks.

Sequence mode makes each rank's gradient of a parameter used by sharded work partial (its own tokens'
share); without FSDP, burst sums it over the group (`grad_sum`, one all-reduce). When FSDP2 shards the
parameter over a mesh that contains the group (torchtitan's `dp_shard_cp`: the data x sequence ranks
flattened), FSDP's reduce-scatter already sums over those ranks, so burst only scales what it hands over
and communicates nothing itself. FSDP divides the sum over its S ranks by F (its gradient divide factor,
S by default); the exact result is the mean over the S / G data replicas of the full gradient. Hence:

- a partial gradient (the parameter meets sharded work) is scaled by F * G / S (G with the defaults);
- a gradient every rank of the group computed whole (replicated work) is scaled by F / S (1 by default).

F is read when the graph compiles: set a divide factor before the first step. HSDP meshes (a replicate
dimension) and meshes that do not contain the group keep burst's own all-reduce.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("burstc.runtime")


@dataclass(frozen=True)
class FsdpScales:
    """What burst multiplies a FSDP-managed parameter's gradient by before FSDP's reduction."""

    partial: float  # gradient of its uses by sharded work (this rank's tokens)
    whole: float  # gradient of its uses by replicated work (the same on every rank of the group)


def _param_groups() -> dict[int, object]:
    """id(unsharded parameter) -> its FSDPParamGroup, over every module fully_shard manages now."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # a torch without FSDP2
        return {}
    groups = {}
    for ref in list(_module_state_mapping.values()):
        state = ref() if callable(ref) else ref
        if not isinstance(state, FSDPState):
            continue
        for group in state._fsdp_param_groups:
            for param in group.fsdp_params:
                unsharded = getattr(param, "_unsharded_param", None)
                if unsharded is not None:
                    groups[id(unsharded)] = group
    return groups


def fsdp_scales(example_inputs, group: Optional[dist.ProcessGroup]) -> dict[int, FsdpScales]:
    """Position -> scales of each graph input that is an FSDP2-managed parameter whose reduction spans the
    ring's group (`group`; None: the default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return {}
    groups = _param_groups()
    if not groups:
        return {}
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, HSDPMeshInfo

    ring = set(dist.get_process_group_ranks(group or dist.group.WORLD))
    found = {}
    for i, x in enumerate(example_inputs):
        param_group = groups.get(id(x)) if isinstance(x, torch.Tensor) else None
        mesh_info = getattr(param_group, "mesh_info", None)
        if not isinstance(mesh_info, FSDPMeshInfo) or isinstance(mesh_info, HSDPMeshInfo):
            continue
        shard_ranks = set(dist.get_process_group_ranks(mesh_info.shard_process_group))
        if not ring <= shard_ranks:
            continue
        size = len(shard_ranks)
        divide = param_group.gradient_divide_factor or size
        found[i] = FsdpScales(partial=divide * len(ring) / size, whole=divide / size)
    return found
