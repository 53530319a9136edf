"""How long building a ring plan takes as the sequence and the ranks grow (one process, no communication).

    python benchmarks/plan_scale.py [--sizes 16384:2 131072:8 262144:16 1048576:64] [--repeat 3]

Three masks, each planned as a steady training step plans it:
- causal: zigzag layout, built once per shape (cached afterwards; the time shown is the first build);
- documents: causal with 8 packed documents of random lengths, zigzag; a new batch brings new document
  boundaries, so this plan is rebuilt every step: the time shown is the median over `--repeat` fresh masks;
- window: causal with a sliding window of 4096 tokens, contiguous layout, built once per shape.

Today every rank builds the plan of all G ranks (`build_plan(...)`, checked on construction) and runs its
own share; the table is that cost, per rank and call. Medians of wall-clock time on this machine.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from burstc.schedule.masks import AttentionMask
from burstc.schedule.plan import build_plan


def _documents(seq_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(seq_len - 1, generator=gen)[:7] + 1).values
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([seq_len])]))
    return torch.repeat_interleave(torch.arange(8), lengths).view(1, -1)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(seq_len: int, world: int, repeat: int, window: int) -> dict:
    causal = _time(lambda: build_plan(world, "zigzag", seq_len, True))
    docs = statistics.median(
        _time(lambda i=i: build_plan(world, "zigzag", seq_len, True,
                                     mask=AttentionMask(causal=True, document_ids=_documents(seq_len, i))))
        for i in range(repeat))
    windowed = _time(lambda: build_plan(world, "contiguous", seq_len, True,
                                        mask=AttentionMask(causal=True, window=(window, 0))))
    return dict(causal=causal, documents=docs, window=windowed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["16384:2", "131072:8", "262144:16", "1048576:64"],
                   help="N:G pairs")
    p.add_argument("--repeat", type=int, default=3, help="fresh document masks per size")
    p.add_argument("--window", type=int, default=4096)
    args = p.parse_args()
    lines = [f"{datetime.datetime.now().isoformat(timespec='seconds')}; seconds per build_plan call (all ranks' plan)",
             "", "| N | G | causal (once per shape) | new document mask (every step) | causal + window (once) |",
             "|---|---|---|---|---|"]
    for size in args.sizes:
        n, g = (int(x) for x in size.split(":"))
        print(f"N={n} G={g} ...", flush=True)
        r = measure(n, g, args.repeat, args.window)
        lines.append(f"| {n} | {g} | {r['causal']:.3f} | {r['documents']:.3f} | {r['window']:.3f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
