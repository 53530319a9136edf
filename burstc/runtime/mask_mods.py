"""FlexAttention mask_mods inside compiled graphs: the op schemas cannot carry a function, so a traced
mask_mod (a GraphModule taking b, h, q_idx, kv_idx and its captured tensors) is registered here under a
name, and ops carry the name and the tensors."""
from __future__ import annotations

import hashlib
import itertools
from typing import Callable

import torch

_registry: dict[str, Callable] = {}
_names = itertools.count()


def register(fn: Callable) -> str:
    """A name for fn, the same on every rank that registers the same graphs in the same order."""
    name = f"mask_mod_{next(_names)}"
    _registry[name] = fn
    return name


class BoundMaskMod:
    """mask_mod(b, h, q_idx, kv_idx) of a registered function and its captured tensors."""

    __qualname__ = "BoundMaskMod"

    def __init__(self, name: str, buffers: list[torch.Tensor]):
        if name not in _registry:
            raise ValueError(f"no mask_mod registered as {name!r} in this process")
        self.name, self.fn, self.buffers = name, _registry[name], list(buffers)

    def __call__(self, b, h, q_idx, kv_idx):
        return self.fn(b, h, q_idx, kv_idx, *self.buffers)

    def digest(self) -> bytes:
        """What ranks must agree on: the function's code and the captured tensors."""
        h = hashlib.sha1(str(getattr(self.fn, "code", self.name)).encode())
        for t in self.buffers:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()
