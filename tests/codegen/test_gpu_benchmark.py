"""benchmarks/gpu_kernels.py needs a GPU to run; here it must import and parse its arguments."""
import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_kernels.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_kernels_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments_and_flop_count():
    bench = load()
    args = bench.parse_args([])
    assert args.seq_lens == [4096, 8192, 16384, 32768] and args.head_dim == 128 and args.dtype == "bf16"
    assert args.masks == ["full", "causal"] and args.ring_size == 4
    args = bench.parse_args(["--seq-lens", "4096", "--masks", "causal", "--ring-size", "0"])
    assert args.seq_lens == [4096] and args.masks == ["causal"] and args.ring_size == 0
    assert bench.attention_flops(1, 1, 4, 2, causal=False) == 128
    assert bench.attention_flops(1, 1, 4, 2, causal=True) == 64


def test_refuses_to_run_without_cuda(capsys):
    if torch.cuda.is_available():
        return
    assert load().main(["--seq-lens", "4096"]) == 1
    assert "CUDA" in capsys.readouterr().err
