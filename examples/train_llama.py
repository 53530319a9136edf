"""Train a small LLaMA for a few steps with torch.compile(model, backend="burst") across torchrun ranks.

    MALLOC_MMAP_THRESHOLD_=1048576 torchrun --nproc-per-node 2 examples/train_llama.py [--steps 5] [--seq-len 4096]

Every rank is given the same model and the same full batch; in sequence mode (the default) the compiled
model runs every token-wise part on this rank's tokens only and each attention as a burst ring, and the
logits leave as a SequenceShard that the loop never reads (it needs only the loss), so they are never
gathered. Rank 0 also trains an
identical copy on one device (Inductor, plain SDPA) and prints both losses per step, which agree to
float32 rounding, and the memory each step adds on a rank against the one-device run (RSS sampled
during the step; the MALLOC_MMAP_THRESHOLD_ setting makes freed tensors leave the RSS).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import time

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from burstc.debug.memory import StepMemory


def build_model(args) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len)
    config._attn_implementation = "sdpa"  # the model calls F.scaled_dot_product_attention (causal, GQA)
    torch.manual_seed(0)  # identical weights on every rank
    return LlamaForCausalLM(config)


def factory(seq_len: int):
    """(model, example_args) of a tiny LLaMA, for `python -m burstc explain examples.train_llama:factory`."""
    args = argparse.Namespace(vocab=512, hidden=128, layers=2, heads=8, kv_heads=2, seq_len=seq_len)
    return build_model(args), (torch.randint(0, args.vocab, (1, seq_len)),)


def train_step(model, opt, idx):
    """(loss, seconds, StepMemory) of one forward, backward and optimizer step."""
    with StepMemory() as mem:
        start = time.perf_counter()
        loss = model(idx, labels=idx).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
    return loss.detach(), elapsed, mem


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="compiler for the rest of the graph")
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "striped", "contiguous"])
    p.add_argument("--parallel", default="sequence", choices=["sequence", "attention"])
    args = p.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    model = build_model(args)
    reference = copy.deepcopy(model) if rank == 0 else None
    options = {"inner": args.inner, "layout": args.layout, "parallel": args.parallel}
    compiled = torch.compile(model, backend="burst", fullgraph=True, options=options)
    reference_step = torch.compile(reference, fullgraph=True) if reference is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3) if reference is not None else None
    batches = torch.Generator().manual_seed(1)  # the same batches on every rank

    if rank == 0:
        print(f"{args.parallel} mode: training a {args.layers}-layer LLaMA (hidden {args.hidden}, {args.heads}/{args.kv_heads} heads) on "
              f"{args.batch}x{args.seq_len} tokens, {world} ranks ({backend}), inner compiler {args.inner}",
              flush=True)
        print("| step | burst loss | single-device loss | |diff| | burst step s | one device s | burst step MiB "
              "| one device MiB |", flush=True)
        print("|---|---|---|---|---|---|---|---|", flush=True)
    mib, ref_mib = [], []
    for step in range(args.steps):
        idx = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=batches)
        dist.barrier()
        loss, elapsed, mem = train_step(compiled, opt, idx)
        if reference is not None:
            ref_loss, ref_elapsed, ref_mem = train_step(reference_step, ref_opt, idx)
            if step > 0:  # step 0 compiles
                mib.append(mem.mib)
                ref_mib.append(ref_mem.mib)
            print(f"| {step} | {loss.item():.6f} | {ref_loss.item():.6f} | {abs(loss.item() - ref_loss.item()):.2e} "
                  f"| {elapsed:.2f} | {ref_elapsed:.2f} | {mem.mib:.0f} | {ref_mem.mib:.0f} |", flush=True)
    if rank == 0:
        print(f"attention sites converted: {counters['burst']['sites_converted']}, left as SDPA: "
              f"{counters['burst']['sites_left']}; graphs sequence-parallel: {counters['burst']['seq_graphs']}")
        if mib:
            print(f"memory a step adds on rank 0: {max(mib):.0f} MiB against {max(ref_mib):.0f} MiB on one device "
                  f"({max(mib) / max(max(ref_mib), 1e-9):.2f}x; steps after the first)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
