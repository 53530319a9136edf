"""Layout blocks cut at document boundaries, for plans of a pure document mask in closed form.

A document mask (document ids, optionally causal, nothing else) whose id row is the same for every
batch row says: query and key see each other iff they are in the same document (and, causal, the key
is not later). Cut each block of a chunk into runs of one document id; a run is again a block (its
positions are the block's, an arithmetic progression). Then the visible pairs of two chunks are
exactly the pairs of their same-document runs under the plain full or causal relation, which
`plan._block_items` decomposes into full and top-left causal rectangles: no tile is classified or
evaluated, and no item needs a mask. A document id may recur in separate runs; each same-id pair of
runs counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from burstc.schedule import layout as layouts
from burstc.schedule.masks import AttentionMask


@dataclass(frozen=True)
class DocumentRun:
    """Rows of one document inside one layout block, as a block of their own."""

    document: int
    block: layouts.Block


def shared_document_row(mask: AttentionMask) -> Optional[torch.Tensor]:
    """The mask's document ids [N] (on the host) when it is a pure document mask whose rows agree across
    the batch; None when the closed form does not apply (other parts, per-row packings)."""
    if mask.document_ids is None or any(x is not None for x in (mask.window, mask.key_padding, mask.mask_mod,
                                                                 mask.dense)):
        return None
    ids = mask.document_ids
    if ids.dim() != 2:
        return None
    if ids.shape[0] > 1 and not bool((ids == ids[:1]).all()):
        return None
    return ids[0].cpu()


def document_runs(blocks: list[layouts.Block], documents: torch.Tensor) -> list[DocumentRun]:
    """The runs of equal document id of every block's real rows, in block order."""
    runs = []
    for block in blocks:
        if block.valid == 0:
            continue
        stop = block.global_start + block.stride * (block.valid - 1) + 1
        ids = documents[block.global_start:stop:block.stride]
        cuts = [0] + ((ids[1:] != ids[:-1]).nonzero().flatten() + 1).tolist() + [block.valid]
        for a, b in zip(cuts, cuts[1:]):
            run = layouts.Block(local_start=block.local_start + a, global_start=block.global_start + block.stride * a,
                                stride=block.stride, length=b - a, valid=b - a)
            runs.append(DocumentRun(int(ids[a]), run))
    return runs


def same_document_pairs(q_runs: list[DocumentRun], k_runs: list[DocumentRun]) -> Iterator[tuple]:
    """(query block, key block) for every pair of runs of one document."""
    by_document: dict[int, list[layouts.Block]] = {}
    for run in k_runs:
        by_document.setdefault(run.document, []).append(run.block)
    for run in q_runs:
        for k_block in by_document.get(run.document, ()):
            yield run.block, k_block
