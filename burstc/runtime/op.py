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

from burstc.runtime.attention import prepare_run
from burstc.runtime.mask_args import MaskArgs
from burstc.runtime.mask_mods import BoundMaskMod
from burstc.runtime.kernels import accumulation_dtype
from burstc.runtime.sharding import unshard_sequence

_verified_sites: set[str] = set()


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
# mask_mod with its captured tensors mask_buffers), all over global positions. Options follow;
# verify_site comes last.

def _masks(attn_mask, key_padding, document_ids, mask_buffers, window_left, window_right, mask_mod) -> MaskArgs:
    window = None if window_left is None and window_right is None else (window_left, window_right)
    return MaskArgs(key_padding_mask=key_padding, document_ids=document_ids, window=window, attn_mask=attn_mask,
                    mask_mod=BoundMaskMod(mask_mod, mask_buffers) if mask_mod else None)


def _run(q, k, v, attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right, mask_mod,
         scale, enable_gqa, layout, backward, kernel, group_name, full_sequence: bool, check_replicas: bool = False):
    return prepare_run(q, k, v, causal=causal, scale=scale, enable_gqa=enable_gqa, group=resolve_group(group_name),
                       layout=layout, backward=backward, kernel=kernel, full_sequence=full_sequence,
                       check_replicas=check_replicas,
                       masks=_masks(attn_mask, key_padding, document_ids, mask_buffers, window_left, window_right,
                                    mask_mod))


@torch.library.custom_op("burst::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
              key_padding: Optional[torch.Tensor], document_ids: Optional[torch.Tensor],
              mask_buffers: list[torch.Tensor], causal: bool, window_left: Optional[int],
              window_right: Optional[int], mask_mod: str, scale: Optional[float],
              enable_gqa: bool, layout: str, backward: str, kernel: str, group_name: str,
              verify_site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of exact attention over the full sequence q, k, v ([B, H, N, d]); lse [B, H, N].
    verify_site: '' or a site name whose first call is checked against F.scaled_dot_product_attention."""
    masks = (attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right, mask_mod)
    run = _run(q, k, v, *masks, scale, enable_gqa, layout, backward, kernel, group_name, full_sequence=True,
               check_replicas=True)
    out, lse = _forward(run, q, k, v)
    if verify_site and verify_site not in _verified_sites:
        _verify(verify_site, q, k, v, out, run.plan.mask, causal, scale, enable_gqa)
        _verified_sites.add(verify_site)
    return out, lse


def _forward(run, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the call's kind (full or this rank's shard), contiguous."""
    out, lse, *_ = run.forward(q, k, v)
    return run.from_ranks(out).contiguous(), run.from_ranks(lse).contiguous()


def _grads(run, dout, q, k, v, out, lse) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of the call's kind, contiguous."""
    qd, kd, vd, od, ld = (run.to_ranks(t) for t in (q, k, v, out, lse))
    return tuple(g.contiguous() for g in run.backward(qd, kd, vd, od, ld, dout))


def _fake_forward(q, *_):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=accumulation_dtype(q.dtype))


def _fake_grads(dout, q, k, v, *_):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


attention.register_fake(_fake_forward)


@torch.library.custom_op("burst::attention_backward", mutates_args=())
def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, attn_mask: Optional[torch.Tensor], key_padding: Optional[torch.Tensor],
                       document_ids: Optional[torch.Tensor], mask_buffers: list[torch.Tensor], causal: bool,
                       window_left: Optional[int], window_right: Optional[int], mask_mod: str,
                       scale: Optional[float], enable_gqa: bool, layout: str,
                       backward: str, kernel: str, group_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) over the full sequence, given the forward's out and lse."""
    # the forward proved q, k, v identical across ranks; the backward gets the saved ones back
    run = _run(q, k, v, attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right,
               mask_mod, scale, enable_gqa, layout, backward, kernel, group_name, full_sequence=True)
    return _grads(run, dout, q, k, v, out, lse)


attention_backward.register_fake(_fake_grads)

_MASK_TENSORS = 3  # attn_mask, key_padding, document_ids (may be None), then the list mask_buffers


def _setup_context(ctx, inputs, output):
    q, k, v, *rest = inputs
    out, lse = output
    buffers = rest[_MASK_TENSORS]
    ctx.save_for_backward(q, k, v, out, lse, *rest[:_MASK_TENSORS], *buffers)
    ctx.options = rest[_MASK_TENSORS + 1:-1]  # everything but verify_site
    ctx.mark_non_differentiable(lse)


