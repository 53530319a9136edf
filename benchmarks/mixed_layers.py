"""What the windowed layers of a mixed model send under the default options: a small Gemma 3 (sliding and
full layers, HF's SDPA path) in sequence mode on G gloo ranks, zigzag layout (auto: one sliding layer is
enough to keep zigzag, since the full layers need it).

    python benchmarks/mixed_layers.py [--ranks 4] [--seq-len 1024] [--window 64] [--layers 4]

Three layer patterns of the same model, each compiled once per rank with `backend="burst"` and no options:
every layer full, every layer sliding, and Gemma 3's mixed pattern (layers alternate here). Each runs one
training step (forward with the loss, backward) twice:

- `direct` (default): what users get. A windowed layer's plan takes the direct route
  (burstc.schedule.route.direct_route): each zigzag segment's halo goes straight to the neighbour that needs it;
- `relay`: the same step with the route choice switched off inside this benchmark (not an option): the chunk
  travels the flat ring, as before the direct route existed.

Columns: the layout `auto` resolves to (zigzag where a full causal layer needs its balance, else contiguous);
bytes the ring sent, all ranks together, forward and backward (burstc.comm_stats); the windowed layers' share of
the forward bytes (the whole for the all-sliding pattern; for the mixed one, its total less its full layers'
share of the all-full run); `halo`: what those windowed layers need by construction, (window - 1) rows before each
boundary between two ranks' segments (G - 1 boundaries under contiguous, 2G - 2 under zigzag) x K/V bytes per row
(HF's SDPA path repeats the K/V heads before a masked call, so 4 heads x 16 dims x 2 x fp32); gathers per rank
and the bytes gathered (HF's cache keeps each sliding layer's last window - 1 keys and values: those rows); the
loss against eager on one process (same weights and batch). Needs transformers.
"""
from __future__ import annotations

import argparse
import datetime

import torch

PATTERNS = {"full": lambda n: ["full_attention"] * n, "sliding": lambda n: ["sliding_attention"] * n,
            "mixed": lambda n: ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]}


def _model(layer_types: list[str], args):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=args.window,
        layer_types=layer_types, max_position_embeddings=args.seq_len)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config)


def _rank(rank: int, world_size: int, args) -> list[dict]:
    import copy

    import burstc
    import burstc.schedule.plan as plan_module

    ids = torch.randint(0, 256, (1, args.seq_len), generator=torch.Generator().manual_seed(1))
    results = []
    for name, layers in PATTERNS.items():
        model = _model(layers(args.layers), args)
        want = model(ids, labels=ids).loss.item()
        compiled = torch.compile(copy.deepcopy(model), backend="burst")
        compiled(ids, labels=ids).loss.backward()  # compile and warm up
        for route in ("direct", "relay"):
            choose = plan_module._direct_if_cheaper
            if route == "relay":
                plan_module._direct_if_cheaper = lambda plan: plan
            plan_module._masked_plans.clear()
            try:
                with burstc.comm_stats() as stats:
                    loss = compiled(ids, labels=ids).loss
                    loss.backward()
            finally:
                plan_module._direct_if_cheaper = choose
                plan_module._masked_plans.clear()
            results.append(dict(pattern=name, route=route, forward=stats.forward_bytes, backward=stats.backward_bytes,
                                gathers=stats.collectives.get("gather", 0),
                                gathered=stats.gathered_bytes, loss_err=abs(loss.item() - want)))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    from burstc.launch import run_ranks

    per_rank = run_ranks(args.ranks, _rank, args, timeout_s=3600)
    g, w, layers = args.ranks, args.window, args.layers
    masked_row = 2 * 4 * 16 * 4  # k and v of a masked call: 4 heads (repeated) x 16 dims x fp32
    layouts = {"full": "zigzag", "sliding": "contiguous", "mixed": "zigzag"}
    windowed = {"full": 0, "sliding": layers, "mixed": len([t for t in PATTERNS["mixed"](layers) if "sliding" in t])}
    boundaries = {"zigzag": 2 * g - 2, "contiguous": g - 1}
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}; Gemma 3 (hidden 64, {layers} layers, 4 heads, "
          f"2 kv heads, head_dim 16), N={args.seq_len}, window {w}, {g} gloo ranks, fp32; bytes summed over ranks, "
          f"one training step (forward with the loss, backward)\n")
    print("| layers | layout | route | forward KiB | backward KiB | windowed layers' forward KiB | their halo KiB "
          "| gathers (KiB, all ranks) | loss error |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = {(r["pattern"], r["route"]): i for i, r in enumerate(per_rank[0])}
    total = {key: (sum(ranks[i]["forward"] for ranks in per_rank), sum(ranks[i]["backward"] for ranks in per_rank))
             for key, i in rows.items()}
    for (pattern, route), i in rows.items():
        fwd, bwd = total[pattern, route]
        full_share = total["full", route][0] / layers * (layers - windowed[pattern])
        halo = windowed[pattern] * boundaries[layouts[pattern]] * (w - 1) * masked_row
        mine = "-" if not windowed[pattern] else f"{(fwd - full_share) / 1024:.1f}"
        print(f"| {pattern} | {layouts[pattern]} | {route} | {fwd / 1024:.1f} | {bwd / 1024:.1f} | {mine} "
              f"| {halo / 1024 if halo else '-'} | {max(r[i]['gathers'] for r in per_rank)} "
              f"({sum(r[i]['gathered'] for r in per_rank) / 1024:.1f}) "
              f"| {max(r[i]['loss_err'] for r in per_rank):.1e} |")

if __name__ == "__main__":
    main()
