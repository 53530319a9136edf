"""The mask arguments of burst_attention: local checks, a code every rank must agree on, and the
AttentionMask descriptor the plan is built from."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from burstc.runtime import mask_proof
from burstc.schedule import layout as layouts
from burstc.schedule.masks import AttentionMask, documents_from_cu_seqlens, window_is_bounded


AVERAGING_BIAS = -1e30  # an additive bias this negative swamps any score: a row of them is averaged


@dataclass(frozen=True)
class MaskArgs:
    key_padding_mask: Optional[torch.Tensor] = None
    document_ids: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    window: Optional[tuple[Optional[int], Optional[int]]] = None
    mask_mod: Optional[Callable] = None
    attn_mask: Optional[torch.Tensor] = None
    proof: Optional[Callable] = None  # the model's own mask code the descriptors were recognised from

    def problem(self, q: torch.Tensor) -> Optional[str]:
        """Why these masks cannot be used with q (None if they can), before the sequence length is known."""
        if self.document_ids is not None and self.cu_seqlens is not None:
            return "pass either document_ids= or cu_seqlens= (two spellings of the same mask), not both"
        for name in ("key_padding_mask", "document_ids"):
            t = getattr(self, name)
            if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] not in (1, q.shape[0])):
                return (f"{name} must be a [batch, seq_len] tensor over the global sequence with batch "
                        f"{q.shape[0]} (or 1), got {getattr(t, 'shape', type(t))}")
        if self.document_ids is not None and (self.document_ids.is_floating_point() or self.document_ids.dtype == torch.bool):
            return f"document_ids must be integers, got {self.document_ids.dtype}"
        if self.window is not None:
            ok = (isinstance(self.window, (tuple, list)) and len(self.window) == 2
                  and all(w is None or (isinstance(w, int) and not isinstance(w, bool)) for w in self.window))
            if not ok:
                return f"window must be (left, right) with ints or None, got {self.window!r}"
        if self.mask_mod is not None and not callable(self.mask_mod):
            return f"mask_mod must be callable mask_mod(b, h, q_idx, kv_idx), got {type(self.mask_mod)}"
        m = self.attn_mask
        if m is not None:
            if not isinstance(m, torch.Tensor) or m.dim() != 4:
                return ("attn_mask must be a 4-D [batch|1, heads|1, query rows, seq_len] tensor (this rank's query "
                        f"rows over all keys), got {getattr(m, 'shape', type(m))}")
            if m.dtype != torch.bool and not m.is_floating_point():
                return f"attn_mask must be bool (True = attend) or floating (additive), got {m.dtype}"
            if m.shape[0] not in (1, q.shape[0]) or m.shape[1] not in (1, q.shape[1]):
                return f"attn_mask {tuple(m.shape)} does not broadcast over batch {q.shape[0]} and {q.shape[1]} heads"
        return None

    def code(self, content: bool = True) -> int:
        """A 62-bit digest of what every rank must pass alike (the attn_mask rows differ per rank: only
        their kind counts). content=False leaves the descriptors' values out (their shapes and dtypes
        count): no host copy, for a compiled site whose agreement is already known."""
        h = hashlib.sha1()
        h.update(repr(self.window).encode())
        for t in (self.key_padding_mask, self.document_ids, self.cu_seqlens):
            if t is None:
                h.update(b"-")
            else:
                h.update(repr((tuple(t.shape), str(t.dtype))).encode())
                if content:
                    h.update(t.detach().cpu().contiguous().numpy().tobytes())
        for mod in (self.mask_mod, self.proof):
            h.update(getattr(mod, "__qualname__", "-").encode())
            if hasattr(mod, "digest"):
                h.update(mod.digest())
        h.update(b"-" if self.attn_mask is None else str(self.attn_mask.dtype).encode())
        return int.from_bytes(h.digest()[:8], "little") >> 2

    def preferred_layout(self, causal: bool) -> str:
        """contiguous for a bounded window (the ring becomes a halo exchange), else zigzag."""
        left, right = self.window if self.window is not None else (None, None)
        return "contiguous" if window_is_bounded(left, right, causal) else "zigzag"

    def build(self, causal: bool, seq_len: int, q: torch.Tensor, layout: str, world_size: int,
              rank: Optional[int]) -> Optional[AttentionMask]:
        """The call's AttentionMask (None without masks). rank: this rank when attn_mask holds only its
        query rows (sharded inputs), None when it holds all seq_len rows. Raises ValueError on a
        mismatch with the sequence."""
        docs = self.document_ids
        if self.cu_seqlens is not None:
            docs = documents_from_cu_seqlens(self.cu_seqlens, seq_len)
        for name, t in (("key_padding_mask", self.key_padding_mask), ("document_ids", docs)):
            if t is not None and t.shape[1] != seq_len:
                raise ValueError(f"{name} covers {t.shape[1]} tokens but the sequence has {seq_len}: pass it "
                                 "over the whole (global) sequence on every rank")
        dense, rows = self.attn_mask, None
        if dense is not None:
            rows = None if rank is None else layouts.shard_positions(seq_len, layout, world_size, rank)
            want = seq_len if rows is None else len(rows)
            if dense.shape[2:] != (want, seq_len):
                where = "all" if rows is None else "this rank's"
                raise ValueError(f"attn_mask {tuple(dense.shape)} must hold {where} {want} query rows over all "
                                 f"{seq_len} keys: [B|1, H|1, {want}, {seq_len}]")
            row_max = dense.amax(dim=-1) if dense.dtype != torch.bool and want else None
            if row_max is not None and bool(((row_max <= AVERAGING_BIAS) & (row_max > float("-inf"))).any()):
                raise ValueError(
                    "attn_mask has rows whose every key carries a huge finite negative bias (<= -1e30, e.g. "
                    "finfo.min): single-device SDPA averages all values there, which the ring cannot reproduce "
                    "exactly. Mark hidden keys with -inf (or pass a boolean mask), so such rows give 0")
        mask = AttentionMask(
            causal=causal, window=tuple(self.window) if self.window is not None else None,
            key_padding=None if self.key_padding_mask is None else self.key_padding_mask.detach().bool().cpu(),
            document_ids=None if docs is None else docs.detach().to(torch.int64).cpu(),
            mask_mod=self.mask_mod, dense=None if dense is None else dense.detach(), dense_rows=rows).normalized()
        return mask if mask.structured else None

    def build_proven(self, causal: bool, seq_len: int, q: torch.Tensor, layout: str, world_size: int,
                     rank: Optional[int]) -> tuple[Optional[AttentionMask], bool]:
        """(the call's AttentionMask, causal): build()'s, once recognised descriptors are proven equal to
        the model's mask code on sampled tiles (burstc.runtime.mask_proof; checked on the first call of a
        site and length), else the model's code itself as the only mask (not causal: the code says all)."""
        mask = self.build(causal, seq_len, q, layout, world_size, rank)
        if self.proof is None or mask_proof.proven(self.proof.name, seq_len, mask or AttentionMask(causal=causal),
                                                   self.proof):
            return mask, causal
        return AttentionMask(mask_mod=self.proof), False
