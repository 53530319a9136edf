"""Burst attention on a long random sequence across torchrun ranks, checked against one device.

    torchrun --nproc-per-node 2 examples/ring_demo.py --seq-len 8192
    BURST_NODE_SIZE=2 torchrun --nproc-per-node 4 examples/ring_demo.py   # 4 ranks posing as 2 nodes

Every rank builds the same full q, k, v (same seed), keeps its zigzag shard, runs burst attention
forward and backward, and compares its shard of the output and gradients with single-device
F.scaled_dot_product_attention on the full tensors. Rank 0 prints one row per rank.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import resource
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import burstc
from burstc.schedule.topology import topology_for


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA when fewer than --heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layout", default="zigzag", choices=burstc.LAYOUTS)
    p.add_argument("--backward", default="auto", choices=["auto", "query_ring", "kv_ring"])
    p.add_argument("--schedule", default="auto", choices=["auto", "ring", "double_ring", "ulysses_ring"],
                   help="how chunks travel over several nodes (BURST_NODE_SIZE=2 on 4 ranks poses as 2 nodes)")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else torch.device("cpu")
    causal = not args.no_causal

    g = torch.Generator().manual_seed(0)
    full = lambda h: torch.randn(1, h, args.seq_len, args.head_dim, generator=g).to(device)  # noqa: E731
    q, k, v, dout = full(args.heads), full(args.kv_heads), full(args.kv_heads), full(args.heads)
    shard = lambda x: burstc.shard_sequence(x, dim=2, layout=args.layout, world_size=world, rank=rank)  # noqa: E731
    ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
    topology = topology_for(world)
    if rank == 0:
        print(f"burst attention: {world} ranks ({backend}) in {topology.describe()}, N={args.seq_len}, "
              f"H={args.heads}/{args.kv_heads}, d={args.head_dim}, causal={causal}, layout={args.layout}", flush=True)
        if topology.nodes == 1 or args.schedule != "auto":
            schedule = "ring" if topology.nodes == 1 else args.schedule
            print(burstc.build_plan(world, args.layout, args.seq_len, causal, schedule=schedule,
                                    node_size=topology.node_size).table(), flush=True)
        else:  # the runtime logs the schedule the cost model picks (TORCH_LOGS="+burstc" does the same)
            logging.basicConfig(format="%(message)s")
            logging.getLogger("burstc.runtime").setLevel(logging.INFO)

    dist.barrier()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with burstc.comm_stats() as stats:
        out = burstc.burst_attention(ql, kl, vl, causal=causal, enable_gqa=True, layout=args.layout,
                                     backward=args.backward, schedule=args.schedule)
        out.backward(shard(dout))
    elapsed = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # the single-device reference, on the full sequence (every rank checks its own shard)
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, enable_gqa=True)
    ref.backward(dout)
    errors = [(a - shard(b)).abs().max().item() for a, b in
              ((out, ref), (ql.grad, qq.grad), (kl.grad, kk.grad), (vl.grad, vv.grad))]

    row = [rank, ql.shape[2], f"{elapsed:.2f}", f"{max(errors):.2e}", f"{stats.forward_bytes / 2**20:.1f}",
           f"{stats.backward_bytes / 2**20:.1f}", f"{stats.bytes_by_link['inter'] / 2**20:.1f}",
           f"{peak_rss:.0f} (+{peak_rss - rss_before:.0f})"]
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        head = ["rank", "tokens", "fwd+bwd s", "max |err| vs SDPA", "fwd MiB sent", "bwd MiB sent",
                "of which inter-node MiB", "peak RSS MiB (+burst)"]
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for r in rows:
            print("| " + " | ".join(str(c) for c in r) + " |")
        worst = max(float(r[3]) for r in rows)
        print(f"max error over ranks {worst:.2e}: {'OK' if worst < 1e-4 else 'MISMATCH'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
