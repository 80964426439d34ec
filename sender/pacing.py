"""The frame rate a sender can hold: measured before the call, lowered on purpose, announced.

A sender whose per-frame work takes longer than the frame period drifts instead of failing: a
file plays slower than real time, a camera's driver queue fills with stale frames, and the
receiver's playout sees every frame later than the one before. So before the call the sender
times its keypoint extraction on its own machine (the median of a few runs, so one burst of
other work does not decide) and, when one frame's extraction does not fit into ``share`` of the
frame period (the rest is reading, framing, coding and aiortc), it keeps only every ``k``-th
frame, the smallest ``k`` that fits: fps / k is then the call's frame rate, announced in the
Hello like any other (the receiver's playout clock and render budget follow it) and in the
sender's stats and log. A file still plays in real time (the frames between are read and
dropped); a camera is read at its own rate and thinned the same way. An input faster than a Hello
may announce (``shared.protocol.MAX_FPS``, 60: a 120 fps file) is thinned the same way
(:func:`announceable_stride`).

During the call the capture loop counts frames it produced more than a frame period late
(``frames_late`` in the stats, a warning at most every 5 s): the rate cannot change once
announced, but nobody is left guessing why a call runs behind.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shared import protocol as P

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PacingConfig:
    """share: of the frame period, what one frame's extraction may take (the rest of the sender
    needs the remainder); rounds: extraction runs timed before the call (median);
    max_stride: the rate is lowered to at most 1 / max_stride of the asked one."""

    share: float = 0.8
    rounds: int = 5
    max_stride: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1 or self.rounds < 1 or self.max_stride < 1:
            raise ValueError("need 0 < share <= 1, rounds >= 1, max_stride >= 1")


def measure_work_ms(work: Callable[[np.ndarray], object], image: np.ndarray, rounds: int = 5) -> float:
    """Median wall time of ``work(image)`` over ``rounds`` runs, after one untimed warm-up."""
    work(image)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        work(image)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def choose_stride(fps: float, work_ms: float, config: PacingConfig | None = None) -> int:
    """The smallest k such that one frame's ``work_ms`` fits ``share`` of k frame periods at ``fps``
    (at most ``max_stride``)."""
    c = config or PacingConfig()
    if fps <= 0 or work_ms < 0:
        raise ValueError("need fps > 0 and work_ms >= 0")
    period_ms = 1000.0 / fps
    for k in range(1, c.max_stride + 1):
        if work_ms <= c.share * k * period_ms:
            return k
    return c.max_stride


def announceable_stride(fps: float, stride: int = 1) -> int:
    """``stride``, raised until ``fps / stride`` is a rate a Hello may announce (at most
    ``shared.protocol.MAX_FPS``: a 120 fps file is sent at 60) and lowered so that it stays at least
    ``MIN_FPS`` (a receiver refuses a Hello outside them)."""
    k = max(stride, math.ceil(fps / P.MAX_FPS))
    return max(1, min(k, math.floor(fps / P.MIN_FPS)))


class LateFrames:
    """Counts frames the capture loop produced more than a period late; warns at most every ``every_s``."""

    def __init__(self, fps: float, every_s: float = 5.0) -> None:
        self.period_s = 1.0 / fps
        self.every_s = every_s
        self.count = 0
        self._warned_at = -float("inf")

    def observe(self, lateness_s: float, now: float, extract_ms: float | None = None) -> None:
        if lateness_s <= self.period_s:
            return
        self.count += 1
        if now - self._warned_at >= self.every_s:
            self._warned_at = now
            log.warning("the sender cannot hold %.1f fps here: a frame came %.0f ms late (%d so far%s)",
                        1.0 / self.period_s, lateness_s * 1000.0, self.count,
                        "" if extract_ms is None else f", extraction {extract_ms:.0f} ms")
