"""Train a small LLaMA for a few steps with torch.compile(model, backend="burst") across torchrun ranks.

    torchrun --nproc-per-node 2 examples/train_llama.py [--steps 5] [--seq-len 256]

Every rank holds the same model and the same batch (attention-parallel mode): each attention of the
compiled graph runs as a burst ring over the ranks, the rest of the model runs replicated. Rank 0
also trains an identical copy eagerly on one device with plain SDPA and prints both losses per step:
they agree to float32 rounding.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="compiler for the rest of the graph")
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "striped", "contiguous"])
    args = p.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    model = build_model(args)
    reference = copy.deepcopy(model) if rank == 0 else None
    compiled = torch.compile(model, backend="burst", fullgraph=True,
                             options={"inner": args.inner, "layout": args.layout})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3) if reference is not None else None
    batches = torch.Generator().manual_seed(1)  # the same batches on every rank

    if rank == 0:
        print(f"training a {args.layers}-layer LLaMA (hidden {args.hidden}, {args.heads}/{args.kv_heads} heads) on "
              f"{args.batch}x{args.seq_len} tokens, {world} ranks ({backend}), inner compiler {args.inner}",
              flush=True)
        print("| step | burst loss | single-device loss | |diff| | step s |", flush=True)
        print("|---|---|---|---|---|", flush=True)
    for step in range(args.steps):
        idx = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=batches)
        start = time.perf_counter()
        loss = compiled(idx, labels=idx).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        elapsed = time.perf_counter() - start
        if reference is not None:
            ref_loss = reference(idx, labels=idx).loss
            ref_loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            print(f"| {step} | {loss.item():.6f} | {ref_loss.item():.6f} | {abs(loss.item() - ref_loss.item()):.2e} "
                  f"| {elapsed:.2f} |", flush=True)
    if rank == 0:
        print(f"attention sites converted: {counters['burst']['sites_converted']}, "
              f"left as SDPA: {counters['burst']['sites_left']}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
