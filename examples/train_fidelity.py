"""Training fidelity of burst's sequence mode: does a model trained with
`torch.compile(model, backend="burst")` over G ranks follow the same loss and held-out perplexity
curve as the same model trained in one process?

    python examples/train_fidelity.py --steps 300            # 1 process (Inductor) vs burst on 2 gloo ranks
    python examples/train_fidelity.py --steps 300 --noise-floor   # + 1 process eager, to judge the drift
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
different order than one process does, so the first steps' losses differ by ~1e-7 (or not at all);
training at this learning rate is chaotic, AdamW amplifies the difference over the steps (it
normalises each coordinate's update, so tiny gradient differences in near-zero coordinates matter),
and after ~100 steps the curves are different samples of the same training run: a few percent apart
in held-out perplexity at any one evaluation, with the same trend and final level. The table reports
that drift as it is. To judge it, `--noise-floor` adds a third run, one process with the other
reference (eager instead of Inductor), which drifts from the Inductor reference in the same way for
the same reason: burst's drift should be of the same size and onset. A real bug shows up as a
drift far above the noise floor, a divergence in the first steps, or a converted-site count of 0
(burst did nothing); the counters of every rank are printed.
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
            if rank == 0:
                print(f"  [{cfg['name']}] step {step}: held-out ppl {curve[-1][1]:.4f}", file=sys.stderr, flush=True)
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


def divergence(a: list[float], b: list[float]) -> str:
    """When two per-step train loss sequences first differ by more than 1e-6, 1e-4, 1e-2, and at most."""
    d = [abs(x - y) for x, y in zip(a, b)]
    if not d:
        return "no steps"
    firsts = [next((f"step {i}" for i, x in enumerate(d) if x > th), "never") for th in (1e-6, 1e-4, 1e-2)]
    onset = ", ".join(f"> {th:.0e} from {first}" for th, first in zip((1e-6, 1e-4, 1e-2), firsts))
    worst = max(range(len(d)), key=d.__getitem__)
    return f"step 0 {d[0]:.2e}; {onset}; max {d[worst]:.2e} (step {worst})"


def max_rel_ppl(a: dict, b: dict) -> float:
    return max(abs(pa - pb) / pa for (_, pa), (_, pb) in zip(a["curve"], b["curve"]))


def report(args, runs: dict, burst_ranks: list[dict], times: dict, n_files: int, sizes: tuple[int, int]) -> str:
    """runs: name -> rank 0's result, in order: the reference, burst, then optionally the noise floor."""
    names = list(runs)
    ref_name, burst_name = names[0], names[1]
    ref, burst = runs[ref_name], runs[burst_name]
    floor_name = names[2] if len(names) > 2 else None
    fmt = (lambda x: "-" if math.isnan(x) else f"{x:.6f}")
    header = (f"| step | train loss ({ref_name}) | train loss ({burst_name}) | held-out ppl ({ref_name}) "
              f"| held-out ppl ({burst_name}) | \\|ppl diff\\| |")
    if floor_name:
        header += f" held-out ppl ({floor_name}) | \\|ppl diff\\| {floor_name} vs {ref_name} |"
    lines = [
        f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}",
        f"data: Python {platform.python_version()} stdlib, {n_files} files, train {sizes[0]:,} bytes, "
        f"held-out {sizes[1]:,} bytes; batch {args.batch} x seq len {args.seq_len}, AdamW lr {args.lr}, "
        f"{args.steps} steps, {args.eval_batches} held-out batches of {args.batch} x {args.seq_len}",
        "train loss: mean over the steps since the previous row (the updates that produced that row's model)",
        "",
        header,
        "|---:" * (8 if floor_name else 6) + "|",
    ]
    prev = 0
    for i, (step, ppl_r) in enumerate(ref["curve"]):
        step_b, ppl_b = burst["curve"][i]
        assert step == step_b
        row = (f"| {step} | {fmt(mean_loss(ref['losses'], prev, step))} | "
               f"{fmt(mean_loss(burst['losses'], prev, step))} | {ppl_r:.6f} | {ppl_b:.6f} | "
               f"{abs(ppl_r - ppl_b):.2e} |")
        if floor_name:
            ppl_f = runs[floor_name]["curve"][i][1]
            row += f" {ppl_f:.6f} | {abs(ppl_r - ppl_f):.2e} |"
        lines.append(row)
        prev = step
    lines.append("")
    lines.append(f"per-step train loss |diff| {burst_name} vs {ref_name}: {divergence(ref['losses'], burst['losses'])}")
    if floor_name:
        lines.append(f"per-step train loss |diff| {floor_name} vs {ref_name} (noise floor): "
                     f"{divergence(ref['losses'], runs[floor_name]['losses'])}")
    for r in burst_ranks:
        c = r["counters"]
        lines.append(f"burst counters rank {r['rank']}: sites_converted={c.get('sites_converted', 0)} "
                     f"sites_left={c.get('sites_left', 0)} seq_graphs={c.get('seq_graphs', 0)} "
                     f"seq_fallbacks={c.get('seq_fallbacks', 0)} graphs={c.get('graphs', 0)}")
    for name, r in runs.items():
        lines.append(f"wall time {name}: {times[name]:.1f} s (spawn + compile + train; training loop "
                     f"{r['loop_s']:.1f} s, first step {r['first_step_s'] or 0:.1f} s, later steps "
                     f"{r['step_s']:.3f} s each)")
    if floor_name:
        lines.append(f"noise floor: max relative held-out ppl difference {floor_name} vs {ref_name}: "
                     f"{max_rel_ppl(ref, runs[floor_name]):.2e}")
    lines.append(f"max relative held-out ppl difference {burst_name} vs {ref_name}: {max_rel_ppl(ref, burst):.2e}; "
                 f"final held-out ppl: {ref_name} {ref['curve'][-1][1]:.6f}, {burst_name} {burst['curve'][-1][1]:.6f}")
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
    p.add_argument("--reference", default="inductor", choices=["inductor", "eager"],
                   help="how the 1-process reference runs the model")
    p.add_argument("--noise-floor", action="store_true",
                   help="also train one process with the other reference (eager <-> inductor): how far two valid "
                        "single-device float32 runs drift apart, to judge burst's drift against")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="bound on each run's wall time")
    p.add_argument("--out", help="append the report to this file")
    args = p.parse_args()
    if args.world_size < 2:
        p.error("--world-size must be at least 2 (sequence mode needs more than one rank)")
    if args.seq_len % (2 * args.world_size):
        print(f"note: seq len {args.seq_len} is not a multiple of 2 x world size; burst may fall back",
              file=sys.stderr)

    train_bytes, held_bytes, n_files = stdlib_streams()
    cfg = dict(steps=args.steps, seq_len=args.seq_len, batch=args.batch, eval_every=args.eval_every,
               eval_batches=args.eval_batches, lr=args.lr)
    other = "eager" if args.reference == "inductor" else "inductor"
    plan = [("1 process" + ("" if args.reference == "inductor" else ", eager"), 1, "reference", args.reference),
            (f"burst, {args.world_size} ranks", args.world_size, "burst", args.reference)]
    if args.noise_floor:
        plan.append((f"1 process, {other}", 1, "reference", other))
    runs, times, burst_ranks = {}, {}, None
    for name, world, mode, reference in plan:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        results = run_ranks(world, train, dict(cfg, mode=mode, reference=reference, name=name), train_bytes,
                            held_bytes, timeout_s=args.timeout_s, group_timeout_s=min(args.timeout_s, 900.0),
                            threads=1)
        times[name] = time.perf_counter() - t
        runs[name] = results[0]
        if mode == "burst":
            burst_ranks = results

    text = report(args, runs, burst_ranks, times, n_files, (len(train_bytes), len(held_bytes)))
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
