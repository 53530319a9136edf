"""CPU ring benchmark: burst attention on G gloo ranks against one process running SDPA, and against
PyTorch's own context-parallel ring on the same ranks and shapes, all measured in this run.

    python benchmarks/ring_cpu.py [--seq-lens 8192 16384] [--world-size 2] [--iters 2]

Every configuration runs in fresh spawned processes with `--threads` torch threads each (default 1),
so peak memory is per configuration. Time: forward+backward of one attention (B=1, H heads, d),
median over --iters after one warm-up; for the rings, the slowest rank's time. Peak memory: the
process's peak RSS minus its RSS after imports (`ru_maxrss`), max over ranks; every process runs with
MALLOC_MMAP_THRESHOLD_=1 MiB so that freed tensors leave the RSS (otherwise glibc keeps them and the
peak measures the allocator, not the live tensors). Bytes: what one rank sent (burstc.comm_stats),
per backward scheme.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from burstc.launch import run_ranks  # noqa: E402


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(seq_len, heads, head_dim, seed=0):
    """Fresh random q, k, v, dout of this process's length (a rank makes only its own shard, so peak
    memory is not inflated by a full-sequence copy; correctness is the tests' job)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, seq_len, head_dim, generator=g) for _ in range(4)]


def _timed(step, iters, sync=lambda: None):
    step()  # warm-up
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def single_process(rank, world_size, seq_len, heads, head_dim, causal, iters):
    import torch.nn.functional as F

    base = _rss_mib()
    q, k, v, dout = (t.requires_grad_(i < 3) for i, t in enumerate(_inputs(seq_len, heads, head_dim)))

    def step():
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(dout)
    return dict(time=_timed(step, iters), peak_mib=_rss_mib() - base)


def burst_ranks(rank, world_size, seq_len, heads, head_dim, causal, iters, scheme, layout, extra=None,
                heads_kv=None):
    """extra: more keyword arguments of burst_attention (masks: benchmarks/masks_cpu.py; schedule and
    node_size: benchmarks/schedules_cpu.py). heads_kv: grouped-query attention's K/V heads."""
    import torch.distributed as dist

    import burstc

    base = _rss_mib()
    local = burstc.local_length(seq_len, layout, world_size, rank)
    q, k, v, dout = _inputs(local, heads, head_dim, seed=rank)
    if heads_kv is not None:
        k, v = k[:, :heads_kv].contiguous(), v[:, :heads_kv].contiguous()
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step():
        q.grad = k.grad = v.grad = None
        burstc.burst_attention(q, k, v, causal=causal, layout=layout, backward=scheme, enable_gqa=heads_kv is not None,
                               **(extra or {})).backward(dout)
    with burstc.comm_stats() as stats:
        elapsed = _timed(step, iters, sync=dist.barrier)
    calls = iters + 1
    return dict(time=elapsed, peak_mib=_rss_mib() - base, forward_bytes=stats.forward_bytes // calls,
                backward_bytes=stats.backward_bytes // calls, skipped=stats.skipped_pairs // calls,
                bytes_by_link={c: b // calls for c, b in stats.bytes_by_link.items()})


def torch_cp_ranks(rank, world_size, seq_len, heads, head_dim, causal, iters):
    import torch.distributed as dist

    from torch_cp_baseline import torch_cp_attention

    base = _rss_mib()
    q, k, v, dout = _inputs(seq_len // world_size, heads, head_dim, seed=rank)  # its ring needs N % 2G == 0
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step():
        q.grad = k.grad = v.grad = None
        torch_cp_attention(q, k, v, causal=causal, group=dist.group.WORLD).backward(dout)
    return dict(time=_timed(step, iters, sync=dist.barrier), peak_mib=_rss_mib() - base)


def _slowest(per_rank):
    return dict(per_rank[0], time=max(r["time"] for r in per_rank), peak_mib=max(r["peak_mib"] for r in per_rank))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--skip-torch-cp", action="store_true", help="leave out PyTorch's ring")
    args = p.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # read by each spawned process
    g = args.world_size
    shape = (args.heads, args.head_dim)
    rows = []
    for seq_len in args.seq_lens:
        for causal in (True, False):
            layout = "zigzag"
            print(f"N={seq_len} causal={causal}: single process ...", file=sys.stderr, flush=True)
            single = run_ranks(1, single_process, seq_len, *shape, causal, args.iters,
                               threads=args.threads, timeout_s=3600)[0]
            results = {}
            for scheme in ("query_ring", "kv_ring"):
                print(f"N={seq_len} causal={causal}: burst {scheme} on {g} ranks ...", file=sys.stderr, flush=True)
                results[f"burst ({scheme})"] = _slowest(run_ranks(
                    g, burst_ranks, seq_len, *shape, causal, args.iters, scheme, layout,
                    threads=args.threads, timeout_s=3600))
            if not args.skip_torch_cp:
                print(f"N={seq_len} causal={causal}: torch CP ring on {g} ranks ...", file=sys.stderr, flush=True)
                results["torch CP ring"] = _slowest(run_ranks(
                    g, torch_cp_ranks, seq_len, *shape, causal, args.iters, threads=args.threads, timeout_s=3600))
            cp_time = results.get("torch CP ring", {}).get("time")
            rows.append([seq_len, causal, "single process SDPA", f"{single['time']:.2f}", "1.00", "",
                         "", "", f"{single['peak_mib']:.0f}"])
            for name, r in results.items():
                rows.append([seq_len, causal, name, f"{r['time']:.2f}", f"{single['time'] / r['time']:.2f}",
                             f"{cp_time / r['time']:.2f}" if cp_time else "",
                             f"{r['forward_bytes'] / 2**20:.1f}" if "forward_bytes" in r else "",
                             f"{r['backward_bytes'] / 2**20:.1f}" if "backward_bytes" in r else "",
                             f"{r['peak_mib']:.0f}"])
    head = ["N", "causal", "method", "fwd+bwd s", "speedup vs single", "vs torch CP (x faster)",
            "fwd MiB sent/rank", "bwd MiB sent/rank", "peak MiB/rank"]
    print(f"\nG={g} gloo ranks, {args.threads} thread(s) each; B=1 H={args.heads} d={args.head_dim} float32; "
          f"median of {args.iters} after 1 warm-up; causal runs use the zigzag layout (torch CP: head-tail)")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


if __name__ == "__main__":
    main()
