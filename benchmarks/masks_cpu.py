"""CPU benchmark of masks under the ring: a sliding window and packed documents against the dense causal
ring and against one process running SDPA with the same materialised mask, all in this run.

    python benchmarks/masks_cpu.py [--seq-len 16384] [--world-size 2] [--window 1024] [--iters 2]

Every configuration runs in fresh spawned processes (`--threads` torch threads each, default 1).
Time: forward+backward of one attention (B=1, H heads, d, float32), median over --iters after one
warm-up; for the rings, the slowest rank's time. Bytes: what one rank sent (forward, backward), from
burstc.comm_stats; skipped: (query chunk, key chunk) pairs of that rank's ring with nothing visible,
forward and backward. The window runs on the contiguous layout (the ring becomes a halo exchange),
the documents on zigzag; the backward scheme is 'auto' (it picks by the plan's bytes).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from burstc.launch import run_ranks  # noqa: E402
from ring_cpu import _inputs, _rss_mib, _slowest, _timed, burst_ranks  # noqa: E402

# eight documents of mixed lengths, as fractions of the sequence (the last takes the rest)
_DOCUMENT_SHARES = (0.06, 0.18, 0.03, 0.15, 0.25, 0.08, 0.12)


def documents(seq_len: int) -> torch.Tensor:
    lengths = [max(1, int(s * seq_len)) for s in _DOCUMENT_SHARES]
    lengths.append(seq_len - sum(lengths))
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).view(1, -1)


def _mask_kwargs(kind: str, seq_len: int, window: int) -> dict:
    if kind == "window":
        return dict(window=(window - 1, 0))
    if kind == "documents":
        return dict(document_ids=documents(seq_len))
    return {}


def _dense_mask(kind: str, seq_len: int, window: int) -> torch.Tensor:
    i, j = torch.arange(seq_len).view(-1, 1), torch.arange(seq_len).view(1, -1)
    mask = j <= i
    if kind == "window":
        mask &= j > i - window
    if kind == "documents":
        docs = documents(seq_len)[0]
        mask &= docs.view(-1, 1) == docs.view(1, -1)
    return mask


def single_process(rank, world_size, seq_len, heads, head_dim, kind, window, iters):
    import torch.nn.functional as F

    base = _rss_mib()
    mask = _dense_mask(kind, seq_len, window)
    q, k, v, dout = (t.requires_grad_(i < 3) for i, t in enumerate(_inputs(seq_len, heads, head_dim)))

    def step():
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(dout)
    return dict(time=_timed(step, iters), peak_mib=_rss_mib() - base)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--skip-single", action="store_true", help="leave out the one-process SDPA runs")
    args = p.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    g, n = args.world_size, args.seq_len
    shape = (args.heads, args.head_dim)
    configs = [("causal", "zigzag"), ("window", "contiguous"), ("documents", "zigzag")]
    results, singles = {}, {}
    for kind, layout in configs:
        print(f"N={n} {kind}: burst on {g} ranks ({layout}) ...", file=sys.stderr, flush=True)
        results[kind] = _slowest(run_ranks(g, burst_ranks, n, *shape, True, args.iters, "auto", layout,
                                           _mask_kwargs(kind, n, args.window), threads=args.threads, timeout_s=3600))
        if not args.skip_single:
            print(f"N={n} {kind}: one process, SDPA with the materialised mask ...", file=sys.stderr, flush=True)
            singles[kind] = run_ranks(1, single_process, n, *shape, kind, args.window, args.iters,
                                      threads=args.threads, timeout_s=3600)[0]
    dense = results["causal"]["time"]
    head = ["mask", "layout", "burst fwd+bwd s", "x faster than dense causal ring", "one-process SDPA s",
            "x faster than one process", "fwd MiB sent/rank", "bwd MiB sent/rank", "skipped pairs/rank",
            "peak MiB/rank"]
    print(f"\nG={g} gloo ranks, {args.threads} thread(s) each; B=1 H={args.heads} d={args.head_dim} float32, "
          f"N={n}; window={args.window} (causal); documents: {documents(n).max().item() + 1} of mixed lengths "
          f"(causal); median of {args.iters} after 1 warm-up")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for kind, layout in configs:
        r, s = results[kind], singles.get(kind)
        name = {"causal": "causal (dense ring)", "window": f"causal + window {args.window}",
                "documents": "causal + documents"}[kind]
        print("| " + " | ".join([
            name, layout, f"{r['time']:.2f}", f"{dense / r['time']:.2f}", f"{s['time']:.2f}" if s else "",
            f"{s['time'] / r['time']:.2f}" if s else "", f"{r['forward_bytes'] / 2**20:.2f}",
            f"{r['backward_bytes'] / 2**20:.2f}", str(r["skipped"]), f"{r['peak_mib']:.0f}"]) + " |")


if __name__ == "__main__":
    main()
