"""Contract: `python -m burstc.schedule.simulate` prints the cost model's predicted time per attention layer
of every schedule, and of a flat KV ring (PyTorch CP / ring-flash-attn), as markdown tables.

Predictions, not measurements: burstc.schedule.predict's model with published link and kernel figures
(DEFAULT_LINKS: H100 SXM NVLink 450 GB/s, InfiniBand 50 GB/s per GPU; DEFAULT_FLOPS: 700 TFLOP/s).
One table per model: for each sequence length, forward + backward time of one attention layer, the
speed-up over the reference row, inter-node bytes each rank sends, the communication not hidden by
compute, and the schedule choose_schedule('auto') picks. burstc's schedules use the backward scheme
'auto' (the cheaper of query ring and KV ring for the chunk the ring carries); the reference uses the
KV ring.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from burstc.schedule.cost import AttentionShape
from burstc.schedule.predict import (DEFAULT_FLOPS, REFERENCE, SCHEDULES, Prediction, choose_schedule,
                                     predict_reference)
from burstc.schedule.topology import DEFAULT_LINKS, INTER, INTRA, LinkSpec, Topology

# (name, query heads, K/V heads, head dim)
MODELS = (("LLaMA-7B-like", 32, 32, 128), ("LLaMA-70B-like", 64, 8, 128))
DEFAULT_SEQ_LENS = "128K,256K,512K,1M"
MIB = 2 ** 20


def parse_tokens(text: str) -> int:
    """'128K' -> 131072, '1M' -> 1048576, '5000' -> 5000 (K and M are powers of 2)."""
    t = text.strip().upper()
    scale = {"K": 2 ** 10, "M": 2 ** 20}.get(t[-1:], 1)
    try:
        value = int(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of tokens (e.g. 4096, 128K, 1M)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a sequence needs at least one token")
    return value


def label_tokens(n: int) -> str:
    for suffix, scale in (("M", 2 ** 20), ("K", 2 ** 10)):
        if n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def _row(tokens: str, name: str, p: Prediction, ref: Prediction, world: int) -> str:
    if p.reason is not None:
        return f"| {tokens} | {name} | - | - | - | - (cannot run: {p.reason}) |"
    return (f"| {tokens} | {name} | {p.total_s * 1e3:.2f} | {ref.total_s / p.total_s:.2f}x | "
            f"{p.bytes_by_link[INTER] / world / MIB:,.0f} | {p.exposed_comm_s * 1e3:.2f} |")


def model_table(name: str, heads_q: int, heads_kv: int, head_dim: int, topology: Topology,
                seq_lens: Sequence[int], flops_per_s: float) -> str:
    """The markdown table of one model: a block of rows (reference first) per sequence length."""
    g = topology.world_size
    lines = [f"### {name} attention (H={heads_q}, Hk={heads_kv}, d={head_dim}, bf16, causal, B=1)", "",
             "| tokens | schedule | time (ms) | speed-up vs reference | inter-node MiB per rank | "
             "exposed comm (ms) |", "|---|---|---:|---:|---:|---:|"]
    for n_tokens in seq_lens:
        rows = -(-n_tokens // g)  # padded rows per rank
        shape = AttentionShape(batch=1, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, local_rows=rows,
                               world_size=g, dtype=torch.bfloat16)
        ref = predict_reference(shape, topology, causal=True, flops_per_s=flops_per_s)
        pick, preds = choose_schedule(shape, topology, causal=True, scheme="auto", flops_per_s=flops_per_s)
        tokens = label_tokens(n_tokens)
        lines.append(_row(tokens, f"{REFERENCE}, KV ring", ref, ref, g))
        for s in SCHEDULES:
            lines.append(_row(tokens, f"**{s}** (auto)" if s == pick else s, preds[s], ref, g))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m burstc.schedule.simulate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=8, help="number of nodes (default 8)")
    parser.add_argument("--node-size", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--seq-lens", default=DEFAULT_SEQ_LENS,
                        help=f"comma-separated global sequence lengths, K/M suffixes (default {DEFAULT_SEQ_LENS})")
    parser.add_argument("--inter-gbs", type=float, default=DEFAULT_LINKS[INTER].bandwidth / 1e9,
                        help="inter-node GB/s per GPU per direction (default: InfiniBand %(default)g)")
    parser.add_argument("--intra-gbs", type=float, default=DEFAULT_LINKS[INTRA].bandwidth / 1e9,
                        help="intra-node GB/s per GPU per direction (default: NVLink %(default)g)")
    parser.add_argument("--tflops", type=float, default=DEFAULT_FLOPS / 1e12,
                        help="attention kernel TFLOP/s per GPU (default %(default)g)")
    args = parser.parse_args(argv)
    try:
        seq_lens = [parse_tokens(t) for t in args.seq_lens.split(",") if t.strip()]
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if args.nodes < 1 or args.node_size < 1 or args.inter_gbs <= 0 or args.intra_gbs <= 0 or args.tflops <= 0:
        parser.error("nodes and node size must be >= 1, bandwidths and TFLOP/s > 0")
    links = {INTRA: LinkSpec(args.intra_gbs * 1e9, DEFAULT_LINKS[INTRA].latency),
             INTER: LinkSpec(args.inter_gbs * 1e9, DEFAULT_LINKS[INTER].latency)}
    topology = Topology(args.nodes * args.node_size, args.node_size, links)
    flops = args.tflops * 1e12
    print(f"Predicted forward + backward time of one attention layer on {topology.describe()}, "
          f"{args.tflops:g} TFLOP/s per GPU (cost model, not measured). Reference: flat ring, KV-ring "
          f"backward; burstc schedules: backward scheme auto; (auto) marks the schedule burstc picks.\n")
    for model in MODELS:
        print(model_table(*model, topology, seq_lens, flops))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
