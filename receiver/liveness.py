"""Whether a peer still holds its call slot: a caller says Hello soon and then never goes quiet.

aiortc reports a dead transport only after ~30 s, so each call watches its peer itself. A peer
holds its slot only while it behaves like a caller: a valid Hello within ``hello_timeout_s`` of its
first message (``setup_timeout_s`` when it sends nothing at all), then a valid message at least
every ``heartbeat_timeout_s``. Rejected messages never count as a sign of life, so junk cannot keep
a call open. Time the receiver's own event loop was stalled is not the peer's silence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Liveness:
    """The liveness clock of one call (monotonic seconds)."""

    heartbeat_timeout_s: float
    setup_timeout_s: float
    hello_timeout_s: float
    created: float = field(default_factory=time.monotonic)
    first_message: float | None = None  # when the peer first sent anything
    last_seen: float = -1.0  # last *valid* message (the call's creation until one arrives)
    lag_since_seen: float = 0.0  # how late the event loop ran since then (the receiver's own stall)

    def __post_init__(self) -> None:
        if self.last_seen < 0:
            self.last_seen = self.created

    def message(self, now: float) -> None:
        """Any message arrived (valid or not)."""
        if self.first_message is None:
            self.first_message = now

    def valid(self, now: float) -> None:
        """A message decoded and passed the call's checks."""
        self.last_seen = now
        self.lag_since_seen = 0.0

    def stalled(self, seconds: float) -> None:
        """The receiver's own event loop ran this late."""
        self.lag_since_seen += seconds

    def expired(self, now: float, said_hello: bool, source_ready: bool) -> str | None:
        """Why the peer no longer holds its slot, or None while it does."""
        if not said_hello:
            if self.first_message is not None and now - self.first_message > self.hello_timeout_s:
                return "no hello"
            return "peer timeout" if now - self.created > self.setup_timeout_s else None
        if not source_ready:
            # Until the source image is in, the reliable channel may be retransmitting it (SCTP's
            # timers are seconds on a lossy link) and holds everything behind it: a peer that said
            # Hello is given the setup timeout to finish, not the heartbeat timeout.
            return "peer timeout" if now - self.last_seen > self.setup_timeout_s else None
        silent = now - self.last_seen - self.lag_since_seen
        return "peer timeout" if silent > self.heartbeat_timeout_s else None
