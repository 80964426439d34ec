"""What happens to a message a peer sent that this end refuses: the error and its counter.

Both ends validate what they receive (the receiver everything a sender sends, the sender the
receiver's control messages); each refusal raises :class:`ProtocolError` with a short reason
from a small fixed set, and a :class:`RejectCounter` counts them by reason for the call's stats.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class ProtocolError(ValueError):
    """A message was rejected; ``reason`` is one of a small fixed set, for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class RejectCounter:
    """Counts rejected messages by reason and logs them without flooding the log."""

    counts: Counter = field(default_factory=Counter)
    log_interval_s: float = 2.0
    _last_log: float = 0.0

    def reject(self, err: ProtocolError) -> None:
        self.counts[err.reason] += 1
        now = time.monotonic()
        if now - self._last_log >= self.log_interval_s:
            self._last_log = now
            log.warning("rejected message (%s); totals so far %s", err, dict(self.counts))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
