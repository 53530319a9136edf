"""CPU benchmark of the topology-aware schedules: 4 gloo ranks posing as 2 nodes of 2 (node_size=2),
each schedule against the flat ring and against one process running SDPA, all measured in this run;
and the bytes each schedule sent per link class against the cost model's exact count.

    python benchmarks/schedules_cpu.py [--seq-len 8192] [--world-size 4] [--node-size 2] [--iters 2]

Every configuration runs in fresh spawned processes (`--threads` torch threads each, default 1).
Time: forward+backward of one causal attention (B=1, H heads, H_kv K/V heads, d, float32, zigzag),
median over --iters after one warm-up, the slowest rank's. Bytes: sent by all ranks per call, per link
class (burstc.comm_stats().bytes_by_link summed over ranks), and what burstc.schedule.predict says.
On one machine both link classes are the same loopback, so the times show each schedule's compute
and bookkeeping, not the inter-node savings; those are in the bytes (and, at cluster scale, in
`python -m burstc.schedule.simulate`).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from burstc.launch import run_ranks  # noqa: E402
from burstc.schedule import predict  # noqa: E402
from burstc.schedule.cost import AttentionShape, choose_backward  # noqa: E402
from burstc.schedule.layout import local_padded_length  # noqa: E402
from burstc.schedule.topology import Topology  # noqa: E402
from ring_cpu import _slowest, burst_ranks, single_process  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--node-size", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--heads-kv", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args()
    g, n, seq_len = args.world_size, args.node_size, args.seq_len
    print(f"N={seq_len}: one process, SDPA ...", file=sys.stderr, flush=True)
    single = run_ranks(1, single_process, seq_len, args.heads, args.head_dim, True, args.iters,
                       threads=args.threads, timeout_s=3600)[0]
    shape = AttentionShape(1, args.heads, args.heads_kv, args.head_dim, local_padded_length(seq_len, "zigzag", g), g,
                           torch.float32)
    topology = Topology(g, n)
    results = {}
    for schedule in predict.SCHEDULES:
        print(f"N={seq_len}: {schedule} on {g} ranks (nodes of {n}) ...", file=sys.stderr, flush=True)
        per_rank = run_ranks(g, burst_ranks, seq_len, args.heads, args.head_dim, True, args.iters, "auto", "zigzag",
                             dict(schedule=schedule, node_size=n), args.heads_kv, threads=args.threads,
                             timeout_s=3600)
        result = _slowest(per_rank)
        result["links"] = {c: sum(r["bytes_by_link"][c] for r in per_rank) for c in ("intra", "inter")}
        results[schedule] = result
    ring = results["ring"]["time"]
    head = ["schedule", "fwd+bwd s (slowest rank)", "x vs flat ring", "x vs one-process SDPA",
            "intra MiB/call (all ranks)", "inter MiB/call (all ranks)", "model: intra, inter MiB", "peak MiB/rank"]
    print(f"\nG={g} gloo ranks as {g // n} nodes of {n}, {args.threads} thread(s) each; B=1 H={args.heads} "
          f"H_kv={args.heads_kv} d={args.head_dim} float32 causal zigzag, N={seq_len}; median of {args.iters} "
          f"after 1 warm-up; one-process SDPA: {single['time']:.2f} s")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    scheme = choose_backward(shape)
    for schedule, r in results.items():
        model = {c: sum(predict.bytes_by_link(shape, topology, schedule, ph, "auto")[c] for ph in predict.PHASES)
                 for c in ("intra", "inter")}
        cells = [schedule, f"{r['time']:.2f}", f"{ring / r['time']:.2f}", f"{single['time'] / r['time']:.2f}",
                 f"{r['links']['intra'] / 2**20:.1f}", f"{r['links']['inter'] / 2**20:.1f}",
                 f"{model['intra'] / 2**20:.1f}, {model['inter'] / 2**20:.1f} (dense)", f"{r['peak_mib']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\nbackward scheme 'auto' ({scheme} for the flat shape); the model counts the dense ring: a causal "
          f"plan's trimmed rows send a little less.")


if __name__ == "__main__":
    main()
