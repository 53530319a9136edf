"""How long building a ring plan takes as the sequence and the ranks grow (one process, no communication).

    python benchmarks/plan_scale.py [--sizes 16384:2 131072:8 262144:16 1048576:64] [--repeat 3]

Three masks, each planned as a steady training step plans it:
- causal: zigzag layout, built once per shape (cached afterwards; the time shown is the first build);
- documents: causal with 8 packed documents of random lengths, zigzag; a new batch brings new document
  boundaries, so this plan is rebuilt every step: the time shown is the median over `--repeat` fresh masks;
- window: causal with a sliding window of 4096 tokens, contiguous layout, built once per shape.

A rank builds only its share (`build_plan(..., rank=r)`: its pairs' work items, every other pair as a
summary, checked for its pairs); `--every-rank` also times the all-rank plan that `explain` and the dumps
build. Medians of wall-clock time on this machine.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import time

import torch

import burstc.schedule.plan as plan_module
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


def _fresh() -> None:
    """Forget cached plans (every timing below is a first build) and collect their garbage, so that no
    timing pays for the collection of an earlier, larger plan."""
    plan_module._build_cached.cache_clear()
    plan_module._masked_plans.clear()
    gc.collect()


def _plans(seq_len: int, world: int, window: int, rank, seed: int) -> dict:
    """Seconds to build each kind of plan (rank None: every rank's; else that rank's share)."""
    _fresh()
    causal = _time(lambda: build_plan(world, "zigzag", seq_len, True, rank=rank))
    documents = AttentionMask(causal=True, document_ids=_documents(seq_len, seed))  # made outside the timing
    docs = _time(lambda: build_plan(world, "zigzag", seq_len, True, rank=rank, mask=documents))
    windowed = _time(lambda: build_plan(world, "contiguous", seq_len, True, rank=rank,
                                        mask=AttentionMask(causal=True, window=(window, 0))))
    return dict(causal=causal, documents=docs, window=windowed)


def measure(seq_len: int, world: int, repeat: int, window: int, every_rank: bool) -> dict:
    """Per kind: the slowest of three ranks (first, middle, last) building their share, median over `repeat`
    fresh document masks; with every_rank, also the all-rank plan (explain, dumps)."""
    ranks = sorted({0, world // 2, world - 1})
    runs = [[_plans(seq_len, world, window, r, seed) for r in ranks] for seed in range(repeat)]
    out = {kind: statistics.median(max(run[kind] for run in per_seed) for per_seed in runs)
           for kind in ("causal", "documents", "window")}
    if every_rank:
        whole = [_plans(seq_len, world, window, None, seed) for seed in range(repeat)]
        out.update({f"all {kind}": statistics.median(w[kind] for w in whole) for kind in ("causal", "documents", "window")})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["16384:2", "131072:8", "262144:16", "1048576:64"],
                   help="N:G pairs")
    p.add_argument("--repeat", type=int, default=3, help="fresh document masks per size")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--every-rank", action="store_true", help="also time the all-rank plan (explain, dumps)")
    args = p.parse_args()
    kinds = ("causal", "documents", "window") + (("all causal", "all documents", "all window") if args.every_rank
                                                 else ())
    lines = [f"{datetime.datetime.now().isoformat(timespec='seconds')}; seconds per build_plan call, the slowest "
             "of ranks 0, G/2, G-1 building their share (build_plan(..., rank=r)); 'all': every rank's plan", "",
             "| N | G | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for size in args.sizes:
        n, g = (int(x) for x in size.split(":"))
        print(f"N={n} G={g} ...", flush=True)
        r = measure(n, g, args.repeat, args.window, args.every_rank)
        lines.append(f"| {n} | {g} | " + " | ".join(f"{r[k]:.3f}" for k in kinds) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
