"""`burst::attention`: burst attention as one opaque, differentiable torch.library op for compiled graphs.

`burst::attention` (attention-parallel mode) takes the whole sequence (identical on every rank of the
group), computes this rank's shard of the ring and gathers the output, so a graph rewritten to call it
computes what it computed before. All point-to-point transfers stay inside the op (never traced into a graph). Its backward is
the op `burst::attention_backward`, which gathers full dq, dk, dv: every rank holds the same upstream
gradient, so taking its own shard of each gathered gradient is the exact adjoint.
`burst::attention_local` (sequence mode) takes and returns this rank's shards: nothing is gathered.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from burstc.runtime import stats
from burstc.runtime.attention import prepare_run
from burstc.runtime.mask_args import MaskArgs
from burstc.runtime.mask_mods import BoundMaskMod
from burstc.runtime.modified_sdpa import modified_sdpa, softcapped
from burstc.runtime.ordering import program_order
from burstc.runtime.kernels import accumulation_dtype
from burstc.runtime.sharding import unshard_sequence

_verified_sites: set[str] = set()
_verified_backward: set[str] = set()


class BurstVerificationError(RuntimeError):
    """A converted attention disagreed with plain SDPA on the same inputs (options verify=True)."""


def resolve_group(group_name: str) -> Optional[dist.ProcessGroup]:
    """'' is the default group; otherwise a process group's `group_name`."""
    if not group_name:
        return None
    return dist.distributed_c10d._resolve_process_group(group_name)


# Every op takes the same mask arguments after q, k, v: a materialised attn_mask (bool or additive;
# [B|1, H|1, N, N], or this rank's rows in sequence mode) and/or the compact descriptors a recognised
# mask construction became (key padding [B, N], document ids [B, N], a window, a registered FlexAttention
# mask_mod with its captured tensors mask_buffers), all over global positions. mask_proof names the model's
# own mask code (its leaves in mask_buffers), against which recognised descriptors are proven on the
# first call (burstc.runtime.mask_proof). Options follow; site_key (the compiled site's graph, name and global
# length, alike on every rank: the ranks agree on its first call with each shape only; '' on every call)
# and verify_site come last.

def _masks(attn_mask, key_padding, document_ids, mask_buffers, window_left, window_right, mask_mod,
           mask_proof) -> MaskArgs:
    window = None if window_left is None and window_right is None else (window_left, window_right)
    return MaskArgs(key_padding_mask=key_padding, document_ids=document_ids, window=window, attn_mask=attn_mask,
                    mask_mod=BoundMaskMod(mask_mod, mask_buffers) if mask_mod else None,
                    proof=BoundMaskMod(mask_proof, mask_buffers) if mask_proof else None)


def _run(q, k, v, attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right, mask_mod,
         mask_proof, scale, softcap, enable_gqa, layout, backward, kernel, schedule, node_size, group_name, site_key,
         full_sequence: bool, check_replicas: bool = False, bias_grad: bool = False):
    return prepare_run(q, k, v, causal=causal, scale=scale, softcap=softcap, bias_grad=bias_grad,
                       enable_gqa=enable_gqa, group=resolve_group(group_name), layout=layout, backward=backward,
                       kernel=kernel, full_sequence=full_sequence, site_key=site_key,
                       check_replicas=check_replicas, schedule=schedule, node_size=node_size or None,
                       masks=_masks(attn_mask, key_padding, document_ids, mask_buffers, window_left, window_right,
                                    mask_mod, mask_proof))


