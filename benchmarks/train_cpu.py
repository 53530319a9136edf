"""CPU training-step benchmark: one whole training step of a small HF LLaMA (forward with the loss,
backward, AdamW step, zero_grad) in one process under Inductor, against the same step under the
"burst" backend on G gloo ranks, all measured in this run.

    python benchmarks/train_cpu.py [--seq-lens 8192 16384] [--modes single,sequence,attention]
    python benchmarks/train_cpu.py --seq-lens 131072 --layers 1 --modes sequence   # no single baseline
    python benchmarks/train_cpu.py --seq-lens 256 --iters 1 --modes single,attention --no-parallel-option
    python benchmarks/train_cpu.py --seq-lens 16384 --modes single,sequence --checkpointing off on

Model: `LlamaForCausalLM(LlamaConfig(vocab, hidden, intermediate, layers, heads=4, kv_heads=2,
max_position_embeddings=N))` with SDPA attention, float32, batch 1; loss from `labels=input_ids`,
called with HF's default use_cache (--no-cache passes use_cache=False). Every process builds the model from seed 0 and
draws the same batch from seed 1, so all configurations start from the same weights and see the
same tokens.

Mind that with transformers 5.x and torch < 2.14, `use_cache=False` under torch.compile makes HF
build an explicit N x N packed-sequence mask (no cache and no attention_mask: it checks the
position ids for packed sequences, which it cannot decide while tracing) and pass it to SDPA as
attn_mask: burst then leaves every attention as plain SDPA (the config column says "0/L sites
converted") and every configuration pays for the mask. The default call (a DynamicCache inside the
compiled graph, k/v become graph outputs) makes HF pass is_causal=True.

Configurations (`--modes`), each in its own freshly spawned processes (burstc.launch.run_ranks), one
torch thread per process:

- `single`: one process, `torch.compile(model, fullgraph=True)` (Inductor).
- `sequence`: G ranks, `torch.compile(model, backend="burst", fullgraph=True,
  options={"parallel": "sequence", "outputs": --sequence-outputs})` (lazy, the default option,
  unless asked otherwise: the loss is read, the logits are never gathered).

`--per-layer` compiles each decoder layer on its own (`layer.compile(...)`, as torchtitan does) and runs
the embedding, final norm, head and loss eagerly, on every side: the hidden states then cross a graph
boundary at every layer (burst: as this rank's rows, a SequenceShard).

`--checkpointing on` enables HF's activation checkpointing (non-reentrant) on every side, the single
process included, and its rows compare against that single process; those steps call the model with
use_cache=False (HF would turn the cache off with a warning, which fullgraph=True cannot trace).
- `torch_cp`: G ranks, PyTorch's context parallelism applied by hand, the recipe a user writes today: every
  attention is PyTorch's own ring (benchmarks/torch_cp_baseline.py, its head-tail load-balanced layout),
  called from HF through a registered attention function (a graph break; Inductor compiles the rest,
  fullgraph=False); each rank feeds its own tokens, their position ids and its share of the next-token
  labels, the loss is its sum over the global count, and one bucketed all-reduce sums the gradients.
- `attention`: G ranks, `options={"parallel": "attention"}`. `--no-parallel-option` leaves the
  "parallel" key out, for burstc versions without that option (whose only behaviour is
  attention-parallel; where the option exists its default may be another mode).

Time: one warm-up step (compilation, optimizer state), then --iters timed steps; on G ranks every
step starts after a barrier and counts as long as its slowest rank; the table shows the median.

Memory, per process (the table shows the largest over ranks), with every process run under
MALLOC_MMAP_THRESHOLD_=1 MiB so that freed tensors leave the RSS (as benchmarks/ring_cpu.py does):
- step MiB: the peak RSS during one extra step after the timed ones, minus the RSS just before it
  (the timed steps run without the sampling thread, which would compete with the ranks for the
  cores). Imports, compiled code, weights, optimizer state and glibc's allocator all exist before
  the step and do not count: what remains is what the step allocates (activations, logits, the
  gradients, the optimizer's temporaries). ring_cpu.py's `ru_maxrss` is a high-water mark since the
  process started (the warm-up's compilation usually sets it), so it cannot isolate one step;
  instead a background thread reads /proc/self/statm every 2 ms during the step. Peaks shorter than
  that can be missed.
- peak RSS MiB: the process's `ru_maxrss` at the end (compilation included).

Bytes: the last column shows, for the burst rows, what a timed step gathered (full tensors built on a rank:
`comm_stats().gathered_bytes`) and sent in halo exchanges, per step and rank.

Correctness: the loss of the first timed step (rank 0's; all ranks should agree) and its |difference|
from `single`'s, and the largest |difference| of any parameter gradient of that step (rank 0's) from
`single`'s. Both compare after one identical AdamW update, so they should be float32 rounding
(~1e-5). Without a `single` run in the same invocation those cells stay empty.

A configuration that fails (an error on any rank, or a hang past --timeout-s) gets its error in its
row and the run goes on with the next one.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from burstc.debug.memory import StepMemory  # noqa: E402
from burstc.launch import run_ranks  # noqa: E402
from burstc.runtime.stats import comm_stats  # noqa: E402
from ring_cpu import _rss_mib  # noqa: E402  (peak RSS of this process, MiB)

THREADS = 1  # torch threads per process


def modes_table(world_size: int, sequence_outputs: str, parallel_option: bool) -> dict:
    """mode -> (ranks, torch.compile backend, burst options)."""
    def burst(parallel, **rest):
        return dict(parallel=parallel, **rest) if parallel_option else rest

    return {
        "single": (1, "inductor", None),
        "sequence": (world_size, "burst", burst("sequence", outputs=sequence_outputs)),
        "attention": (world_size, "burst", burst("attention")),
        "torch_cp": (world_size, "torch_cp", None),
    }


def torch_cp_by_hand(model, input_ids, rank, world_size):
    """PyTorch's context parallelism applied by hand, as a user would: every attention is PyTorch's ring
    (benchmarks/torch_cp_baseline.py, head-tail layout; GQA's k/v heads repeated for it; a graph break,
    Inductor compiles the rest), each rank feeds its own tokens with their position ids and its share of the
    next-token labels, the loss is this rank's sum over the global count, and the gradients are all-reduced
    in one bucket after the backward. Returns (call kwargs for the model, the gradient all-reduce)."""
    import torch.distributed as dist
    from torch_cp_baseline import torch_cp_attention, torch_cp_positions
    from transformers import AttentionInterface, AttentionMaskInterface

    ring = torch._dynamo.disable(torch_cp_attention)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
        repeat = query.shape[1] // key.shape[1]
        key, value = (t.repeat_interleave(repeat, 1).contiguous() for t in (key, value))
        return ring(query.contiguous(), key, value, causal=True, scale=scaling).transpose(1, 2).contiguous(), None

    AttentionInterface.register("torch_cp", attention)
    AttentionMaskInterface.register("torch_cp", lambda *args, **kwargs: None)  # the ring is causal itself
    model.set_attn_implementation("torch_cp")
    seq_len = input_ids.shape[1]
    positions = torch_cp_positions(seq_len, rank=rank, world_size=world_size, causal=True)
    targets = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], dim=1)[:, positions]
    call = dict(input_ids=input_ids[:, positions], position_ids=positions[None], labels=targets,
                shift_labels=targets, num_items_in_batch=seq_len - 1)

    def all_reduce_grads():
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
    return call, all_reduce_grads


def train_ranks(rank, world_size, shape, seq_len, iters, backend, options, use_cache, checkpointing=False,
                per_layer=False):
    """Warm-up step, then `iters` timed steps; runs on every rank (run_ranks)."""
    import torch.distributed as dist
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         max_position_embeddings=seq_len)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(0, shape["vocab"], (1, seq_len), generator=torch.Generator().manual_seed(1))
    kwargs = {} if backend in ("inductor", "torch_cp") else {"backend": backend, "options": options}
    inputs, reduce_grads = dict(input_ids=input_ids, labels=input_ids), lambda: None
    if backend == "torch_cp":
        inputs, reduce_grads = torch_cp_by_hand(model, input_ids, rank, world_size)
    if per_layer:  # as torchtitan compiles: each decoder layer on its own, the rest eager
        for layer in model.model.layers:
            layer.compile(fullgraph=True, **kwargs)
        compiled = model
    else:
        compiled = torch.compile(model, fullgraph=backend != "torch_cp", **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = dict(model.named_parameters())
    # HF turns the cache off under checkpointing with a logged warning, which fullgraph=True refuses
    call_kwargs = {} if use_cache and not checkpointing else {"use_cache": False}
    sync = dist.barrier if world_size > 1 else (lambda: None)
    grads = {}

    def step(keep_grads=False):
        loss = compiled(**inputs, **call_kwargs).loss
        loss.backward()
        reduce_grads()
        if backend == "torch_cp":  # the reported loss: every rank's share summed
            loss = loss.detach().clone()
            dist.all_reduce(loss)
        opt.step()
        if keep_grads:  # references only: no copy inside the measured step
            grads.update((name, p.grad) for name, p in params.items())
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync()
    step()  # warm-up: compilation and AdamW's state
    frames = counters["stats"]["unique_graphs"]
    times, step_mib, losses = [], [], []
    with comm_stats() as moved:
        for i in range(iters):  # timed steps: no sampler thread competing with the ranks for the cores
            sync()
            start = time.perf_counter()
            loss = step(keep_grads=(i == 0 and rank == 0))
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
    sync()
    with StepMemory() as mem:  # one more step, for memory only
        step()
    step_mib.append(mem.mib)
    return dict(times=times, step_mib=max(step_mib), peak_rss_mib=_rss_mib(), loss=losses[0],
                gathered_mib=moved.gathered_bytes / iters / 2**20, halo_kib=moved.halo_bytes / iters / 2**10,
                grads={k: g.detach() for k, g in grads.items()} if rank == 0 else None,
                recompiled=counters["stats"]["unique_graphs"] != frames,
                sites=dict(counters["burst"]))


def measure(mode, spec, seq_len, args, shape, checkpointing=False):
    """One configuration in fresh processes: a dict of the table's numbers, or {"error": text}."""
    ranks, backend, options = spec
    print(f"N={seq_len} {mode}: {ranks} process(es), backend={backend}, options={options}, "
          f"checkpointing={checkpointing} ...", file=sys.stderr, flush=True)
    try:
        per_rank = run_ranks(ranks, train_ranks, shape, seq_len, args.iters, backend, options, args.use_cache,
                             checkpointing, args.per_layer, timeout_s=args.timeout_s, group_timeout_s=args.timeout_s, threads=THREADS)
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        print(f"N={seq_len} {mode} failed: {e}", file=sys.stderr, flush=True)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        return {"error": text if len(text) <= 300 else text[:300] + " ..."}
    r0 = per_rank[0]
    if any(r["recompiled"] for r in per_rank):
        print(f"N={seq_len} {mode}: WARNING a timed step recompiled", file=sys.stderr, flush=True)
    step_times = [max(ts) for ts in zip(*(r["times"] for r in per_rank))]  # slowest rank per step
    return dict(time=statistics.median(step_times), step_mib=max(r["step_mib"] for r in per_rank),
                peak_rss_mib=max(r["peak_rss_mib"] for r in per_rank), loss=r0["loss"],
                rank_loss_spread=max(abs(r["loss"] - r0["loss"]) for r in per_rank), grads=r0["grads"],
                gathered_mib=max(r["gathered_mib"] for r in per_rank), halo_kib=max(r["halo_kib"] for r in per_rank),
                sites=r0["sites"])


