"""FX passes of the burst backend, each ``GraphModule -> GraphModule`` with a one-line contract at
the top of its module. They run on the Dynamo-level graph (before AOTAutograd), in this order:

0. ``higher_order.inline_checkpoints`` — activation-checkpoint regions become part of the graph, tagged
   for AOTAutograd's partitioner as the checkpoint op tags them (selective policies kept:
   ``selective_checkpoint``); steps 1 to 1c run on the graph and on every higher-order op's body
   (``higher_order.graphs``).
1. ``canonicalize.canonicalize_attention`` — hand-written attention (matmul / softmax / matmul,
   einsum, baddbmm, masks, scales, no-op dropouts) -> one ``torch._C._nn.scaled_dot_product_attention``
   call per site, only where the rewrite is exact; records what it did in ``gm.meta``.
1a. ``autocast.spell_out_autocast`` — an SDPA autocast ran in lower precision gets autocast's casts of
   q, k, v and a floating mask written into the graph, so the site has one dtype.
1b. ``masks.recognize_masks`` — an ``attn_mask`` built from index comparisons, a [B, N] padding mask
   and document ids (HF ``masking_utils``) becomes ``masked_sdpa`` with compact descriptors; other
   masks take the [B|1, H|1, N, N] row form the ring shards by query rows.
1c. ``shifts.unshift_losses`` — ``cross_entropy(L[:, :-k], T[:, k:])`` (flattened) reads L whole against
   T[:, k:] padded with ignore_index: the same loss, and no slice along the sequence to gather.
2. ``find_attention.find_attention_sites`` — every SDPA call becomes an AttentionSite with shapes,
   scale, mask kind, GQA ratio, dropout and the user's source line.
3. ``plan.plan_sites`` — per site: convert or the reason not to; layout, backward scheme by the cost
   model, sizes as sympy expressions when the sequence length is dynamic.
4. ``shard.shard_graph`` (sequence mode) — every tensor sharded along the sequence or replicated, with
   boundary ops where they meet (rules per op in ``shard_rules``; ``specialize`` folds symbolic sizes
   for ``dynamic=True``). Before it, ``windows.fuse_windows`` turns token shifts, rolls and convs over a
   bounded window into one node each, which the pass runs on shards with a halo exchange.
5. ``rewrite.rewrite_sites`` — converting sites become ``burst::attention_local`` (sequence mode) or
   ``burst::attention`` calls; the others stay SDPA with their reason logged once.

``pipeline.front_passes`` runs steps 0 to 1c (for the backend and for ``explain`` alike);
``burstc.backend.burst_backend`` runs them all and hands the graph to the inner compiler.
"""
from burstc.passes.canonicalize import (
    CanonicalizedSite, CanonicalizeResult, SkippedSite, canonicalize_attention, canonicalize_result,
)

__all__ = [
    "CanonicalizeResult", "CanonicalizedSite", "SkippedSite", "canonicalize_attention", "canonicalize_result",
]
