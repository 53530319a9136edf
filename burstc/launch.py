"""Run a function on G spawned gloo ranks over 127.0.0.1 and collect what each rank returns: burst
attention on one machine's CPUs without torchrun (tests, benchmarks, experiments).

Each rank's exception comes back to the caller with its traceback; ranks that hang past the
timeout are killed and reported. Spawning costs a few seconds of `import torch` per rank, so run
many cases inside one spawn. `fn` must be importable (a module-level function)."""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, out_dir, timeout_s, threads):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    result = None
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        result = ("error", traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size: int, fn, *args, timeout_s: float = 240.0, group_timeout_s: float = 120.0,
              threads: int = 1) -> list:
    """fn(rank, world_size, *args) on every rank of a fresh gloo group; returns the results by rank.
    timeout_s bounds the whole run, group_timeout_s each collective; threads is torch's per rank."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, out_dir, group_timeout_s, threads))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            raise AssertionError(f"ranks {hung} did not finish within {timeout_s} s")
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise AssertionError(f"rank {r} died (exit code {procs[r].exitcode}) without a result")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(f"rank {r} failed:\n{value}")
            results.append(value)
        return results