def table_row(seq_len, mode, ranks, r, base, checkpointing=False):
    label = "single"
    if mode == "torch_cp":
        label = f"PyTorch CP by hand ({ranks} ranks)"
    elif mode != "single":
        converted, left = (r.get("sites", {}).get(k, 0) for k in ("sites_converted", "sites_left"))
        sites = f", {converted}/{converted + left} sites converted" if "sites" in r else ""
        label = f"burst {mode} ({ranks} ranks{sites})"
    if checkpointing:
        label += ", checkpointing"
    if "error" in r:
        return [seq_len, label, "error: " + r["error"].replace("|", r"\|")] + [""] * 8
    loss = f"{r['loss']:.6f}"
    if r["rank_loss_spread"] > 0:
        loss += f" (ranks differ by {r['rank_loss_spread']:.1e})"
    cells = [seq_len, label, f"{r['time']:.2f}", "", f"{r['step_mib']:.0f}", "", f"{r['peak_rss_mib']:.0f}",
             loss, "", "", f"{r['gathered_mib']:.2f} / {r['halo_kib']:.1f}" if mode in ("sequence", "attention") else ""]
    if base is not None and "error" not in base:
        cells[3] = f"{base['time'] / r['time']:.2f}"
        cells[5] = f"{r['step_mib'] / base['step_mib']:.2f}" if base["step_mib"] > 0 else ""
        cells[8] = f"{abs(r['loss'] - base['loss']):.1e}"
        cells[9] = f"{max((g - base['grads'][k]).abs().max().item() for k, g in r['grads'].items()):.1e}"
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--modes", default="single,sequence,attention",
                   help="comma-separated subset of single, sequence, attention, torch_cp")
    p.add_argument("--world-size", type=int, default=2, help="ranks of the burst configurations")
    p.add_argument("--iters", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--sequence-outputs", default="lazy", choices=["lazy", "local", "gathered"],
                   help='the "outputs" option of the sequence mode (lazy is the default option)')
    p.add_argument("--per-layer", action="store_true",
                   help="compile each decoder layer on its own (torchtitan's way), the rest eager, on every side")
    p.add_argument("--checkpointing", nargs="+", default=["off"], choices=["off", "on"],
                   help="activation checkpointing (HF gradient_checkpointing_enable, non-reentrant) on every "
                        "side; 'off on' runs both, each against the single process with the same setting")
    p.add_argument("--no-parallel-option", action="store_true",
                   help='leave the "parallel" option out (burstc versions without it)')
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="call the model with use_cache=False (see above: burst converts nothing then)")
    p.add_argument("--timeout-s", type=float, default=7200, help="per configuration (and per collective)")
    p.add_argument("--out", help="also append the table to this file")
    args = p.parse_args()
    table = modes_table(args.world_size, args.sequence_outputs, not args.no_parallel_option)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(table))
    if unknown:
        p.error(f"unknown mode(s) {unknown}: choose from {', '.join(table)}")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # read by each spawned process
    shape = dict(vocab=args.vocab, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                 heads=args.heads, kv_heads=args.kv_heads)

    rows = []
    for seq_len in args.seq_lens:
        for checkpointing in (c == "on" for c in args.checkpointing):
            results = {m: measure(m, table[m], seq_len, args, shape, checkpointing) for m in modes}
            for m in modes:
                rows.append(table_row(seq_len, m, table[m][0], results[m], results.get("single"), checkpointing))

    head = ["tokens", "config", "step s (median)", "speedup vs single", "step MiB per rank",
            "step MiB / single's", "peak RSS MiB", "loss", r"\|loss diff\|", r"max \|grad diff\|",
            "gathered MiB / halo KiB per step"]
    lines = [
        f"`{shlex.join([os.path.basename(sys.executable), *sys.argv])}`",
        "",
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; {THREADS} torch thread(s) per process; "
        f"LLaMA vocab={args.vocab} hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} "
        f"heads={args.heads}/{args.kv_heads} (q/kv), float32, batch 1; training step = forward+loss "
        f"({'default use_cache' if args.use_cache else 'use_cache=False'}), backward, "
        f"AdamW step, zero_grad; median of {args.iters} after 1 warm-up; memory and grads: max over ranks / rank 0"
        + ("; each decoder layer compiled on its own" if args.per_layer else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *("| " + " | ".join(str(c) for c in r) + " |" for r in rows),
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text, end="")
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