@torch.library.custom_op("burst::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
              key_padding: Optional[torch.Tensor], document_ids: Optional[torch.Tensor],
              mask_buffers: list[torch.Tensor], causal: bool, window_left: Optional[int],
              window_right: Optional[int], mask_mod: str, mask_proof: str, scale: Optional[float],
              softcap: Optional[float],
              enable_gqa: bool, layout: str, backward: str, kernel: str, schedule: str, node_size: int, group_name: str,
              site_key: str, verify_site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of exact attention over the full sequence q, k, v ([B, H, N, d]); lse [B, H, N].
    verify_site: '' or a site name whose first call is checked against F.scaled_dot_product_attention."""
    masks = (attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right, mask_mod,
             mask_proof)
    run = _run(q, k, v, *masks, scale, softcap, enable_gqa, layout, backward, kernel, schedule, node_size, group_name,
               site_key, full_sequence=True, check_replicas=True)
    out, lse = _forward(run, q, k, v)
    if verify_site and verify_site not in _verified_sites:
        _verify(verify_site, q, k, v, out, run.plan.mask, causal, scale, softcap, enable_gqa)
        _verified_sites.add(verify_site)
    return out, lse


def _forward(run, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the call's kind (full or this rank's shard), contiguous."""
    stats.count("forward_calls", 1)
    out, lse, *_ = run.forward(q, k, v)
    return run.from_ranks(out).contiguous(), run.from_ranks(lse).contiguous()


def _grads(run, dout, q, k, v, out, lse, dlse, bias_grad) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dbias) of the call's kind, contiguous; dlse: the gradient of lse, or None; dbias: the
    additive attn_mask's gradient when bias_grad, else an empty tensor."""
    stats.count("backward_calls", 1)
    qd, kd, vd, od, ld = (run.to_ranks(t) for t in (q, k, v, out, lse))
    dlse = run.to_ranks(dlse) if dlse is not None else None
    *grads, dbias = run.backward(qd, kd, vd, od, ld, dout, dlse, bias_grad=bias_grad)
    return (*(g.contiguous() for g in grads), q.new_empty(0) if dbias is None else dbias)


def _fake_forward(q, *_):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=accumulation_dtype(q.dtype))


def _fake_grads(dout, q, k, v, out, lse, dlse, bias_grad, attn_mask, *_):
    dbias = attn_mask.new_empty(attn_mask.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


attention.register_fake(_fake_forward)


@torch.library.custom_op("burst::attention_backward", mutates_args=())
def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, dlse: Optional[torch.Tensor], bias_grad: bool,
                       attn_mask: Optional[torch.Tensor],
                       key_padding: Optional[torch.Tensor],
                       document_ids: Optional[torch.Tensor], mask_buffers: list[torch.Tensor], causal: bool,
                       window_left: Optional[int], window_right: Optional[int], mask_mod: str,
                       mask_proof: str, scale: Optional[float], softcap: Optional[float], enable_gqa: bool, layout: str,
                       backward: str, kernel: str, schedule: str, node_size: int, group_name: str,
                       site_key: str, verify_site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias) over the full sequence, given the forward's out and lse and the gradient of lse
    (None unless lse is used: attention sinks); dbias: the whole attn_mask's gradient when bias_grad (a
    learned bias), else empty. verify_site: '' or the site whose first backward is checked against SDPA's
    gradients."""
    # the forward proved q, k, v identical across ranks; the backward gets the saved ones back
    run = _run(q, k, v, attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right,
               mask_mod, mask_proof, scale, softcap, enable_gqa, layout, backward, kernel, schedule, node_size,
               group_name, site_key, full_sequence=True, bias_grad=bias_grad)
    grads = _grads(run, dout, q, k, v, out, lse, dlse, bias_grad)
    if verify_site and verify_site not in _verified_backward:
        _verify_grads(verify_site, q, k, v, dout, dlse, grads[:3], run.plan.mask, causal, scale, softcap)
        _verified_backward.add(verify_site)
    return grads


attention_backward.register_fake(_fake_grads)

_MASK_TENSORS = 3  # attn_mask, key_padding, document_ids (may be None), then the list mask_buffers


def _setup_context(ctx, inputs, output):
    q, k, v, *rest = inputs
    out, lse = output
    buffers = rest[_MASK_TENSORS]
    ctx.save_for_backward(q, k, v, out, lse, *rest[:_MASK_TENSORS], *buffers)
    ctx.options = rest[_MASK_TENSORS + 1:]  # the options, verify_site last
    ctx.set_materialize_grads(False)  # an lse nobody reads has no gradient: None, not zeros


def _backward_through(backward_op):
    """The autograd formula of an attention op whose (dq, dk, dv, dbias) come from backward_op. lse is
    differentiable (attention sinks read it): its gradient enters the ring as D - dlse. An additive
    attn_mask that requires grad (a learned bias, e.g. T5's relative positions) gets its gradient dS."""
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *masks = ctx.saved_tensors
        tensors, buffers = masks[:_MASK_TENSORS], list(masks[_MASK_TENSORS:])
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        bias_grad = ctx.needs_input_grad[3]  # attn_mask
        *grads, dbias = backward_op(dout, q, k, v, out, lse, dlse, bias_grad, *tensors, buffers, *ctx.options)
        # no gradients for the other masks; the list argument mask_buffers gets a list
        return (*grads, dbias if bias_grad else None, *[None] * (_MASK_TENSORS - 1), [None] * len(buffers),
                *[None] * len(ctx.options))
    return backward


attention.register_autograd(_backward_through(attention_backward), setup_context=_setup_context)


def _sdpa(q, k, v, mask, causal, scale, softcap, enable_gqa) -> torch.Tensor:
    """Plain SDPA on the full sequence (modified_sdpa with a soft-cap), the call's mask (an AttentionMask or
    None) materialised (N x N: a debugging aid)."""
    dense = None
    if mask is not None:
        dense = _materialised(mask, q)
        dense = dense if dense.dtype == torch.bool else dense.to(q.dtype)
    if softcap is not None:
        return modified_sdpa(q, k, v, attn_mask=dense, is_causal=causal and dense is None, scale=scale,
                             enable_gqa=enable_gqa, softcap=softcap).to(q.dtype)
    if dense is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale, enable_gqa=enable_gqa)


