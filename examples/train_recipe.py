"""The long-context training recipe under burst: activation checkpointing + bf16 autocast + FSDP2 + sequence
parallelism, in one loop.

    torchrun --nproc-per-node 2 examples/train_recipe.py [--data 1] [--steps 3] [--seq-len 2048]
    torchrun --nproc-per-node 4 examples/train_recipe.py --data 2     # 2 data replicas x 2 sequence ranks

The ranks form a data x sequence mesh. FSDP2 shards every layer's parameters over all of them (the
flattened mesh, torchtitan's `dp_shard_cp`); burst splits each sequence over the sequence ranks. HF's
gradient checkpointing recomputes each layer in the backward (the attention ring is not rerun: its
output is saved), autocast runs the matmuls and attention in bf16, and burst leaves the gradient sum over
the sequence ranks to FSDP's reduce-scatter. Rank 0 prints each step's loss beside the loss of the same
model run on one device under the same autocast, and what the step communicated outside the rings.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)  # the same weights on every rank
    return LlamaForCausalLM(config)


def train(rank: int, world_size: int, args) -> list[dict]:
    """The loop on one rank (the process group is up); per step: its loss, the one-device loss (rank 0),
    and the bytes burst gathered and all-reduced outside the rings."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from burstc.runtime.stats import comm_stats

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sequence_degree = world_size // args.data
    mesh = init_device_mesh(device, (args.data, sequence_degree), mesh_dim_names=("data", "sequence"))
    model = build_model(args).to(device)
    reference = copy.deepcopy(model) if rank == 0 else None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    everyone = mesh["data", "sequence"]._flatten("data_sequence") if args.data > 1 else mesh["sequence"]
    for layer in model.model.layers:
        fully_shard(layer, mesh=everyone)
    fully_shard(model, mesh=everyone)
    compiled = torch.compile(model, backend="burst", options={"group": mesh["sequence"].get_group()})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3) if reference is not None else None
    batches = torch.Generator().manual_seed(1)  # the same global batches on every rank
    replica = mesh["data"].get_local_rank()
    steps = []
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.data * args.batch, args.seq_len), generator=batches).to(device)
        mine = ids[replica * args.batch:(replica + 1) * args.batch]  # this data replica's sequences
        with comm_stats() as stats, torch.autocast(device, torch.bfloat16):
            loss = compiled(mine, labels=mine, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step = dict(loss=_data_mean(loss.detach(), mesh), gathered=stats.gathered_bytes,
                    all_reduced=stats.all_reduce_bytes)
        if reference is not None:
            with torch.autocast(device, torch.bfloat16):
                ref_loss = reference(ids, labels=ids, use_cache=False).loss
            ref_loss.backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
            step["one_device_loss"] = ref_loss.item()
        steps.append(step)
    return steps


def _data_mean(loss: torch.Tensor, mesh) -> float:
    """The loss over the global batch: the mean of the data replicas' (equal token counts)."""
    if mesh["data"].size() > 1:
        loss = loss.clone()
        dist.all_reduce(loss, group=mesh["data"].get_group())
        loss /= mesh["data"].size()
    return loss.item()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=int, default=1, help="data replicas; the other factor of the ranks splits sequences")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1, help="sequences per data replica")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % args.data:
        raise SystemExit(f"--data {args.data} does not divide the {world} ranks")
    torch.set_num_threads(1)
    steps = train(rank, world, args)
    if rank == 0:
        print(f"{world} ranks: {args.data} data x {world // args.data} sequence; {args.batch * args.data} x "
              f"{args.seq_len} tokens per step; checkpointing, bf16 autocast, FSDP2, burst")
        print("| step | loss | one-device loss | gathered bytes | all-reduced bytes |")
        print("|---|---|---|---|---|")
        for i, s in enumerate(steps):
            print(f"| {i} | {s['loss']:.5f} | {s['one_device_loss']:.5f} | {s['gathered']} | {s['all_reduced']} |")
        print(f"attention converted: {counters['burst']['sites_converted']}, left: {counters['burst']['sites_left']}; "
              f"sequence-parallel graphs: {counters['burst']['seq_graphs']}, fallbacks: "
              f"{counters['burst']['seq_fallbacks']}; FSDP2 parameters reduced by FSDP alone: "
              f"{counters['burst']['seq_fsdp_params']}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
