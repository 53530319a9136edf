"""burstc: BurstAttention — exact distributed ring attention over torch.distributed.

Public API:
    burst_attention(q, k, v, *, causal, scale, enable_gqa, group, layout, backward, kernel,
                    virtual_world_size, masks..., schedule, node_size)
                                                 distributed attention on this rank's shard
    shard_sequence / unshard_sequence / shard_positions / local_length
                                                 layouts: who holds which tokens
    build_plan                                   the ring plan (printable, checked)
    comm_stats                                   bytes / steps / skipped pairs of the calls in a block
    trace                                        Chrome trace + summary of the ring steps in a block
    convert / backend                            torch.compile(model, backend="burst")
    BurstConfig, BurstInputError
"""
from burstc.config import BurstConfig
from burstc.debug.trace import trace
from burstc.runtime.attention import burst_attention
from burstc.runtime.sequence_shard import SequenceShard
from burstc.runtime.sharding import shard_sequence, unshard_sequence
from burstc.runtime.stats import CommStats, comm_stats
from burstc.runtime.validate import BurstInputError
from burstc.schedule.layout import LAYOUTS, local_length, shard_positions
from burstc.schedule.plan import RingPlan, build_plan

__all__ = [
    "BurstConfig", "BurstInputError", "CommStats", "LAYOUTS", "RingPlan", "SequenceShard", "build_plan", "burst_attention",
    "burst_backend", "comm_stats", "convert", "local_length", "shard_positions", "shard_sequence", "trace",
    "unshard_sequence",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The backend (it imports torch._dynamo, seconds) loads on first use: `import burstc` for the
    runtime alone stays quick. torch.compile(backend="burst") finds it through the entry point."""
    if name in ("burst_backend", "convert"):
        from burstc import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'burstc' has no attribute {name!r}")
