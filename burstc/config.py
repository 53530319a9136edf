"""One options dataclass for burstc. `torch.compile(..., options={...})` keys and BURST_* environment
variables (handy under torchrun) map onto its fields; options win over the environment.

| field     | env               | default  | meaning |
|-----------|-------------------|----------|---------|
| layout    | BURST_LAYOUT      | zigzag   | contiguous, zigzag or striped sequence layout of the ring |
| backward  | BURST_BACKWARD    | auto     | auto, query_ring or kv_ring backward scheme (auto: fewer bytes) |
| kernel    | BURST_KERNEL      | auto     | auto, cpu, reference or triton local kernel |
| timeout_s | BURST_TIMEOUT_S   | 300      | seconds a rank waits for a ring transfer before raising |
| inner     | BURST_INNER       | inductor | compiler for the rest of the graph: inductor, aot_eager or eager |
| verify    | BURST_VERIFY      | False    | first call of each converted site also runs plain SDPA and raises on a mismatch |
| dump_dir  | BURST_DUMP_DIR    | None     | write graphs, plans, pictures and kernels of each compiled graph there |
| exclude   | BURST_EXCLUDE     | ()       | attention sites left as plain SDPA: graph node names ('y_1') or 'file.py:line' (comma-separated in the env) |
| group     | -                 | None     | the ring's torch.distributed process group (None: the default group) |
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class BurstConfig:
    layout: str = "zigzag"
    backward: str = "auto"
    kernel: str = "auto"
    timeout_s: float = 300.0
    inner: str = "inductor"
    verify: bool = False
    exclude: tuple[str, ...] = ()
    dump_dir: Optional[str] = None
    group: Optional[Any] = None  # torch.distributed.ProcessGroup

    @classmethod
    def from_env(cls, environ=os.environ) -> "BurstConfig":
        values = {}
        for f in fields(cls):
            raw = environ.get(f"BURST_{f.name.upper()}")
            if raw is None or f.name == "group":
                continue
            if f.name == "timeout_s":
                values[f.name] = float(raw)
            elif f.name == "verify":
                values[f.name] = raw.strip().lower() in _TRUE
            elif f.name == "exclude":
                values[f.name] = tuple(s.strip() for s in raw.split(",") if s.strip())
            else:
                values[f.name] = raw
        return cls(**values)

    @classmethod
    def from_options(cls, options: Optional[dict], environ=os.environ) -> "BurstConfig":
        """The environment's config with torch.compile's options on top; unknown keys raise."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown burst option(s) {unknown}: valid options are {sorted(known)}")
        if "exclude" in options:
            options["exclude"] = tuple(options["exclude"])
        cfg = replace(cls.from_env(environ), **options)
        if cfg.inner not in INNER_COMPILERS:
            raise ValueError(f"unknown inner compiler {cfg.inner!r}: choose one of {', '.join(INNER_COMPILERS)}")
        return cfg