def _materialised(mask, q: torch.Tensor) -> torch.Tensor:
    """An AttentionMask over the whole sequence of q as one [B|1, H|1, N, N] tensor, on q's device."""
    positions = torch.arange(q.shape[2])
    return mask.evaluate(positions, positions, q.shape[1]).to(q.device)


def _verify(site, q, k, v, out, mask, causal, scale, softcap, enable_gqa) -> None:
    """The first forward of a site against SDPA."""
    _compare(site, "output", out, _sdpa(q, k, v, mask, causal, scale, softcap, enable_gqa))


def _verify_grads(site, q, k, v, dout, dlse, grads, mask, causal, scale, softcap) -> None:
    """The first backward of a site against SDPA's gradients on the same inputs (and, where the lse is used
    downstream, as attention sinks use it, its gradient dlse), from the textbook formulas in float64
    (autograd is not available inside an op's implementation)."""
    want = _sdpa_grads(q, k, v, dout, mask, causal, scale, softcap, dlse)
    for name, got, expected in zip(("dq", "dk", "dv"), grads, want):
        _compare(site, name, got, expected.to(got.dtype))


def _sdpa_grads(q, k, v, dout, mask, causal, scale, softcap=None, dlse=None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of softmax(q k^T * scale [+ mask]) v: P = softmax(S), dV = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(dP * P)), dQ = dS K * scale, dK = dS^T Q * scale; K/V heads repeated for
    grouped-query attention and their gradients summed back. A soft-cap c scores c * tanh(S / c) and
    multiplies dS by 1 - tanh(S / c)^2. dlse, the gradient of the row's log-sum-exp: dS = P * (dP - rowsum(dP *
    P) + dlse)."""
    n, group = q.shape[2], q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qd, kd, vd, do = (t.double() for t in (q, k, v, dout))
    kd, vd = kd.repeat_interleave(group, dim=1), vd.repeat_interleave(group, dim=1)
    raw = torch.matmul(qd, kd.transpose(-1, -2)) * scale
    s = softcapped(raw, softcap)
    if mask is not None:
        dense = _materialised(mask, q)
        s = s.masked_fill(~dense, float("-inf")) if dense.dtype == torch.bool else s + dense.double()
    elif causal:
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))  # rows with no key: 0
    dp = torch.matmul(do, vd.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True) + (0.0 if dlse is None else dlse.double().unsqueeze(-1)))
    if softcap is not None:
        ds = ds * (1 - torch.tanh(raw / softcap) ** 2)
    dq = torch.matmul(ds, kd) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qd) * scale
    dv = torch.matmul(p.transpose(-1, -2), do)
    fold = lambda t: t.view(t.shape[0], -1, group, *t.shape[2:]).sum(dim=2)  # noqa: E731
    return dq, fold(dk), fold(dv)


def _compare(site: str, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.double() - want.double()).abs().max().item()
    bound = {torch.float64: 1e-9, torch.float32: 1e-4}.get(want.dtype, 3e-2) * max(1.0, want.abs().max().item())
    if not math.isfinite(err) or err > bound:
        raise BurstVerificationError(
            f"burst: attention site {site}: its {what} differs from F.scaled_dot_product_attention's by {err:.3e} "
            f"(allowed {bound:.1e} for {want.dtype}). This is a burstc bug: please report it with the site's "
            f"plan; meanwhile compile with options={{'exclude': ['{site.split('/')[-1]}']}}.")


# --- sequence mode: q, k, v are this rank's shard (the graph itself is sharded) -----------------------

@torch.library.custom_op("burst::attention_local", mutates_args=())
def attention_local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                    key_padding: Optional[torch.Tensor], document_ids: Optional[torch.Tensor],
                    mask_buffers: list[torch.Tensor], causal: bool, window_left: Optional[int],
                    window_right: Optional[int], mask_mod: str, mask_proof: str, scale: Optional[float],
                    softcap: Optional[float],
                    enable_gqa: bool, layout: str, backward: str, kernel: str, schedule: str, node_size: int, group_name: str,
                    site_key: str, verify_site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of this rank's shard of exact attention; q, k, v ([B, H, S_local, d]) are this rank's
    tokens in the layout's order (sequence mode), attn_mask this rank's query rows over all keys. No
    gather: the output stays sharded."""
    masks = (attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right, mask_mod,
             mask_proof)
    run = _run(q, k, v, *masks, scale, softcap, enable_gqa, layout, backward, kernel, schedule, node_size, group_name,
               site_key, full_sequence=False)
    out, lse = _forward(run, q, k, v)
    if verify_site and verify_site not in _verified_sites:
        full = [unshard_sequence(t, dim=2, layout=layout, group=run.group) for t in (q, k, v, out)]
        mask = _full_mask(attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right,
                          mask_mod, mask_proof, run, full[0], layout)
        _verify(verify_site, *full, mask, causal, scale, softcap, enable_gqa)
        _verified_sites.add(verify_site)
    return out, lse


