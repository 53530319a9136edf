"""A work item's structured mask as positions, a window, document ids and key padding (`PositionMask`), not a tile.

Key k is visible from query q iff q - left <= k <= q + right (the window; causal caps right at 0),
both have the same document id (if the mask has documents) and k is a real key (if the mask has key
padding). That is O(q_len + k_len) per item where the evaluated tile is O(q_len * k_len); the Triton
kernels compute visibility from it tile by tile (MASK "positions"), the other kernels materialise it
(`as_tile`) into exactly what `AttentionMask.evaluate` gives.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from burstc.schedule.masks import AttentionMask

# An unbounded window side. Positions stay below it, so k - q never overflows int32 and a clipped
# bound hides or shows exactly what the unclipped one would.
UNBOUNDED = 2 ** 30
POSITION_LIMIT = UNBOUNDED  # sequences this long or longer keep evaluated tiles


@dataclass(frozen=True)
class PositionMask:
    """One work item's mask: q_pos [q_len], k_pos [k_len] global positions (int32, on the kernel's
    device); window bounds left/right (ints in [-UNBOUNDED, UNBOUNDED]); optional q_docs [B|1, q_len],
    k_docs [B|1, k_len] int32 document ids and k_valid [B|1, k_len] bool (True = a real key)."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    left: int = UNBOUNDED
    right: int = UNBOUNDED
    q_docs: Optional[torch.Tensor] = None
    k_docs: Optional[torch.Tensor] = None
    k_valid: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, mask: AttentionMask, q_pos: torch.Tensor, k_pos: torch.Tensor) -> Optional["PositionMask"]:
        """The item of query positions q_pos x key positions k_pos (global, each < POSITION_LIMIT) under
        mask; None if the mask is not positions-only (a mask_mod or a materialised attn_mask)."""
        mask = position_form(mask)
        if mask is None:
            return None
        left, right = window_bounds(mask)
        docs, padding = mask.document_ids, mask.key_padding
        return cls(q_pos.to(torch.int32), k_pos.to(torch.int32), left, right,
                   q_docs=None if docs is None else docs[:, q_pos],
                   k_docs=None if docs is None else docs[:, k_pos],
                   k_valid=None if padding is None else padding[:, k_pos])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.q_pos), len(self.k_pos)

    def materialize(self) -> torch.Tensor:
        """bool [B|1, 1, q_len, k_len], True = visible: what AttentionMask.evaluate gives for this item."""
        q_len, k_len = self.shape
        distance = self.k_pos.view(1, -1) - self.q_pos.view(-1, 1)
        visible = ((distance >= -self.left) & (distance <= self.right)).view(1, 1, q_len, k_len)
        if self.k_valid is not None:
            visible = visible & self.k_valid[:, None, None, :]
        if self.q_docs is not None:
            visible = visible & (self.q_docs[:, None, :, None] == self.k_docs[:, None, None, :])
        return visible


def as_tile(mask: Union[torch.Tensor, PositionMask, None]) -> Optional[torch.Tensor]:
    """A kernel's `mask` argument as a tile tensor (kernels that read no descriptors)."""
    return mask.materialize() if isinstance(mask, PositionMask) else mask


def position_form(mask: AttentionMask) -> Optional[AttentionMask]:
    """mask with int32 document ids (renumbered in order when they do not fit int32) and bool key padding,
    as `PositionMask.of` slices them; None if a mask_mod or a materialised attn_mask is part of it. Cheap
    on a mask already in this form (do it once per call, not per item)."""
    if mask.mask_mod is not None or mask.dense is not None:
        return None
    docs, padding = mask.document_ids, mask.key_padding
    if (docs is None or docs.dtype == torch.int32) and (padding is None or padding.dtype == torch.bool):
        return mask
    if docs is not None and docs.dtype != torch.int32:
        docs = torch.unique(docs, return_inverse=True)[1].to(torch.int32)  # same equalities and order
    if padding is not None:
        padding = padding.bool()
    return replace(mask, document_ids=docs, key_padding=padding)


def window_bounds(mask: AttentionMask) -> tuple[int, int]:
    """(left, right): key k is inside the window of query q iff q - left <= k <= q + right, clipped to
    [-UNBOUNDED, UNBOUNDED]; causal caps right at 0."""
    left, right = mask.window if mask.window is not None else (None, None)
    left = UNBOUNDED if left is None else left
    right = UNBOUNDED if right is None else right
    if mask.causal:
        right = min(right, 0)
    clip = lambda bound: max(-UNBOUNDED, min(UNBOUNDED, int(bound)))  # noqa: E731
    return clip(left), clip(right)
