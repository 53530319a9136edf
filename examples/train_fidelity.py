"""Training fidelity of burst's sequence mode: does a model trained with
`torch.compile(model, backend="burst")` over G ranks follow the same loss and held-out perplexity
curve as the same model trained in one process?

    python examples/train_fidelity.py --steps 300            # 1 process (Inductor) vs burst on 2 gloo ranks
    python examples/train_fidelity.py --steps 4 --eval-every 2 --eval-batches 2 --seq-len 64 --batch 2  # smoke

Data: real text that every machine has, the `*.py` sources of this Python's standard library
(site-packages excluded, sorted by relative path), tokenised bytewise (vocabulary 256). Files whose
sorted index % 10 == 0 form the held-out stream, the others the train stream (both capped at a few MB).
Training batches are windows at offsets drawn from a seeded generator, identical in every run and on
every rank; the held-out batches are fixed, evenly spaced windows of the held-out stream.

Model: a small `transformers.LlamaForCausalLM` (2 layers, hidden 128, 4 query / 2 key-value heads,
SDPA attention), seed 0, float32, trained with AdamW and called as `model(ids, labels=ids)`.

Two runs, each in freshly spawned processes (`burstc.launch.run_ranks`):
  (a) the reference: one process, `torch.compile(model)` with Inductor (or eager, `--reference eager`);
  (b) `--world-size` gloo ranks, `torch.compile(model, backend="burst", fullgraph=True,
      options={"parallel": "sequence"})`: every rank runs the whole model on its share of the sequence.
Every `--eval-every` steps (and at step 0 and at the end) both evaluate the held-out perplexity
exp(mean loss) under `torch.no_grad()` with the same compiled model (so evaluation runs in sequence
mode too). The script prints a markdown table of both curves, the largest relative perplexity
difference, the final perplexities, burst's counters on every rank (attention sites converted,
sequence-parallel graphs, fallbacks) and the wall time of both runs.

What to expect: the curves agree to float32 rounding drift, not bitwise. Sequence mode sums
reductions (attention's online softmax, the loss, the weight gradients over the ranks' tokens) in a
different order than one process does, so the losses differ by ~1e-6 at first; AdamW then amplifies
that slowly over hundreds of steps (it normalises the update, so tiny gradient differences in
near-zero coordinates matter), and the curves drift apart by a small fraction of a percent. The
table reports that drift as it is; a real bug shows up as a different curve (or a converted-site
count of 0, meaning burst did nothing), not as a 1e-4 relative difference.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import torch

from burstc.launch import run_ranks

TRAIN_CAP = 4_000_000  # bytes of the train stream
HELD_OUT_CAP = 500_000  # bytes of the held-out stream


def stdlib_streams(train_cap: int = TRAIN_CAP, held_out_cap: int = HELD_OUT_CAP) -> tuple[bytes, bytes, int]:
    """(train bytes, held-out bytes, files read) from the standard library's *.py files in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if "site-packages" not in p.relative_to(root).parts)
    train, held = bytearray(), bytearray()
    read = 0
    for i, rel in enumerate(files):
        stream, cap = (held, held_out_cap) if i % 10 == 0 else (train, train_cap)
        if len(stream) >= cap:
            if len(train) >= train_cap and len(held) >= held_out_cap:
                break
            continue
        try:
            stream += (root / rel).read_bytes()
        except OSError:
            continue
        read += 1
    return bytes(train[:train_cap]), bytes(held[:held_out_cap]), read


