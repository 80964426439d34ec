"""Immediate playout: show each frame as it arrives, newest first when behind (``--playout immediate``).

The clock playout (``receiver.playout``) shows one frame per tick from a jitter buffer; this
policy has no clock: the call's render loop asks :meth:`ImmediatePlayout.next` for the next step
whenever frames arrived. Frames stay in arrival order; the policy drops what is not worth
showing (frames of a replaced image, frames older than one already shown, and all but the newest
few when rendering fell behind), and a frame the sender skipped that predicts exactly the picture
already shown is shown again without rendering.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

MAX_QUEUED_FRAMES = 64  # it renders only the newest few of what is queued anyway
MAX_BEHIND = 3  # more queued than this: rendering is behind real time, skip to the newest

Step = Literal["render", "same", "old", "behind", "reordered"]


@dataclass(frozen=True)
class QueuedFrame:
    seq: int
    capture_us: int
    vector: np.ndarray
    skipped: bool  # the sender skipped it: the vector is the codec's prediction


class ImmediatePlayout:
    """The queue of frames waiting to be shown, and the rule for what to show next."""

    def __init__(self, max_queued: int = MAX_QUEUED_FRAMES, max_behind: int = MAX_BEHIND) -> None:
        self.max_queued = max_queued
        self.max_behind = max_behind
        self._queue: collections.deque[QueuedFrame] = collections.deque()
        self.last_seq = -1  # the newest frame shown

    def push(self, frame: QueuedFrame) -> bool:
        """Queue a frame; False when the oldest queued one had to go to make room (e.g. no source image yet)."""
        room = len(self._queue) < self.max_queued
        if not room:
            self._queue.popleft()
        self._queue.append(frame)
        return room

    def pending(self) -> int:
        return len(self._queue)

    def queued(self) -> list[QueuedFrame]:
        return list(self._queue)

    def reset(self) -> None:
        """The sender restarted its stream: its sequence numbers start over."""
        self._queue.clear()
        self.last_seq = -1

    def next(self, route: Callable[[int], str], shows: Callable[[np.ndarray], bool]) -> tuple[Step, QueuedFrame] | None:
        """The next step, or None when nothing can be shown now (queue empty, or its head's image not ready).

        ``route(seq)`` is the call's source router: "ok" (switching images if the frame starts a new
        one), "wait" (its image is not complete) or "old" (its image was replaced). ``shows(vector)``:
        whether the picture shown last is exactly this vector's rendering. Steps: "render" the frame;
        "same": show the last picture again for it; "old" / "behind" / "reordered": dropped.
        """
        if not self._queue:
            return None
        f = self._queue[0]
        route_to = route(f.seq)
        if route_to == "old":
            self._queue.popleft()
            return "old", f
        if route_to == "wait":  # its image is not complete: wait (the queue is bounded) for it
            return None
        if f.skipped and f.seq > self.last_seq and shows(f.vector):
            # a skipped frame predicted as the picture already shown ("last"): the same image,
            # shown again without rendering, so skipping frames never costs shown frames
            self._queue.popleft()
            self.last_seq = f.seq
            return "same", f
        if len(self._queue) > self.max_behind:  # behind real time: skip to the newest frames
            self._queue.popleft()
            return "behind", f
        self._queue.popleft()
        if f.seq <= self.last_seq:  # reordered: an older frame is not worth showing
            return "reordered", f
        self.last_seq = f.seq
        return "render", f
