"""`burst_attention`: the user-facing distributed attention, forward and backward (autograd)."""
from __future__ import annotations

import functools
import logging
import math
import zlib
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist

from burstc.config import BurstConfig
from burstc.runtime import stats
from burstc.runtime.kernels import LocalKernel, accumulation_dtype, select_kernel
from burstc.runtime.kernels.reference import ReferenceKernel
from burstc.runtime.ring import ring_backward, ring_forward, row_delta
from burstc.runtime.sharding import assemble, pad_shard, shard_sequence
from burstc.runtime.sinks import apply_sinks
from burstc.runtime.transport import GroupTransport, Held, VirtualTransport
from burstc.runtime.ulysses import ulysses_backward, ulysses_forward
from burstc.runtime.validate import (BurstInputError, CallMeta, agree_across_ranks, agreed_before, local_problem,
                                     remember_agreement, replicated_checksum)
from burstc.runtime.mask_args import MaskArgs
from burstc.schedule import layout as layouts
from burstc.schedule import predict
from burstc.schedule.cost import KV_RING, AttentionShape, backward_for_plan
from burstc.schedule.masks import AttentionMask
from burstc.schedule.plan import ULYSSES_RING, RingPlan, build_plan
from burstc.schedule.topology import Topology, topology_for, ulysses_kv_heads

SEQ_DIM = 2
log = logging.getLogger("burstc.runtime")
_logged_choices: set = set()  # (schedule, shape, topology) already logged