def build_model(seq_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def train(rank: int, world_size: int, cfg: dict, train_bytes: bytes, held_bytes: bytes) -> dict:
    """One run (reference or burst) on this rank; returns the curve and burst's counters."""
    from torch._dynamo.utils import counters

    torch.set_num_threads(1)
    seq, batch = cfg["seq_len"], cfg["batch"]
    train_ids = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long()
    held_ids = torch.frombuffer(bytearray(held_bytes), dtype=torch.uint8).long()

    # the same batches in every run and on every rank
    gen = torch.Generator().manual_seed(1)
    offsets = torch.randint(0, train_ids.numel() - seq, (cfg["steps"], batch), generator=gen)
    n_eval = cfg["eval_batches"] * batch
    starts = torch.linspace(0, held_ids.numel() - seq, n_eval).long()
    held_batches = [torch.stack([held_ids[s:s + seq] for s in starts[i * batch:(i + 1) * batch].tolist()])
                    for i in range(cfg["eval_batches"])]

    model = build_model(seq)
    if cfg["mode"] == "burst":
        compiled = torch.compile(model, backend="burst", fullgraph=True, options={"parallel": "sequence"})
    elif cfg["reference"] == "inductor":
        compiled = torch.compile(model)
    else:
        compiled = model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])

    def held_out_ppl() -> float:
        model.eval()
        with torch.no_grad():
            losses = [compiled(ids, labels=ids).loss.item() for ids in held_batches]
        model.train()
        return math.exp(sum(losses) / len(losses))

    losses, curve = [], []
    start = time.perf_counter()
    first_step_s, later_steps_s = None, 0.0
    for step in range(cfg["steps"] + 1):
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            curve.append((step, held_out_ppl()))
        if step == cfg["steps"]:
            break
        ids = torch.stack([train_ids[o:o + seq] for o in offsets[step].tolist()])
        t = time.perf_counter()
        loss = compiled(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if first_step_s is None:
            first_step_s = time.perf_counter() - t
        else:
            later_steps_s += time.perf_counter() - t
    return dict(losses=losses, curve=curve, loop_s=time.perf_counter() - start, first_step_s=first_step_s,
                step_s=later_steps_s / max(1, cfg["steps"] - 1), counters=dict(counters["burst"]), rank=rank)


def mean_loss(losses: list[float], lo: int, hi: int) -> float:
    return sum(losses[lo:hi]) / (hi - lo) if hi > lo else float("nan")


def report(args, ref: dict, burst_ranks: list[dict], times: tuple[float, float], n_files: int,
           sizes: tuple[int, int]) -> str:
    burst = burst_ranks[0]
    g = args.world_size
    ref_name = "1 process" if args.reference == "inductor" else "1 process, eager"
    lines = [
        f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}",
        f"data: Python {platform.python_version()} stdlib, {n_files} files, train {sizes[0]:,} bytes, "
        f"held-out {sizes[1]:,} bytes; batch {args.batch} x seq len {args.seq_len}, AdamW lr {args.lr}, "
        f"{args.steps} steps, {args.eval_batches} held-out batches",
        "",
        "train loss: mean over the steps since the previous row (the updates that produced that row's model)",
        "",
        f"| step | train loss ({ref_name}) | train loss (burst, {g} ranks) | held-out ppl ({ref_name}) "
        f"| held-out ppl (burst) | \\|ppl diff\\| |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    prev = 0
    max_rel = 0.0
    for (step, ppl_r), (step_b, ppl_b) in zip(ref["curve"], burst["curve"]):
        assert step == step_b
        lr_, lb = mean_loss(ref["losses"], prev, step), mean_loss(burst["losses"], prev, step)
        fmt = (lambda x: "-" if math.isnan(x) else f"{x:.6f}")
        lines.append(f"| {step} | {fmt(lr_)} | {fmt(lb)} | {ppl_r:.6f} | {ppl_b:.6f} | {abs(ppl_r - ppl_b):.2e} |")
        max_rel = max(max_rel, abs(ppl_r - ppl_b) / ppl_r)
        prev = step
    step_diffs = [abs(a - b) for a, b in zip(ref["losses"], burst["losses"])]
    lines.append("")
    if step_diffs:
        worst = max(range(len(step_diffs)), key=step_diffs.__getitem__)
        lines.append(f"per-step train loss |diff|: first step {step_diffs[0]:.2e}, max {step_diffs[worst]:.2e} "
                     f"(step {worst})")
    for r in burst_ranks:
        c = r["counters"]
        lines.append(f"burst counters rank {r['rank']}: sites_converted={c.get('sites_converted', 0)} "
                     f"sites_left={c.get('sites_left', 0)} seq_graphs={c.get('seq_graphs', 0)} "
                     f"seq_fallbacks={c.get('seq_fallbacks', 0)} graphs={c.get('graphs', 0)}")
    lines.append(f"wall time: {ref_name} {times[0]:.1f} s (training loop {ref['loop_s']:.1f} s, first step "
                 f"{ref['first_step_s'] or 0:.1f} s, later steps {ref['step_s']:.3f} s each); burst {g} ranks "
                 f"{times[1]:.1f} s (training loop {burst['loop_s']:.1f} s, first step "
                 f"{burst['first_step_s'] or 0:.1f} s, later steps {burst['step_s']:.3f} s each)")
    lines.append(f"max relative held-out ppl difference: {max_rel:.2e}; final held-out ppl: "
                 f"{ref_name} {ref['curve'][-1][1]:.6f}, burst {burst['curve'][-1][1]:.6f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--reference", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--timeout-s", type=float, default=3600.0, help="bound on each run's wall time")
    p.add_argument("--out", help="append the table to this file")
    args = p.parse_args()
    if args.world_size < 2:
        p.error("--world-size must be at least 2 (sequence mode needs more than one rank)")
    if args.seq_len % (2 * args.world_size):
        print(f"note: seq len {args.seq_len} is not a multiple of 2 x world size; burst may fall back",
              file=sys.stderr)

    train_bytes, held_bytes, n_files = stdlib_streams()
    cfg = dict(steps=args.steps, seq_len=args.seq_len, batch=args.batch, eval_every=args.eval_every,
               eval_batches=args.eval_batches, lr=args.lr, reference=args.reference)
    times = []
    t = time.perf_counter()
    ref = run_ranks(1, train, dict(cfg, mode="reference"), train_bytes, held_bytes,
                    timeout_s=args.timeout_s, group_timeout_s=args.timeout_s, threads=1)[0]
    times.append(time.perf_counter() - t)
    t = time.perf_counter()
    burst_ranks = run_ranks(args.world_size, train, dict(cfg, mode="burst"), train_bytes, held_bytes,
                            timeout_s=args.timeout_s, group_timeout_s=min(args.timeout_s, 900.0), threads=1)
    times.append(time.perf_counter() - t)

    text = report(args, ref, burst_ranks, tuple(times), n_files, (len(train_bytes), len(held_bytes)))
    print(text, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")
    if any(r["counters"].get("sites_converted", 0) == 0 or r["counters"].get("seq_graphs", 0) == 0
           for r in burst_ranks):
        print("WARNING: burst converted no attention site or built no sequence-parallel graph on some rank",
              file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
