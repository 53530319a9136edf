"""One rectangle of attention work: the unit the plan hands to a local kernel."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkItem:
    """Query rows [q_start, q_stop) attend key rows [k_start, k_stop); `causal` means top-left causal
    inside the rectangle (query row t sees key rows 0..t of the slice); `masked` means the call's mask
    (burstc.schedule.masks) is evaluated on the rectangle and handed to the kernel; otherwise every
    pair is visible."""

    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    causal: bool
    masked: bool = False

    @property
    def q_len(self) -> int:
        return self.q_stop - self.q_start

    @property
    def k_len(self) -> int:
        return self.k_stop - self.k_start

    def visible_pairs(self) -> int:
        """How many (query, key) pairs this item computes (a masked item: its whole rectangle)."""
        if not self.causal:
            return self.q_len * self.k_len
        # row t sees min(t + 1, k_len) keys
        full_rows = max(self.q_len - self.k_len, 0)
        tri_rows = self.q_len - full_rows
        return tri_rows * (tri_rows + 1) // 2 + full_rows * self.k_len

    def shifted(self, q_offset: int, k_offset: int) -> "WorkItem":
        """The same rectangle in rows counted from q_offset / k_offset (a trimmed travelling chunk)."""
        return WorkItem(self.q_start - q_offset, self.q_stop - q_offset, self.k_start - k_offset,
                        self.k_stop - k_offset, self.causal, self.masked)