def _backward_through(backward_op):
    """The autograd formula of an attention op whose (dq, dk, dv) come from backward_op."""
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, *masks = ctx.saved_tensors
        tensors, buffers = masks[:_MASK_TENSORS], list(masks[_MASK_TENSORS:])
        grads = backward_op(dout.contiguous(), q, k, v, out, lse, *tensors, buffers, *ctx.options)
        # no gradients for masks; the list argument mask_buffers gets a list
        return (*grads, *[None] * _MASK_TENSORS, [None] * len(buffers), *[None] * (len(ctx.options) + 1))
    return backward


attention.register_autograd(_backward_through(attention_backward), setup_context=_setup_context)


def _verify(site, q, k, v, out, mask, causal, scale, enable_gqa) -> None:
    """Compare with SDPA on the full sequence, the call's mask (an AttentionMask or None) materialised
    (N x N: a debugging aid)."""
    if mask is not None:
        positions = torch.arange(q.shape[2])
        dense = mask.evaluate(positions, positions, q.shape[1]).to(q.device)
        dense = dense if dense.dtype == torch.bool else dense.to(q.dtype)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale, enable_gqa=enable_gqa)
    else:
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=enable_gqa)
    err = (out.double() - want.double()).abs().max().item()
    bound = {torch.float64: 1e-9, torch.float32: 1e-4}.get(q.dtype, 3e-2) * max(1.0, want.abs().max().item())
    if not math.isfinite(err) or err > bound:
        raise BurstVerificationError(
            f"burst: attention site {site} differs from F.scaled_dot_product_attention by {err:.3e} "
            f"(allowed {bound:.1e} for {q.dtype}). This is a burstc bug: please report it with the site's "
            f"plan; meanwhile compile with options={{'exclude': ['{site.split('/')[-1]}']}}.")


# --- sequence mode: q, k, v are this rank's shard (the graph itself is sharded) -----------------------

@torch.library.custom_op("burst::attention_local", mutates_args=())
def attention_local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                    key_padding: Optional[torch.Tensor], document_ids: Optional[torch.Tensor],
                    mask_buffers: list[torch.Tensor], causal: bool, window_left: Optional[int],
                    window_right: Optional[int], mask_mod: str, scale: Optional[float],
                    enable_gqa: bool, layout: str, backward: str, kernel: str, group_name: str,
                    verify_site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of this rank's shard of exact attention; q, k, v ([B, H, S_local, d]) are this rank's
    tokens in the layout's order (sequence mode), attn_mask this rank's query rows over all keys. No
    gather: the output stays sharded."""
    masks = (attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right, mask_mod)
    run = _run(q, k, v, *masks, scale, enable_gqa, layout, backward, kernel, group_name, full_sequence=False)
    out, lse = _forward(run, q, k, v)
    if verify_site and verify_site not in _verified_sites:
        full = [unshard_sequence(t, dim=2, layout=layout, group=run.group) for t in (q, k, v, out)]
        if attn_mask is not None:  # the full rows, for the reference
            dense = unshard_sequence(attn_mask.contiguous(), dim=2, layout=layout, group=run.group)
            masks = (dense, *masks[1:])
        mask = _masks(masks[0], key_padding, document_ids, mask_buffers, window_left, window_right, mask_mod).build(
            causal, run.plan.seq_len, full[0], layout, 1, None)
        _verify(verify_site, *full, mask, causal, scale, enable_gqa)
        _verified_sites.add(verify_site)
    return out, lse


attention_local.register_fake(_fake_forward)


@torch.library.custom_op("burst::attention_local_backward", mutates_args=())
def attention_local_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, attn_mask: Optional[torch.Tensor],
                             key_padding: Optional[torch.Tensor], document_ids: Optional[torch.Tensor],
                             mask_buffers: list[torch.Tensor], causal: bool, window_left: Optional[int],
                             window_right: Optional[int], mask_mod: str, scale: Optional[float],
                             enable_gqa: bool, layout: str, backward: str, kernel: str,
                             group_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shards, given the forward's out and lse shards."""
    run = _run(q, k, v, attn_mask, key_padding, document_ids, mask_buffers, causal, window_left, window_right,
               mask_mod, scale, enable_gqa, layout, backward, kernel, group_name, full_sequence=False)
    return _grads(run, dout, q, k, v, out, lse)


attention_local_backward.register_fake(_fake_grads)
attention_local.register_autograd(_backward_through(attention_local_backward), setup_context=_setup_context)
