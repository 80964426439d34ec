"""Which keypoint frames a call accepts by sequence number: no duplicates, nothing too old.

The keypoint channel is unordered and a peer may replay; the receiver checks every frame's
``seq`` here before it reaches the jitter buffer.
"""

from __future__ import annotations

from shared.errors import ProtocolError


class SequenceFilter:
    """Rejects duplicate keypoint frames and frames older than ``window`` behind the newest."""

    def __init__(self, window: int = 256) -> None:
        self.window = window
        self.reset()

    def reset(self) -> None:
        """Forget every sequence number (the sender restarted its stream with a new Hello)."""
        self.newest: int | None = None
        self._seen: set[int] = set()

    def check(self, seq: int) -> None:
        if self.newest is not None and seq <= self.newest - self.window:
            raise ProtocolError("stale", f"seq {seq} is {self.newest - seq} behind")
        if seq in self._seen:
            raise ProtocolError("duplicate", f"seq {seq} seen before")
        self._seen.add(seq)
        if self.newest is None or seq > self.newest:
            self.newest = seq
            floor = seq - self.window
            if len(self._seen) > 2 * self.window:
                self._seen = {s for s in self._seen if s > floor}
