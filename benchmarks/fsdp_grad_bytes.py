"""Gradient bytes per training step under FSDP2 + burst: what FSDP's reduce-scatter sends and what burst
all-reduces, with burst leaving the sum over the sequence ranks to FSDP (the default) against burst
summing the gradients itself first (what it did before it recognised FSDP2-managed parameters).

    python benchmarks/fsdp_grad_bytes.py [--world-size 2] [--data 1] [--seq-len 1024]

Model: HF `LlamaForCausalLM` (vocab 512, hidden 128, 2 layers, 8/2 heads), FSDP2 on every layer and the
model over the flattened data x sequence mesh, compiled whole with burst over the sequence ranks; the
counts are of one steady step (after a warm-up), on rank 0, by wrapping torch.distributed's
`reduce_scatter_single` (FSDP2's) and `all_reduce` (bytes of the input each rank hands over). The
all-reduce of the default row is burst's: the loss (8 bytes) and, in the backward, the gradient of the
hidden states entering the first layer's graph (the embedding's graph has no attention and receives no
shard, so it runs replicated and its output is sharded where the first layer takes it).
"""
from __future__ import annotations

import argparse
import sys
from os.path import abspath, dirname

import torch

sys.path.insert(0, dirname(dirname(abspath(__file__))))

from burstc.launch import run_ranks  # noqa: E402


def _step_bytes(rank, world_size, data, seq_len, leave_to_fsdp):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    import burstc.backend
    import burstc.runtime.fsdp

    if not leave_to_fsdp:
        burstc.backend.fsdp_scales = lambda *args: {}
    counted = {"reduce_scatter": 0, "all_reduce": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            tensor = (args[1] if len(args) > 1 else kwargs["input"]) if name == "reduce_scatter" else \
                (args[0] if args else kwargs["tensor"])
            counted[name] += tensor.numel() * tensor.element_size()
            return fn(*args, **kwargs)
        return wrapper
    dist.reduce_scatter_single = counting("reduce_scatter", dist.reduce_scatter_single)  # what FSDP2 calls
    dist.all_reduce = counting("all_reduce", dist.all_reduce)

    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=seq_len)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    mesh = init_device_mesh("cpu", (data, world_size // data), mesh_dim_names=("dp", "cp"))
    everyone = mesh["dp", "cp"]._flatten("dp_cp") if data > 1 else mesh["cp"]
    for layer in model.model.layers:
        fully_shard(layer, mesh=everyone)
    fully_shard(model, mesh=everyone)
    compiled = torch.compile(model, backend="burst", options={"group": mesh["cp"].get_group()})
    ids = torch.randint(0, 512, (1, seq_len), generator=torch.Generator().manual_seed(1))
    compiled(ids, labels=ids, use_cache=False).loss.backward()
    for key in counted:
        counted[key] = 0
    model.zero_grad()
    loss = compiled(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return dict(counted, params=params, loss=loss.item())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--data", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    args = p.parse_args()
    rows = []
    for leave in (True, False):
        r = run_ranks(args.world_size, _step_bytes, args.data, args.seq_len, leave, timeout_s=1800)[0]
        label = "burst leaves the sum to FSDP (default)" if leave else "burst all-reduces the gradients too"
        rows.append(f"| {label} | {r['params']} | {r['reduce_scatter']} | {r['all_reduce']} | "
                    f"{r['reduce_scatter'] + r['all_reduce']} | {r['loss']:.6f} |")
    print(f"`python benchmarks/fsdp_grad_bytes.py --world-size {args.world_size} --data {args.data} "
          f"--seq-len {args.seq_len}`\n")
    print("| configuration | parameter bytes | FSDP reduce-scatter bytes | all-reduce bytes | total | loss |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