@dataclass(frozen=True)
class RingRun:
    """Everything one call needs besides its tensors.

    inputs: what the call's tensors are. "shard": this rank's shard (burst_attention under a group).
    "full": the whole sequence, identical on every rank of the group (the compiled op); each rank
    computes its shard and the results are gathered. "virtual": the whole sequence, and this process
    runs all G ranks (rank is None). topology: the group's nodes and links; the plan's schedule says
    how chunks travel over them (plan.world_size is the number of nodes for ulysses_ring)."""

    plan: RingPlan
    kernel: LocalKernel
    scheme: str
    scale: float
    group: Optional[dist.ProcessGroup]
    rank: Optional[int]
    timeout_s: float
    inputs: str
    topology: Topology
    mask: Optional[AttentionMask] = None  # the call's structured mask (plan.mask may be a cached twin's)

    @property
    def world_size(self) -> int:
        """Ranks of the group (the layout's shards), whatever the schedule."""
        return self.topology.world_size

    def shard_rows(self) -> int:
        """Rows of every rank's padded shard."""
        return layouts.local_padded_length(self.plan.seq_len, self.plan.layout, self.world_size)

    def valid_rows(self, rank: int) -> int:
        """Real rows of rank's shard."""
        return layouts.local_length(self.plan.seq_len, self.plan.layout, self.world_size, rank)

    def transport(self, phase: str, device: torch.device):
        """The transport over the group's ranks (the ring, or Ulysses' all-to-alls)."""
        link = self.topology.link
        if self.rank is None:
            return VirtualTransport(range(self.world_size), phase, link)
        return GroupTransport(phase, self.group, self.rank, range(self.world_size), self.timeout_s, device, link)

    def to_ranks(self, x: torch.Tensor) -> Held:
        """Padded shards of x for the ranks this process runs."""
        p, g = self.plan, self.world_size
        pad = lambda t: pad_shard(t.contiguous(), dim=SEQ_DIM, rows=self.shard_rows())  # noqa: E731
        if self.inputs == "shard":
            return {self.rank: pad(x)}
        ranks = range(g) if self.rank is None else [self.rank]
        return {r: pad(shard_sequence(x, dim=SEQ_DIM, layout=p.layout, world_size=g, rank=r)) for r in ranks}

    def from_ranks(self, held: Held) -> torch.Tensor:
        """This call's result tensor from per-rank padded shards."""
        p, g = self.plan, self.world_size
        if self.inputs == "shard":
            return held[self.rank].narrow(SEQ_DIM, 0, self.valid_rows(self.rank))
        if self.rank is None:
            shards = [held[r] for r in range(g)]
        else:
            mine = held[self.rank].contiguous()
            shards = [torch.empty_like(mine) for _ in range(g)]
            dist.all_gather(shards, mine, group=self.group)
            stats.count_collective("gather")
        return assemble(shards, dim=SEQ_DIM, layout=p.layout, seq_len=p.seq_len)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[Held, ...]:
        """(out, lse, q, k, v) as per-rank padded shards."""
        qd, kd, vd = self.to_ranks(q), self.to_ranks(k), self.to_ranks(v)
        if self.plan.schedule == ULYSSES_RING:
            out, lse = ulysses_forward(self, qd, kd, vd, q.device)
        else:
            out, lse = ring_forward(self.plan, self.transport("forward", q.device), self.kernel, qd, kd, vd,
                                    self.scale, mask=self.mask)
        return out, lse, qd, kd, vd

    def backward(self, qd: Held, kd: Held, vd: Held, out: Held, lse: Held, dout: torch.Tensor,
                 dlse: Optional[Held] = None, bias_grad: bool = False):
        """(dq, dk, dv, dbias): dq, dk, dv tensors of the call's kind (shards or full), in the input dtype.
        dlse: the gradient of lse per rank (attention sinks read lse), which enters as D - dlse. bias_grad:
        also the gradient of the materialised additive attn_mask (a learned bias; shaped like it, summed
        over the ranks when every rank holds it whole), else dbias is None."""
        dtype = next(iter(qd.values())).dtype
        dd = self.to_ranks(dout.to(dtype))
        delta = None
        if dlse is not None:  # then the kernels must not derive D from out: they get D alone
            delta = {r: row_delta(dd[r], out[r]) - dlse[r].to(lse[r].dtype) for r in dd}
        dbias = self._bias_accumulator(dtype) if bias_grad else None
        if self.plan.schedule == ULYSSES_RING:
            if dbias is not None:
                raise BurstInputError("a learned attn_mask's gradient needs the ring or double_ring schedule")
            grads = ulysses_backward(self, qd, kd, vd, out, dd, lse, dout.device, delta=delta)
        else:
            grads = ring_backward(self.plan, self.transport("backward", dout.device), self.kernel, self.scheme,
                                  qd, kd, vd, out if delta is None else None, dd, lse, self.scale, delta=delta,
                                  mask=self.mask, dbias=dbias)
        grads = tuple(self.from_ranks({r: t.to(dtype) for r, t in g.items()}) for g in grads)
        if dbias is not None and self.inputs == "full" and self.world_size > 1:
            dist.all_reduce(dbias, group=self.group)  # each rank added its own query rows
            stats.count_collective("gather")
        return (*grads, None if dbias is None else dbias.to(self.mask.dense.dtype))

    def _bias_accumulator(self, dtype: torch.dtype) -> torch.Tensor:
        dense = self.mask.dense if self.mask is not None else None
        if dense is None or dense.dtype == torch.bool:
            raise BurstInputError("only an additive floating attn_mask has a gradient")
        if self.scheme != KV_RING:
            raise BurstInputError("a learned attn_mask's gradient needs backward='kv_ring'")
        return torch.zeros(dense.shape, dtype=accumulation_dtype(dtype), device=dense.device)


