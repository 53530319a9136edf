"""proven(name, seq_len, descriptor, model_mask) -> bool: recognised mask descriptors are checked against
the model's own mask code on the first call of each compiled site, on sampled tiles, and a site whose
descriptors disagree anywhere runs the model's code instead (exact, evaluated tile by tile), loudly.

The recogniser (burstc.passes.masks) reads how a mask is built and replaces the construction by compact
descriptors (causal, window, key padding, documents), so that no rank builds an N x N mask. A recogniser
that matches part of a construction and drops the rest would give a silent wrong answer; this proof turns
that whole class of bugs into a warning and an exact fallback. What is sampled (global positions, the
same on every rank, so every rank reaches the same verdict): the first and last positions, random
positions, both sides of every key-padding and document boundary, and for each sampled query the keys
at and around the diagonal and the window's edges. Cost: one evaluation of both masks on at most
_QUERIES x (_KEYS + 8 * _QUERIES) positions per batch row, once per site; nothing at N x N.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch._dynamo.utils import counters

from burstc.schedule.masks import AttentionMask

log = logging.getLogger("burstc.runtime")

_QUERIES = 48
_KEYS = 96
_verdicts: dict[tuple[str, int], bool] = {}


def sampled_positions(descriptor: AttentionMask, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query positions, key positions), sorted and distinct, deterministic in (descriptor, seq_len)."""
    g = torch.Generator().manual_seed(seq_len)
    edges = {0, 1, seq_len - 2, seq_len - 1}
    for ids in (descriptor.key_padding, descriptor.document_ids):
        if ids is not None:  # both sides of every change along the sequence, in any batch row
            changes = (ids[:, 1:] != ids[:, :-1]).any(dim=0).nonzero().flatten()
            for c in changes[:_QUERIES].tolist():
                edges.update((c, c + 1))
    queries = set(edges) | set(torch.randint(seq_len, (_QUERIES,), generator=g).tolist())
    queries = sorted(p for p in queries if 0 <= p < seq_len)[: 2 * _QUERIES]
    keys = set(queries) | set(torch.randint(seq_len, (_KEYS,), generator=g).tolist())
    left, right = descriptor.window if descriptor.window is not None else (None, None)
    for q in queries:  # the diagonal and the window's edges, both sides
        keys.update((q - 1, q, q + 1))
        if left is not None:
            keys.update((q - left - 1, q - left))
        if right is not None:
            keys.update((q + right, q + right + 1))
    keys = sorted(p for p in keys if 0 <= p < seq_len)
    return torch.tensor(queries), torch.tensor(keys)


def disagreement(descriptor: AttentionMask, model_mask: Callable, seq_len: int):
    """None if the descriptor and the model's mask agree on every sampled (batch, query, key); else one
    (batch, query, key) where they differ."""
    q_pos, k_pos = sampled_positions(descriptor, seq_len)
    # the model's code runs where its captured tensors live (a GPU), with the positions moved there
    device = next((t.device for t in getattr(model_mask, "buffers", ()) if isinstance(t, torch.Tensor)),
                  torch.device("cpu"))
    want = AttentionMask(mask_mod=model_mask).evaluate(q_pos.to(device), k_pos.to(device)).cpu()
    got = descriptor.evaluate(q_pos, k_pos).cpu()
    shape = torch.broadcast_shapes(want.shape, got.shape)
    differ = (want.expand(shape) != got.expand(shape)).any(dim=1).nonzero()
    if len(differ) == 0:
        return None
    bi, qi, ki = differ[0].tolist()
    return bi, int(q_pos[qi]), int(k_pos[ki])


def proven(name: str, seq_len: int, descriptor: AttentionMask, model_mask: Callable) -> bool:
    """Whether the site's descriptors may be used: checked on the first call per (site, length), then
    remembered. A disagreement is warned about and counted (`mask_proofs_failed`)."""
    key = (name, seq_len)
    if key not in _verdicts:
        where = disagreement(descriptor, model_mask, seq_len)
        _verdicts[key] = where is None
        counters["burst"]["mask_proofs" if where is None else "mask_proofs_failed"] += 1
        if where is not None:
            log.warning("burst: the mask recognised as '%s' differs from the model's own mask code at (batch %d, "
                        "query %d, key %d): this site runs the model's mask, evaluated tile by tile (exact, "
                        "slower); please report it as a burstc bug", descriptor.describe(), *where)
    return _verdicts[key]
