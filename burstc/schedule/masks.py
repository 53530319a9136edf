"""Attention masks as plan attributes: which (query, key) pairs of one sequence are visible, described
in global token positions, evaluated on any tile of positions and classified tile by tile.

A mask is the conjunction of its parts, each optional:
- causal: key position <= query position;
- window (left, right): query i sees keys in [i - left, i + right] (None = unbounded on that side);
- key_padding [B, N] bool: key j is visible in batch row b iff key_padding[b, j];
- document_ids [B, N] int: query and key must belong to the same document;
- mask_mod(b, h, q_idx, kv_idx) -> bool: FlexAttention's convention, on global indices;
- dense: a materialised boolean (True = attend) or additive mask [B|1, H|1, R, N]; its rows are the
  query positions `dense_rows` (this rank's shard) or all N positions (dense_rows None).

Classification answers, for a tile of query positions x key positions, whether every pair is hidden
(EMPTY: no compute, maybe no transfer), every pair visible (FULL: an unmasked kernel call) or neither
(PARTIAL: the kernel gets the tile's evaluated mask). It uses bounds (positions, document ranges,
padding counts), so EMPTY and FULL are always proven; a tile it cannot prove either way is PARTIAL.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

EMPTY, FULL, PARTIAL = "empty", "full", "partial"


def visible(mask: torch.Tensor) -> torch.Tensor:
    """Bool: where an evaluated mask (bool, or additive with -inf where hidden) lets a key be seen."""
    return mask if mask.dtype == torch.bool else mask > float("-inf")


def window_is_bounded(left: Optional[int], right: Optional[int], causal: bool) -> bool:
    """Whether a query sees keys only within a bounded distance (a sliding window: left bounded and
    right bounded or causal). On the contiguous layout such a ring is a halo exchange."""
    return left is not None and (causal or right is not None)


@dataclass(frozen=True, eq=False)
class AttentionMask:
    causal: bool = False
    window: Optional[tuple[Optional[int], Optional[int]]] = None
    key_padding: Optional[torch.Tensor] = None
    document_ids: Optional[torch.Tensor] = None
    mask_mod: Optional[Callable] = None
    dense: Optional[torch.Tensor] = None
    dense_rows: Optional[torch.Tensor] = field(default=None)  # global positions of dense's rows

    @property
    def per_head(self) -> bool:
        """Whether the mask may differ between heads (a mask_mod, a materialised mask)."""
        return self.mask_mod is not None or self.dense is not None

    @property
    def structured(self) -> bool:
        """Anything beyond plain causal/no mask (the plan then works tile by tile)."""
        return any(x is not None for x in (self.window, self.key_padding, self.document_ids,
                                           self.mask_mod, self.dense))

    @property
    def additive(self) -> bool:
        return self.dense is not None and self.dense.dtype != torch.bool

    def describe(self) -> str:
        parts = ["causal"] if self.causal else []
        if self.window is not None:
            parts.append(f"window={tuple(self.window)}")
        if self.key_padding is not None:
            parts.append("key_padding")
        if self.document_ids is not None:
            parts.append("documents")
        if self.mask_mod is not None:
            parts.append(f"mask_mod={getattr(self.mask_mod, '__name__', 'fn')}")
        if self.dense is not None:
            parts.append("additive attn_mask" if self.additive else "attn_mask")
        return " & ".join(parts) or "none"

    def to(self, device: torch.device) -> "AttentionMask":
        """The same mask with its descriptor tensors on device (tiles are then evaluated there)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, key_padding=move(self.key_padding), document_ids=move(self.document_ids),
                       dense=move(self.dense), dense_rows=move(self.dense_rows))

    def normalized(self) -> "AttentionMask":
        """The same mask without redundant parts (a window side implied by causal, an unbounded window)."""
        window = self.window
        if window is not None:
            left, right = window
            if self.causal and right is not None and right >= 0:
                right = None
            window = None if left is None and right is None else (left, right)
        return replace(self, window=window)

    def fingerprint(self) -> Optional[tuple]:
        """A hashable key of the mask's content; None for a dense mask or a mask_mod without a
        `digest()` of its code and captured tensors (an eager callable: no key says what it does)."""
        if self.dense is not None:
            return None
        mod = None
        if self.mask_mod is not None:
            if not hasattr(self.mask_mod, "digest"):
                return None
            mod = self.mask_mod.digest()  # a compiled FlexAttention mask_mod (runtime.mask_mods)
        data = tuple(None if t is None else (tuple(t.shape), t.cpu().numpy().tobytes())
                     for t in (self.key_padding, self.document_ids))
        return (self.causal, self.window, mod, data)

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, q_pos: torch.Tensor, k_pos: torch.Tensor, heads: int = 1) -> torch.Tensor:
        """The mask on query positions q_pos x key positions k_pos: [B|1, H|1, Lq, Lk], bool (True =
        attend) or, with an additive dense mask, float with -inf where hidden."""
        qi, ki = q_pos.view(-1, 1), k_pos.view(1, -1)
        visible = torch.ones(1, 1, len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
        if self.causal:
            visible = visible & (ki <= qi)
        if self.window is not None:
            left, right = self.window
            if left is not None:
                visible = visible & (ki >= qi - left)
            if right is not None:
                visible = visible & (ki <= qi + right)
        if self.key_padding is not None:
            visible = visible & self.key_padding[:, k_pos].bool()[:, None, None, :]
        if self.document_ids is not None:
            docs = self.document_ids
            visible = visible & (docs[:, q_pos][:, None, :, None] == docs[:, k_pos][:, None, None, :])
        if self.mask_mod is not None:
            visible = visible & self._mod(q_pos, k_pos, heads)
        if self.dense is None:
            return visible
        rows = self.dense_row_index(q_pos)
        tile = self.dense[:, :, rows.to(self.dense.device)][..., k_pos.to(self.dense.device)]
        visible = visible.to(tile.device)
        if tile.dtype == torch.bool:
            return visible & tile
        return tile.masked_fill(~visible, float("-inf"))

    def _mod(self, q_pos, k_pos, heads: int) -> torch.Tensor:
        device = q_pos.device
        try:
            out = self._call_mod(q_pos, k_pos, heads, device)
        except RuntimeError:
            if device.type == "cpu":
                raise
            out = self._call_mod(q_pos, k_pos, heads, torch.device("cpu"))  # a mask_mod over host tensors
        out = torch.as_tensor(out).to(device).bool()
        while out.dim() < 4:
            out = out.unsqueeze(0)
        return out

    def _call_mod(self, q_pos, k_pos, heads: int, device: torch.device):
        b = torch.arange(self._batch(), device=device).view(-1, 1, 1, 1)
        h = torch.arange(heads, device=device).view(1, -1, 1, 1)
        return self.mask_mod(b, h, q_pos.to(device).view(1, 1, -1, 1), k_pos.to(device).view(1, 1, 1, -1))

    def _batch(self) -> int:
        for t in (self.key_padding, self.document_ids, self.dense):
            if t is not None:
                return t.shape[0]
        return 1

    def dense_row_index(self, q_pos: torch.Tensor) -> torch.Tensor:
        """Row indices of dense for global query positions q_pos."""
        if self.dense_rows is None:
            return q_pos
        index = torch.searchsorted(self.dense_rows, q_pos)
        if not bool((self.dense_rows[index.clamp(max=len(self.dense_rows) - 1)] == q_pos).all()):
            raise ValueError("attn_mask rows of another rank's queries are not held here")
        return index

    # -- classification --------------------------------------------------------------------------

    def tile_bounds(self, tiles: list[torch.Tensor]) -> "TileBounds":
        """What classify reads of a list of tiles (position tensors), computed once for reuse."""
        flat, owner = _flattened(tiles)
        lo, hi = _reduce_by_tile(flat.view(1, -1), owner, len(tiles))
        doc_lo = doc_hi = seen = None
        if self.document_ids is not None:
            doc_lo, doc_hi = _reduce_by_tile(self.document_ids.cpu()[:, flat].to(torch.int64), owner, len(tiles))
        if self.key_padding is not None:
            kept = self.key_padding.bool().cpu()[:, flat].to(torch.int64)
            seen = torch.zeros(kept.shape[0], len(tiles), dtype=torch.int64).index_add_(1, owner, kept)
        sizes = torch.tensor([len(t) for t in tiles], dtype=torch.int64)
        return TileBounds(tiles, lo[0], hi[0], sizes, doc_lo, doc_hi, seen)

    def classify(self, q_tiles: list[torch.Tensor], k_tiles: list[torch.Tensor], heads: int = 1) -> list[list[str]]:
        """EMPTY / FULL / PARTIAL of every (query tile, key tile) pair; tiles are position tensors."""
        if not q_tiles or not k_tiles:
            return [[EMPTY] * len(k_tiles) for _ in q_tiles]
        empty, full = self.classify_bounds(self.tile_bounds(q_tiles), self.tile_bounds(k_tiles), heads)
        return [[EMPTY if e else FULL if f else PARTIAL for e, f in zip(empty_row, full_row)]
                for empty_row, full_row in zip(empty.tolist(), full.tolist())]

    def classify_bounds(self, q_bounds: "TileBounds", k_bounds: "TileBounds",
                        heads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(empty, full): [nq, nk] bool tensors, whether each (query tile, key tile) pair is proven fully
        hidden / fully visible (neither: partial), from the tiles' bounds."""
        q_tiles, k_tiles = q_bounds.tiles, k_bounds.tiles
        nq, nk = len(q_tiles), len(k_tiles)
        q_lo, q_hi, k_lo, k_hi = q_bounds.lo, q_bounds.hi, k_bounds.lo, k_bounds.hi
        # [B|1, nq, nk] proofs that a tile is fully visible / fully hidden, per batch row
        full = torch.ones(1, nq, nk, dtype=torch.bool)
        empty = torch.zeros(1, nq, nk, dtype=torch.bool)

        def conjoin(f, e):
            nonlocal full, empty
            full, empty = full & f, empty | e

        qa, qb = q_lo.view(1, -1, 1), q_hi.view(1, -1, 1)
        ka, kb = k_lo.view(1, 1, -1), k_hi.view(1, 1, -1)
        if self.causal:
            conjoin(kb <= qa, ka > qb)
        if self.window is not None:
            left, right = self.window
            if left is not None:
                conjoin(ka >= qb - left, kb < qa - left)
            if right is not None:
                conjoin(kb <= qa + right, ka > qb + right)
        if self.key_padding is not None:
            seen, sizes = k_bounds.seen, k_bounds.sizes
            conjoin((seen == sizes).unsqueeze(1), (seen == 0).unsqueeze(1))  # [B, 1, nk]
        if self.document_ids is not None:
            dq_lo, dq_hi = q_bounds.doc_lo, q_bounds.doc_hi  # [B, nq]
            dk_lo, dk_hi = k_bounds.doc_lo, k_bounds.doc_hi  # [B, nk]
            same = ((dq_lo == dq_hi).unsqueeze(2) & (dk_lo == dk_hi).unsqueeze(1)
                    & (dq_lo.unsqueeze(2) == dk_lo.unsqueeze(1)))
            apart = (dq_hi.unsqueeze(2) < dk_lo.unsqueeze(1)) | (dk_hi.unsqueeze(1) < dq_lo.unsqueeze(2))
            conjoin(same, apart)
        if self.mask_mod is not None or (self.dense is not None and self.dense_rows is None):
            # no bounds to reason with: evaluate the tile itself
            f = torch.zeros(1, nq, nk, dtype=torch.bool)
            e = torch.zeros(1, nq, nk, dtype=torch.bool)
            probe = replace(self, causal=False, window=None, key_padding=None, document_ids=None)
            for i, qt in enumerate(q_tiles):
                for j, kt in enumerate(k_tiles):
                    if bool(empty[:, i, j].all()):
                        continue
                    m = probe.evaluate(qt, kt, heads)
                    seen = visible(m)
                    exact = m.dtype == torch.bool or bool((m[seen] == 0).all())
                    e[0, i, j] = not bool(seen.any())
                    f[0, i, j] = bool(seen.all()) and exact
            conjoin(f, e)
        elif self.dense is not None:
            full = torch.zeros_like(full)  # only this rank knows its rows: never proven full or empty
        return empty.all(dim=0), full.all(dim=0)


@dataclass(frozen=True)
class TileBounds:
    """A list of tiles (position tensors) as classification sees them: each tile's smallest and largest
    position, size, document id bounds per batch row and kept keys per batch row (where the mask has
    documents / key padding)."""

    tiles: list
    lo: torch.Tensor
    hi: torch.Tensor
    sizes: torch.Tensor
    doc_lo: Optional[torch.Tensor] = None
    doc_hi: Optional[torch.Tensor] = None
    seen: Optional[torch.Tensor] = None


def _reduce_by_tile(values: torch.Tensor, owner: torch.Tensor, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest of values [B, n] per tile (owner [n]: each value's tile): [B, tiles] each."""
    index = owner.expand(values.shape[0], -1)
    shape = (values.shape[0], tiles)
    lo = torch.full(shape, torch.iinfo(torch.int64).max).scatter_reduce(1, index, values, "amin")
    hi = torch.full(shape, torch.iinfo(torch.int64).min).scatter_reduce(1, index, values, "amax")
    return lo, hi


def _flattened(tiles: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(every tile's positions end to end, the tile index of each)."""
    flat = torch.cat([t.cpu().to(torch.int64) for t in tiles])
    sizes = torch.tensor([len(t) for t in tiles], dtype=torch.int64)
    return flat, torch.repeat_interleave(torch.arange(len(tiles)), sizes, output_size=len(flat))


def documents_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """document_ids [1, N] from cumulative document lengths [0, l0, l0 + l1, ..., N] (varlen spelling)."""
    cu = cu_seqlens.to(torch.int64).cpu()
    if cu.dim() != 1 or len(cu) < 2 or int(cu[0]) != 0 or int(cu[-1]) != seq_len or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, start at 0 and end at the sequence length {seq_len}, "
                         f"got {cu.tolist()}")
    positions = torch.arange(seq_len)
    return (torch.searchsorted(cu[1:], positions, right=True)).view(1, -1)
