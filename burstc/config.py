"""Defaults of burstc, overridable by environment variables (handy under torchrun).

BURST_LAYOUT       contiguous | zigzag | striped          (default zigzag)
BURST_BACKWARD     auto | query_ring | kv_ring            (default auto: fewer bytes wins)
BURST_KERNEL       auto | cpu | reference | triton        (default auto)
BURST_TIMEOUT_S    seconds a rank waits for a ring transfer before raising (default 300)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class BurstConfig:
    layout: str = "zigzag"
    backward: str = "auto"
    kernel: str = "auto"
    timeout_s: float = 300.0

    @classmethod
    def from_env(cls, environ=os.environ) -> "BurstConfig":
        values = {}
        for f in fields(cls):
            raw = environ.get(f"BURST_{f.name.upper()}")
            if raw is not None:
                values[f.name] = float(raw) if f.type in (float, "float") else raw
        return cls(**values)