def _full_mask(attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right, mask_mod,
               mask_proof, run, q_full, layout):
    """The AttentionMask of a sequence-mode call over the whole sequence (attn_mask rows gathered)."""
    if attn_mask is not None:
        attn_mask = unshard_sequence(attn_mask.contiguous(), dim=2, layout=layout, group=run.group)
    masks = _masks(attn_mask, key_padding, document_ids, mask_buffers, window_left, window_right, mask_mod, mask_proof)
    return masks.build_proven(causal, run.plan.seq_len, q_full, layout, 1, None)[0]


attention_local.register_fake(_fake_forward)


@torch.library.custom_op("burst::attention_local_backward", mutates_args=())
def attention_local_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor], bias_grad: bool,
                             attn_mask: Optional[torch.Tensor],
                             key_padding: Optional[torch.Tensor], document_ids: Optional[torch.Tensor],
                             mask_buffers: list[torch.Tensor], causal: bool, window_left: Optional[int],
                             window_right: Optional[int], mask_mod: str, mask_proof: str, scale: Optional[float],
                             softcap: Optional[float],
                             enable_gqa: bool, layout: str, backward: str, kernel: str, schedule: str,
                             node_size: int, group_name: str, site_key: str,
                             verify_site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias) shards, given the forward's out and lse shards and the gradient of lse (or None);
    dbias: this rank's rows of the attn_mask's gradient when bias_grad, else empty."""
    run = _run(q, k, v, attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right,
               mask_mod, mask_proof, scale, softcap, enable_gqa, layout, backward, kernel, schedule, node_size,
               group_name, site_key, full_sequence=False, bias_grad=bias_grad)
    grads = _grads(run, dout, q, k, v, out, lse, dlse, bias_grad)
    if verify_site and verify_site not in _verified_backward:
        gather = lambda t: unshard_sequence(t.contiguous(), dim=2, layout=layout, group=run.group)  # noqa: E731
        full = [gather(t) for t in (q, k, v, dout)]
        mask = _full_mask(attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right,
                          mask_mod, mask_proof, run, full[0], layout)
        _verify_grads(verify_site, *full, None if dlse is None else gather(dlse), [gather(g) for g in grads[:3]],
                      mask, causal, scale, softcap)
        _verified_backward.add(verify_site)
    return grads


attention_local_backward.register_fake(_fake_grads)
attention_local.register_autograd(_backward_through(attention_local_backward), setup_context=_setup_context)


program_order(torch.ops.burst.attention.default, torch.ops.burst.attention_backward.default,
              torch.ops.burst.attention_local.default, torch.ops.burst.attention_local_backward.default)
