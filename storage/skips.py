"""Counted, logged skips: bad input never crashes a run and is never lost silently."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("glipctl")


@dataclass
class StageCounts:
    """What one unit of work (a shard, a file) read, wrote and skipped, by reason."""
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    max_logged: int = 20
    _logged: int = 0

    def skip(self, reason: str, where: str = "", detail: str = "") -> None:
        """Count a skip; log the first ``max_logged`` with the file/key that caused them."""
        self.skipped[reason] += 1
        if self._logged < self.max_logged:
            self._logged += 1
            log.warning("skipped (%s) %s%s", reason, where, f": {detail}" if detail else "")

    def merge(self, other: "StageCounts | dict") -> None:
        if isinstance(other, dict):
            other = StageCounts.from_dict(other)
        self.read += other.read
        self.written += other.written
        self.skipped.update(other.skipped)

    def to_dict(self) -> dict:
        return {"read": self.read, "written": self.written, "skipped": dict(sorted(self.skipped.items()))}

    @classmethod
    def from_dict(cls, d: dict) -> "StageCounts":
        return cls(read=int(d.get("read", 0)), written=int(d.get("written", 0)),
                   skipped=Counter(d.get("skipped") or {}))
