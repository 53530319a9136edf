"""burstc.passes.windows: each fused spelling computes what the nodes it replaces computed (on Dynamo's
graph, fresh random inputs), and spellings that are not a window over the whole sequence are left alone."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from burstc.passes.windows import fuse_windows
from burstc.runtime.halo import sequence_shift, window_conv1d


def _fused(fn, *inputs):
    """(fn's result, the result of its graph after fuse_windows, what the fused nodes are)."""
    seen = {}

    def backend(gm, example_inputs):
        seen["count"] = fuse_windows(gm)
        seen["targets"] = [n.target for n in gm.graph.nodes if n.target in (sequence_shift, window_conv1d)]
        return gm

    torch._dynamo.reset()
    got = torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    return fn(*inputs), got, seen


conv = nn.Conv1d(6, 6, 3, groups=6)
dense = nn.Conv1d(6, 6, 4, padding="same")
causal = nn.Conv1d(6, 6, 4, dilation=2, padding=6)

CASES = {
    "token_shift": lambda x: nn.ZeroPad2d((0, 0, 1, -1))(x),
    "shift_back_with_value": lambda x: F.pad(x, (0, 0, -2, 2), value=3.0),
    "roll": lambda x: torch.roll(x, -3, 1),
    "roll_tuple": lambda x: torch.roll(x, (2,), (1,)),
    "roll_method": lambda x: x.roll(1, dims=1),
    "pad_then_conv": lambda x: conv(F.pad(x.transpose(1, 2), (2, 0))),
    "same_conv": lambda x: dense(x.transpose(1, 2)),
    "sliced_causal_conv": lambda x: causal(x.transpose(1, 2))[..., :x.shape[1]],
    "sliced_negative_stop": lambda x: causal(x.transpose(1, 2))[:, :, :-6],
    "centre_slice": lambda x: causal(x.transpose(1, 2))[..., 3:3 + x.shape[1]],
    "pad_and_padding": lambda x: F.conv1d(F.pad(x.transpose(1, 2), (1, 0)), causal.weight, None, padding=1),
}


@pytest.mark.parametrize("name", CASES)
def test_fused_spellings_compute_the_same(name):
    x = torch.randn(2, 11, 6)
    want, got, seen = _fused(CASES[name], x)
    assert seen["count"] == 1 and len(seen["targets"]) == 1, seen
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


LEFT = {
    "strided_conv": lambda x: F.conv1d(x.transpose(1, 2), conv.weight, stride=2, groups=6),
    "shorter_output": lambda x: conv(x.transpose(1, 2)),
    "reflect_pad": lambda x: conv(F.pad(x.transpose(1, 2), (2, 0), mode="reflect")),
    "pad_growing": lambda x: F.pad(x, (0, 0, 1, 0)),
    "pad_two_dims": lambda x: F.pad(x, (1, -1, 1, -1)),
    "roll_flat": lambda x: torch.roll(x, 1),
    "roll_two_dims": lambda x: x.roll((1, 1), (0, 1)),
    "slice_used_twice": lambda x: (lambda y: y[..., :11] + y[..., 2:13].sum())(causal(x.transpose(1, 2))),
}


@pytest.mark.parametrize("name", LEFT)
def test_other_spellings_are_left_alone(name):
    x = torch.randn(2, 11, 6)
    want, got, seen = _fused(LEFT[name], x)
    assert seen["count"] == 0, seen
    torch.testing.assert_close(got, want, rtol=0, atol=0)
