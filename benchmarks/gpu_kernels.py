"""GPU benchmark of burstc's Triton kernels against F.scaled_dot_product_attention (flash backend).

    python benchmarks/gpu_kernels.py [--seq-lens 4096 8192 16384 32768] [--heads 16] [--head-dim 128]

TFLOP/s of one local attention (one WorkItem covering all rows: forward = init + step + finalise,
backward = delta + dK/dV + dQ kernels) and of SDPA's flash kernels on the same inputs, bf16, causal
and not; then, if `burstc.burst_attention` is available, a 1-GPU virtual ring of 4 ranks with the
Triton kernels. Prints a markdown table. FLOPs: forward 4·B·H·N²·d, backward 2.5x that, both halved
under causal masking.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="GQA: key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--masks", choices=["full", "causal"], nargs="+", default=["full", "causal"])
    parser.add_argument("--ring-size", type=int, default=4, help="virtual world size of the ring run (0: skip)")
    parser.add_argument("--rep-ms", type=int, default=200, help="time budget per measurement")
    return parser.parse_args(argv)


def attention_flops(batch, heads, seq_len, head_dim, causal) -> float:
    """Forward FLOPs of attention (two matmuls); backward counts 2.5 times this."""
    flops = 4.0 * batch * heads * seq_len * seq_len * head_dim
    return flops / 2 if causal else flops


def time_ms(fn, rep_ms) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=max(rep_ms // 4, 10), rep=rep_ms)


def burstc_kernels(q, k, v, dout, causal, rep_ms) -> tuple[float, float]:
    """(forward ms, backward ms) of the Triton local kernels on one item covering everything."""
    from burstc.runtime.kernels.base import QueryBundle, WorkItem
    from burstc.runtime.kernels.triton import TritonKernel

    kernel = TritonKernel()
    reason = kernel.supports(q)
    if reason:
        raise RuntimeError(reason)
    item = WorkItem(0, q.shape[2], 0, k.shape[2], causal)
    scale = q.shape[-1] ** -0.5

    def forward():
        state = kernel.forward_init(q)
        kernel.forward_step(state, q, k, v, item, scale)
        return kernel.forward_finalize(state)

    out, lse = forward()
    bundle = QueryBundle(q=q, dout=dout, lse=lse, delta=kernel.delta(out, dout), out=out)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)

    def backward():
        bundle.delta = kernel.delta(out, dout)
        kernel.backward_step(bundle, k, v, item, scale, dq, dk, dv)

    return time_ms(forward, rep_ms), time_ms(backward, rep_ms)


def sdpa_flash(q, k, v, dout, causal, rep_ms) -> tuple[float, float]:
    """(forward ms, backward ms) of SDPA restricted to the flash backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q.shape[1] != k.shape[1]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        def forward():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        forward_ms = time_ms(forward, rep_ms)
        out = forward()
        backward_ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), rep_ms)
    return forward_ms, backward_ms


def virtual_ring(q, k, v, dout, causal, ring_size, rep_ms) -> tuple[float, float]:
    """(forward ms, backward ms) of burstc.burst_attention on a virtual ring in this one GPU."""
    import burstc

    gqa = q.shape[1] != k.shape[1]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def forward():
        return burstc.burst_attention(q, k, v, causal=causal, enable_gqa=gqa, virtual_world_size=ring_size,
                                      kernel="triton")

    forward_ms = time_ms(forward, rep_ms)
    out = forward()
    backward_ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), rep_ms)
    return forward_ms, backward_ms


def tflops(flops, ms) -> str:
    return f"{flops / ms / 1e9:.1f}" if ms else "-"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 1
    dtype = DTYPES[args.dtype]
    kv_heads = args.kv_heads or args.heads
    name = torch.cuda.get_device_name()
    print(f"# burstc Triton kernels vs SDPA flash on {name}: B={args.batch} H={args.heads} H_kv={kv_heads} "
          f"d={args.head_dim} {args.dtype}\n")
    ring = f"ring x{args.ring_size}" if args.ring_size else None
    header = ["N", "mask", "pass", "burstc TFLOP/s", "SDPA flash TFLOP/s", "burstc / SDPA"] + (
        [f"{ring} TFLOP/s"] if ring else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for seq_len in args.seq_lens:
        for mask in args.masks:
            causal = mask == "causal"
            torch.manual_seed(0)
            q = torch.randn(args.batch, args.heads, seq_len, args.head_dim, device="cuda", dtype=dtype)
            k = torch.randn(args.batch, kv_heads, seq_len, args.head_dim, device="cuda", dtype=dtype)
            v, dout = torch.randn_like(k), torch.randn_like(q)
            ours = burstc_kernels(q, k, v, dout, causal, args.rep_ms)
            flash = sdpa_flash(q, k, v, dout, causal, args.rep_ms)
            ring_ms = (None, None)
            if ring:
                try:
                    ring_ms = virtual_ring(q, k, v, dout, causal, args.ring_size, args.rep_ms)
                except Exception as error:  # noqa: BLE001 - the ring API is optional here
                    print(f"<!-- virtual ring skipped: {type(error).__name__}: {error} -->", file=sys.stderr)
            flops = attention_flops(args.batch, args.heads, seq_len, args.head_dim, causal)
            for index, (stage, stage_flops) in enumerate((("fwd", flops), ("bwd", 2.5 * flops))):
                row = [str(seq_len), mask, stage, tflops(stage_flops, ours[index]), tflops(stage_flops, flash[index]),
                       f"{flash[index] / ours[index]:.2f}"]
                if ring:
                    row.append(tflops(stage_flops, ring_ms[index]))
                print("| " + " | ".join(row) + " |", flush=True)
            del q, k, v, dout
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
