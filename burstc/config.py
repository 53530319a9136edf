"""One options dataclass for burstc. `torch.compile(..., options={...})` keys and BURST_* environment
variables (handy under torchrun) map onto its fields; options win over the environment.

| field     | env               | default  | meaning |
|-----------|-------------------|----------|---------|
| layout    | BURST_LAYOUT      | auto     | contiguous, zigzag or striped sequence layout of the ring; auto: zigzag when some attention is causal or masked over the whole sequence, else contiguous (sliding windows become halo exchanges) |
| backward  | BURST_BACKWARD    | auto     | auto, query_ring or kv_ring backward scheme (auto: fewer bytes) |
| kernel    | BURST_KERNEL      | auto     | auto, cpu, reference or triton local kernel |
| timeout_s | BURST_TIMEOUT_S   | 300      | seconds a rank waits for a ring transfer before raising |
| inner     | BURST_INNER       | inductor | compiler for the rest of the graph: inductor, aot_eager or eager |
| checks    | BURST_CHECKS      | once     | when the ranks' agreement is checked (shapes, options, mask digests, replicated inputs' fingerprints): once per compiled site or graph input and shape, or always (every call: a debugging aid; each check is a small collective and a device-to-host copy) |
| verify    | BURST_VERIFY      | False    | the first forward and backward of each converted site are compared with plain SDPA (and its gradients); a mismatch raises |
| dump_dir  | BURST_DUMP_DIR    | None     | write graphs, plans, pictures and kernels of each compiled graph there |
| exclude   | BURST_EXCLUDE     | ()       | attention sites left as plain SDPA: graph node names ('y_1') or 'file.py:line' (comma-separated in the env) |
| parallel  | BURST_PARALLEL    | auto     | sequence: every rank runs the whole model on its own tokens; attention: only attention is split, the rest runs replicated; auto: sequence when the group has more than one rank |
| outputs   | BURST_OUTPUTS     | lazy     | sequence mode: a graph output with the sequence dim leaves as a SequenceShard (lazy: this rank's rows, gathered only when something reads its values; the next burst graph takes it as it is), is gathered on every rank (gathered), or is this rank's rows as a plain tensor (local, see burstc.shard_positions) |
| mask_tile | BURST_MASK_TILE   | 256      | rows per tile when a structured mask (window, padding, documents, mask_mod, attn_mask) is classified: smaller skips work more finely, larger makes fewer kernel calls |
| schedule  | BURST_SCHEDULE    | auto     | how chunks travel over the nodes: ring (one flat ring), double_ring (inner ring per node, outer ring across nodes), ulysses_ring (all-to-all to head shards inside a node, ring across nodes); auto: the least predicted time per attention (burstc.schedule.predict) |
| node_size | BURST_NODE_SIZE   | None     | ranks per node of the machine (nodes hold consecutive global ranks, as torchrun numbers them; a group's nodes follow from its ranks); None: torchrun's LOCAL_WORLD_SIZE, else the whole group is one node |
| intra_gbs | BURST_INTRA_GBS   | 450      | intra-node link bandwidth per GPU and direction, GB/s (H100 SXM NVLink) |
| inter_gbs | BURST_INTER_GBS   | 50       | inter-node link bandwidth per GPU and direction, GB/s (8 x 400 Gb/s InfiniBand per 8 GPUs) |
| intra_latency_us | BURST_INTRA_LATENCY_US | 5 | intra-node message latency, microseconds |
| inter_latency_us | BURST_INTER_LATENCY_US | 15 | inter-node message latency, microseconds |
| tflops    | BURST_TFLOPS      | 700      | attention kernel throughput per device, TFLOP/s, for the schedule choice |
| group     | -                 | None     | the ring's torch.distributed process group (None: the default group) |
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

from burstc.schedule.cost import BACKWARD_SCHEMES
from burstc.schedule.plan import SCHEDULE_CHOICES
from burstc.schedule.topology import INTER, INTRA, LinkSpec

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
PARALLEL_MODES = ("auto", "sequence", "attention")
OUTPUT_MODES = ("lazy", "gathered", "local")
CHECK_MODES = ("once", "always")
_TRUE = ("1", "true", "yes", "on")
_FLOATS = ("timeout_s", "intra_gbs", "inter_gbs", "intra_latency_us", "inter_latency_us", "tflops")


@dataclass(frozen=True)
class BurstConfig:
    layout: str = "auto"
    backward: str = "auto"
    kernel: str = "auto"
    timeout_s: float = 300.0
    inner: str = "inductor"
    verify: bool = False
    checks: str = "once"
    exclude: tuple[str, ...] = ()
    dump_dir: Optional[str] = None
    parallel: str = "auto"
    outputs: str = "lazy"
    mask_tile: int = 256
    schedule: str = "auto"
    node_size: Optional[int] = None
    intra_gbs: float = 450.0
    inter_gbs: float = 50.0
    intra_latency_us: float = 5.0
    inter_latency_us: float = 15.0
    tflops: float = 700.0
    group: Optional[Any] = None  # torch.distributed.ProcessGroup

    def links(self) -> dict[str, LinkSpec]:
        """The link classes' bandwidths and latencies (burstc.schedule.topology)."""
        return {INTRA: LinkSpec(self.intra_gbs * 1e9, self.intra_latency_us * 1e-6),
                INTER: LinkSpec(self.inter_gbs * 1e9, self.inter_latency_us * 1e-6)}

    @classmethod
    def from_env(cls, environ=os.environ) -> "BurstConfig":
        values = {}
        for f in fields(cls):
            raw = environ.get(f"BURST_{f.name.upper()}")
            if raw is None or raw.strip() == "" or f.name == "group":
                continue
            if f.name in _FLOATS:
                values[f.name] = float(raw)
            elif f.name in ("mask_tile", "node_size"):
                values[f.name] = int(raw)
            elif f.name == "verify":
                values[f.name] = raw.strip().lower() in _TRUE
            elif f.name == "exclude":
                values[f.name] = tuple(s.strip() for s in raw.split(",") if s.strip())
            else:
                values[f.name] = raw
        return cls(**values)

    @classmethod
    def from_options(cls, options: Optional[dict], environ=os.environ) -> "BurstConfig":
        """The environment's config with torch.compile's options on top; unknown keys raise."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown burst option(s) {unknown}: valid options are {sorted(known)}")
        if "exclude" in options:
            options["exclude"] = tuple(options["exclude"])
        cfg = replace(cls.from_env(environ), **options)
        for name, allowed in (("inner", INNER_COMPILERS), ("parallel", PARALLEL_MODES), ("outputs", OUTPUT_MODES),
                              ("schedule", SCHEDULE_CHOICES), ("checks", CHECK_MODES), ("backward", BACKWARD_SCHEMES)):
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
        return cfg

    def sequence_mode(self, world_size: int) -> bool:
        """Whether graphs are partitioned along the sequence (a group of one rank has nothing to split)."""
        return world_size > 1 and self.parallel in ("auto", "sequence")
