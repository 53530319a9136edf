"""burstc: BurstAttention — exact distributed ring attention over torch.distributed.

Public API:
    burst_attention(q, k, v, *, causal, scale, enable_gqa, group, layout, backward, kernel,
                    virtual_world_size)          distributed attention on this rank's shard
    shard_sequence / unshard_sequence / shard_positions / local_length
                                                 layouts: who holds which tokens
    build_plan                                   the ring plan (printable, checked)
    comm_stats                                   bytes / steps / skipped pairs of the calls in a block
    BurstConfig, BurstInputError
"""
from burstc.config import BurstConfig
from burstc.runtime.attention import burst_attention
from burstc.runtime.sharding import shard_sequence, unshard_sequence
from burstc.runtime.stats import CommStats, comm_stats
from burstc.runtime.validate import BurstInputError
from burstc.schedule.layout import LAYOUTS, local_length, shard_positions
from burstc.schedule.plan import RingPlan, build_plan

__all__ = [
    "BurstConfig", "BurstInputError", "CommStats", "LAYOUTS", "RingPlan", "build_plan", "burst_attention",
    "comm_stats", "local_length", "shard_positions", "shard_sequence", "unshard_sequence",
]
__version__ = "0.1.0"