def group_members(group: Optional[dist.ProcessGroup], world_size: int) -> Optional[list[int]]:
    """The global ranks of the group's ranks (None when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return [dist.get_global_rank(group or dist.group.WORLD, r) for r in range(world_size)]


def _plan_call(meta: CallMeta, seq_len: int, world_size: int, topology: Topology, schedule: str, mask,
               cfg: BurstConfig, rank: Optional[int] = None) -> tuple[RingPlan, str]:
    """The call's plan under its schedule (the requested one, or the cost model's pick for 'auto';
    logged once per call shape) and its backward scheme. rank: this process's rank (None: virtual ranks,
    all in this process): it builds only its share of a ring plan (a ulysses ring's plan stays whole)."""
    shape = AttentionShape(batch=meta.batch, heads_q=meta.heads_q, heads_kv=meta.heads_kv, head_dim=meta.head_dim,
                           local_rows=layouts.local_padded_length(seq_len, meta.layout, world_size),
                           world_size=world_size, dtype=meta.dtype)
    try:
        chosen, predictions = _choose_schedule(
            shape, topology.world_size, topology.node_size, _links_key(topology), schedule, meta.causal,
            meta.backward, cfg.tflops * 1e12, mask is not None and mask.per_head)
    except ValueError as e:
        raise BurstInputError(f"burst_attention: {e}") from e
    if predictions and (chosen, shape, topology.describe()) not in _logged_choices:
        if len(_logged_choices) > 1024:  # dynamic lengths: keep the set small, at worst log again
            _logged_choices.clear()
        _logged_choices.add((chosen, shape, topology.describe()))
        log.info("burst: attention [B=%s, H=%s/%s, N=%s] on %s: schedule %s", shape.batch, shape.heads_q,
                 shape.heads_kv, seq_len, topology.describe(), predict.summary(chosen, predictions))
    plan = build_plan(world_size, meta.layout, seq_len, meta.causal, mask=mask, tile=cfg.mask_tile, schedule=chosen,
                      node_size=topology.node_size, rank=rank if chosen != ULYSSES_RING else None)
    if chosen == ULYSSES_RING:  # the ring over the nodes carries head-sharded node chunks
        shape = replace(shape, heads_q=shape.heads_q // topology.node_size,
                        heads_kv=ulysses_kv_heads(shape.heads_q, shape.heads_kv, topology.node_size),
                        world_size=plan.world_size)
    return plan, backward_for_plan(shape, plan, meta.backward)


def _links_key(topology: Topology) -> tuple:
    return tuple(sorted(topology.links.items()))


@functools.lru_cache(maxsize=256)
def _choose_schedule(shape: AttentionShape, world_size: int, node_size: int, links: tuple, requested: str,
                     causal: bool, scheme: str, flops_per_s: float, per_head_mask: bool):
    """predict.choose_schedule, cached: the same call shape is planned once, not on every call."""
    return predict.choose_schedule(shape, Topology(world_size, node_size, dict(links)), requested, causal=causal,
                                   scheme=scheme, flops_per_s=flops_per_s, per_head_mask=per_head_mask)


class _BurstAttention(torch.autograd.Function):
    """(out, lse) of a RingRun; both differentiable (an lse nobody reads gets no gradient), and so is a
    learned additive attn_mask passed as `bias` (None otherwise)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, run: RingRun):
        out, lse, qd, kd, vd = run.forward(q, k, v)
        ctx.run = run
        ctx.ranks = tuple(qd)
        ctx.save_for_backward(*(d[r] for d in (qd, kd, vd, out, lse) for r in ctx.ranks))
        ctx.set_materialize_grads(False)
        return run.from_ranks(out), run.from_ranks(lse)

    @staticmethod
    def backward(ctx, dout, dlse):
        n = len(ctx.ranks)
        saved = ctx.saved_tensors
        qd, kd, vd, out, lse = ({r: saved[i * n + j] for j, r in enumerate(ctx.ranks)} for i in range(5))
        if dout is None:
            dout = ctx.run.from_ranks({r: torch.zeros_like(o) for r, o in out.items()})
        dlse = ctx.run.to_ranks(dlse) if dlse is not None else None
        *grads, dbias = ctx.run.backward(qd, kd, vd, out, lse, dout, dlse, bias_grad=ctx.needs_input_grad[3])
        return (*grads, dbias, None)


def burst_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, enable_gqa: bool = False,
                    group: Optional[dist.ProcessGroup] = None, layout: Optional[str] = None,
                    backward: Optional[str] = None, kernel: Optional[str] = None,
                    virtual_world_size: Optional[int] = None, attn_mask=None,
                    dropout_p: float = 0.0, key_padding_mask: Optional[torch.Tensor] = None,
                    document_ids: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                    window: Optional[tuple[Optional[int], Optional[int]]] = None,
                    mask_mod=None, schedule: Optional[str] = None, node_size: Optional[int] = None,
                    sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """Exact attention over a sequence sharded across the ranks of `group` (BurstAttention).

    q, k, v: this rank's shard, [B, H, S_local, d] like `F.scaled_dot_product_attention`'s inputs
    (k, v may have fewer heads with enable_gqa=True), sharded by `burstc.shard_sequence` for
    `layout`. Returns this rank's shard of the attention output, as single-device SDPA computes it on
    the gathered sequence; differentiable.

    causal: causal mask over *global* token positions. scale: default 1/sqrt(d).
    group: the process group of the ring (default: the default group; none initialised means one
        device). layout: 'contiguous', 'zigzag' (default) or 'striped'.
    backward: 'query_ring' (BurstAttention: queries travel, K/V stay), 'kv_ring' (K/V travel) or
        'auto' (default: the scheme that sends fewer bytes for these shapes and dtypes).
    kernel: 'auto' (default), 'cpu', 'reference' (plain torch, float64 too) or 'triton'.
    virtual_world_size: run the G-rank ring in this process (no group); q, k, v are then the full
        tensors and so is the result.
    dropout_p: accepted only as 0.0 (anything else raises BurstInputError naming the fix).

    Masks, all over *global* token positions, combinable with each other and with causal (the plan
    skips the compute of empty tiles and the transfer of chunks nobody later needs):
    key_padding_mask: [B, N] bool, True = attend (a tokenizer's attention_mask).
    document_ids: [B, N] int, tokens attend only within their document (packed sequences);
        cu_seqlens ([0, l0, l0 + l1, ..., N], one sequence of packed documents) is the same thing.
    window: (left, right): query i sees keys in [i - left, i + right]; None = unbounded on that side
        (a Mistral/Gemma sliding window w is (w - 1, 0) with causal=True). Use layout='contiguous'
        with short windows: the ring then shrinks to a halo exchange with the neighbours.
    mask_mod: FlexAttention's mask_mod(b, h, q_idx, kv_idx) -> bool on global indices, evaluated
        tile by tile on broadcast index tensors.
    attn_mask: the materialised fallback: bool (True = attend) or additive, [B|1, H|1, L, N] for
        this rank's query rows over all N keys (with virtual_world_size: [B|1, H|1, N, N]). Forces
        the kv_ring backward (the rows stay with their queries). An additive mask that requires grad
        (a learned bias) gets its gradient (computed by the reference kernel for now).
    Rows with no visible key return 0 with zero gradients, as single-device SDPA does.

    sinks: one learned logit per query head ([H_q]) that joins every row's softmax as an extra column
        and is dropped after it (GPT-OSS's attention sinks; burstc.runtime.sinks): applied once to the
        ring's result from the global log-sum-exp; differentiable, its gradient summed over this
        rank's rows (sum it over the ranks like any replicated parameter's).
    softcap: the scores are soft-capped as softcap * tanh(S / softcap) before the mask (Gemma 2); runs
        on the triton kernel (kernel='triton', or 'auto' on CUDA) and the reference kernel ('auto' on CPU,
        or 'reference'); not on the cpu kernel, nor with a learned attn_mask's gradient (reference only).

    schedule: how chunks travel when the group spans several nodes: 'ring' (one flat ring),
        'double_ring' (an inner ring per node, an outer ring across nodes: a chunk crosses the
        inter-node link once per inner cycle), 'ulysses_ring' (an all-to-all inside each node turns
        sequence shards into head shards, a ring runs across nodes; needs the query heads to divide
        by node_size and no per-head mask) or 'auto' (default: the least predicted time, from the
        cost model of burstc.schedule.predict and the link figures of burstc.config).
    node_size: ranks per node of the machine (default: BURST_NODE_SIZE, else torchrun's
        LOCAL_WORLD_SIZE, else one node); nodes hold consecutive global ranks, so the group's nodes
        follow from its members. With virtual_world_size the virtual ranks pose as nodes of this size.
    Defaults of layout/backward/kernel/schedule, the link figures and the transfer timeout come
    from BURST_* environment variables (burstc.config).
    """
    masks = MaskArgs(key_padding_mask=key_padding_mask, document_ids=document_ids, cu_seqlens=cu_seqlens,
                     window=window, mask_mod=mask_mod, attn_mask=attn_mask)
    bias = attn_mask if isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad else None
    run = prepare_run(q, k, v, causal=causal, scale=scale, enable_gqa=enable_gqa, softcap=softcap,
                      bias_grad=bias is not None and torch.is_grad_enabled(), group=group,
                      layout=layout, backward=backward, kernel=kernel, virtual_world_size=virtual_world_size,
                      dropout_p=dropout_p, masks=masks, schedule=schedule, node_size=node_size)
    out, lse = _BurstAttention.apply(q, k, v, bias, run)
    return out if sinks is None else apply_sinks(out, lse, sinks)


def _choose_kernel(name: str, q: torch.Tensor, softcap: Optional[float], bias_grad: bool) -> LocalKernel:
    """The local kernel. Soft-capped scores run on the triton kernel where the kernel resolves to it
    (kernel='triton', or 'auto' on CUDA), else on the reference kernel (torch math; each work item's scores
    are materialised), as does a learned bias's gradient: the cpu kernel has neither, triton no bias gradient."""
    if softcap is None and not bias_grad:
        return select_kernel(name, q)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r}: a soft-cap is a positive number")
    if not bias_grad and (name == "triton" or (name == "auto" and q.device.type == "cuda")):
        if select_kernel(name, q).name == "triton":  # (raises if kernel='triton' cannot run these inputs)
            from burstc.runtime.kernels.triton import TritonKernel
            return TritonKernel(softcap=softcap)
    need = "a learned attn_mask's gradient" if bias_grad else "soft-capped scores"
    if name not in ("auto", "reference"):
        fix = "kernel='auto' (the reference kernel)" if bias_grad else \
            "kernel='triton' (CUDA, or TRITON_INTERPRET=1) or kernel='auto'"
        raise ValueError(f"kernel={name!r} does not compute {need}: use {fix}")
    if name == "auto" and need not in _logged_choices:
        _logged_choices.add(need)
        log.warning("burst: the reference kernel computes %s (torch math, each work item's scores materialised); "
                    "the cpu kernel has no such path%s", need,
                    "" if bias_grad else " (soft-caps run on the triton kernel on CUDA)")
    return ReferenceKernel(softcap=softcap)


def prepare_run(q, k, v, *, causal: bool, scale: Optional[float], enable_gqa: bool,
                softcap: Optional[float] = None, bias_grad: bool = False,
                group: Optional[dist.ProcessGroup], layout: Optional[str], backward: Optional[str],
                kernel: Optional[str], virtual_world_size: Optional[int] = None,
                dropout_p: float = 0.0, full_sequence: bool = False, check_replicas: bool = True,
                masks: Optional["MaskArgs"] = None, schedule: Optional[str] = None,
                node_size: Optional[int] = None, site_key: str = "") -> RingRun:
    """Validate a call (on every rank) and build its RingRun. full_sequence: q, k, v are the whole
    sequence on every rank of the group (the compiled op) instead of this rank's shard;
    check_replicas: fingerprint them to prove every rank holds the same (a pass over q, k, v).
    site_key: a compiled site's key (graph, site, global length; alike on every rank): the ranks then agree
    on the first call with each local shape only, and later calls make no collective and no host copy
    here; '' agrees on every call (the eager API, checks='always', verify). softcap: the scores are
    soft-capped as softcap * tanh(S / softcap) before the mask. bias_grad: the run's backward will also
    give the additive attn_mask's gradient (a learned bias: the kv_ring and the reference kernel)."""
    cfg = BurstConfig.from_env()
    masks = masks or MaskArgs()
    layout = layout or cfg.layout
    if layout == "auto":  # inputs this call shards itself: pick per mask; inputs sharded by the caller: zigzag
        layout = masks.preferred_layout(causal) if full_sequence or virtual_world_size is not None else "zigzag"
    backward = backward or cfg.backward
    if bias_grad:
        backward = KV_RING  # the mask's gradient rows stay with their queries (results are alike either way)
    kernel = kernel or cfg.kernel
    schedule = schedule or cfg.schedule
    node_size = node_size or cfg.node_size

    if virtual_world_size is not None:
        if group is not None:
            raise BurstInputError("pass either group= (real ranks) or virtual_world_size= (one process), not both")
        if virtual_world_size < 1:
            raise BurstInputError(f"virtual_world_size must be >= 1, got {virtual_world_size}")
        world_size, rank = virtual_world_size, None
    elif dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        if rank < 0:
            raise BurstInputError("this process is not a member of the group passed to burst_attention")
    elif group is not None:
        raise BurstInputError("group= was given but torch.distributed is not initialised: call "
                              "dist.init_process_group first (torchrun sets up the environment)")
    else:
        world_size, rank = 1, None

    problem = local_problem(q, k, v, enable_gqa=enable_gqa, layout=layout, backward=backward,
                            dropout_p=dropout_p, schedule=schedule) or masks.problem(q)
    topology = None
    if problem is None:
        try:
            members = group_members(group, world_size) if rank is not None else None  # None: virtual ranks
            topology = topology_for(world_size, node_size, cfg.links(), members=members)
        except ValueError as e:
            problem = str(e)
    local_kernel = None
    if problem is None:
        try:
            local_kernel = _choose_kernel(kernel, q, softcap, bias_grad)
        except ValueError as e:
            problem = str(e)
    meta = None
    if problem is None:
        meta = CallMeta(batch=q.shape[0], heads_q=q.shape[1], heads_kv=k.shape[1], head_dim=q.shape[3],
                        local_len=q.shape[SEQ_DIM], dtype=q.dtype, causal=bool(causal), layout=layout,
                        backward=backward, scale=float(scale if scale is not None else 1.0 / math.sqrt(q.shape[3])),
                        needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
                        softcap=softcap,
                        mask_code=masks.code(content=not site_key), schedule=schedule, node_size=topology.node_size,
                        cost_code=zlib.crc32(repr((_links_key(topology), cfg.tflops)).encode()))
    distributed = rank is not None and world_size > 1
    metas = agreed_before(site_key, meta, group) if distributed and site_key and meta is not None else None
    if distributed and metas is None:
        agreed = meta
        if meta is not None and site_key:  # the first call of a compiled site: the mask values count too
            agreed = replace(meta, mask_code=masks.code())
        if meta is not None and full_sequence and check_replicas:
            agreed = replace(agreed, checksum=replicated_checksum(q, k, v))
        metas = agree_across_ranks(agreed, problem, group, rank, world_size, q.device, full_sequence)
        if site_key:
            remember_agreement(site_key, meta, group, metas)
    if distributed:
        seq_len = metas[0].local_len if full_sequence else sum(m.local_len for m in metas)
    else:
        if problem is not None:
            raise BurstInputError(f"burst_attention: {problem}")
        seq_len = q.shape[SEQ_DIM]
        rank = None  # one process runs every rank of the plan
    if seq_len < 1:
        raise BurstInputError("burst_attention needs at least one token")

    inputs = "virtual" if rank is None else "full" if full_sequence else "shard"
    try:
        mask, proven_causal = masks.build_proven(bool(causal), seq_len, q, layout, world_size,
                                                 rank if inputs == "shard" else None)
    except ValueError as e:
        raise BurstInputError(f"burst_attention: {e}") from e
    if proven_causal != bool(causal):  # recognised descriptors disproven: the model's mask code runs alone
        meta = replace(meta, causal=proven_causal)
    plan, scheme = _plan_call(meta, seq_len, world_size, topology, schedule, mask, cfg, rank)
    return RingRun(plan=plan, kernel=local_kernel, scheme=scheme, scale=meta.scale,
                   group=group, rank=rank, timeout_s=cfg.timeout_s, inputs=inputs, topology=topology,
                   mask=mask)
