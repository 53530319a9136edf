"""StepMemory: what one step of work adds to this process's resident memory (CPU), for benchmarks and
demos. A background thread samples the RSS every interval while the `with` body runs; `.mib` is the peak
during the body minus the RSS at entry, so imports, compiled code, weights and optimizer state that
exist before the step do not count. Run the process with MALLOC_MMAP_THRESHOLD_=1048576 so that freed
tensors leave the RSS (glibc otherwise keeps them); peaks shorter than the interval can be missed."""
from __future__ import annotations

import resource
import threading


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class StepMemory:
    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.mib = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "StepMemory":
        self.before = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.mib = (self.peak - self.before) / 2**20
        return False
