"""CPU-overuse adaptation of a call's render tier (64 / 128 / 256), during the call.

The start-up measurement (``receiver.render.choose_model``) guesses once; a call then meets
what that guess could not see: a sender starting on the same cores, another call, a laptop
throttling. Like libwebrtc's ``OveruseFrameDetector`` for its encoder, :class:`TierAdapter`
watches how much of each frame's time budget rendering takes and

- steps **down** when the 90th percentile of recent render times stays above ``high_load`` of
  the budget (1 / call fps) for ``down_after_s`` (at once when it is over ``severe_load``), to
  the largest lower tier predicted to fit;
- steps **up** when the tier above is *predicted* to fit: the current p90 times that tier's
  measured cost ratio stays under ``low_load`` for ``up_after_s``, a much longer wait
  (hysteresis), doubled after every up-step that had to be undone (libwebrtc's ramp-up
  back-off), so a machine at the edge does not flap;
- never changes twice within ``cooldown_s`` (the source is re-encoded at the new size and
  the timing settles), and does not step down in a call's first ``startup_s``: both ends are
  still starting (the sender's workers, the first source encoding); the demo stepped 256 -> 128
  at 2 s for renders that fitted again a second later, and the switch itself cost frames.

Every tier renders the same keypoints (all shipped sizes share one detector), so a change
is invisible on the wire; the session re-prepares the source image off the event loop and
switches between two frames, so a change never stalls the picture. Pure logic, no clock of
its own: the caller passes ``now``, which makes it testable alone.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

SEVERE_MIN_FRAMES = 3  # renders that can decide a step down under severe overuse (``AdaptConfig.severe_load``)


@dataclass(frozen=True)
class AdaptConfig:
    """Thresholds of the tier adaptation.

    fps: the call's frame rate; the render budget is 1000 / fps ms per frame, less ``reserved_ms``.
    high_load: share of the budget the p90 render time may take before stepping down (rendering
        is not all a frame costs: decoding, playout and the sink need the rest).
    low_load: the tier above must be predicted under this share of the budget to step up (the
        prediction already scales by that tier's measured cost; the gap to ``high_load`` is the
        hysteresis, and the back-off handles a prediction that was wrong).
    window_frames: the last renders a decision looks at (a count, not a time: an overloaded
        renderer makes few renders, and those must still decide).
    min_frames: fewer renders than this since the start or the last change decide nothing.
    down_after_s: overuse must last this long before a step down.
    up_after_s: headroom must last this long before a step up (doubled per undone step up,
        up to ``max_up_after_s``).
    cooldown_s: no change within this long after a change.
    startup_s: no step down within this long after the call's first render, unless the p90 is
        over ``startup_load`` of the budget (a tier that cannot cope at all need not wait).
    severe_load: a median render over this share of the budget is severe overuse: the step down comes
        as soon as ``SEVERE_MIN_FRAMES`` renders say so (no ``min_frames`` or ``down_after_s`` wait), and
        after a down-step only ``severe_cooldown_s`` must pass. Each waiting render is a stall then: a
        two-way call with both ends on one 2-core machine rendered 100-150 ms frames for 2 s before its
        first step down.
    A step down goes to the largest lower tier predicted (load x cost ratio) to fit under ``high_load``,
    at least one tier: from 256 straight to 64 when 128 would not fit either.
    """

    fps: float = 30.0
    high_load: float = 0.85
    low_load: float = 0.7
    window_frames: int = 30
    min_frames: int = 10
    down_after_s: float = 1.0
    up_after_s: float = 8.0
    max_up_after_s: float = 64.0
    cooldown_s: float = 3.0
    startup_s: float = 4.0
    startup_load: float = 2.0
    severe_load: float = 2.0
    severe_cooldown_s: float = 1.0
    # CPU time each frame of this call also costs on the same cores outside the renderer: a two-way call's
    # own keypoint extraction (kpcast), ~18 ms a frame here. The render budget is what is left of the frame.
    reserved_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.fps <= 0 or not 0 < self.low_load < self.high_load:
            raise ValueError("need fps > 0 and 0 < low_load < high_load")
        if not 1 <= self.min_frames <= self.window_frames:
            raise ValueError("need 1 <= min_frames <= window_frames")
        if not self.reserved_ms >= 0:
            raise ValueError("reserved_ms must be >= 0")

    @property
    def budget_ms(self) -> float:
        """The frame period less the reserved work, at least a quarter of the period (a reservation larger
        than that says the call cannot hold its rate at any tier; the smallest tier is then the answer)."""
        period = 1000.0 / self.fps
        return max(period - self.reserved_ms, period / 4)


@dataclass(frozen=True)
class TierChange:
    """One decision: render at ``to_size`` from now on."""

    t: float
    from_size: int
    to_size: int
    reason: str  # "overuse" | "headroom"
    load: float  # p90 render time / budget when decided


class TierAdapter:
    """Decides the render size of one call from its render times.

    ``cost``: relative time of one render per size (e.g. 1 / the start-up fps of each tier);
    only its ratios matter. ``size``: the tier the call starts at.
    """

    def __init__(self, cost: dict[int, float], size: int, config: AdaptConfig | None = None) -> None:
        if size not in cost or any(c <= 0 for c in cost.values()):
            raise ValueError(f"start size {size} needs a positive cost among {sorted(cost)}")
        self.config = config or AdaptConfig()
        self.sizes = sorted(cost)
        self.cost = dict(cost)
        self.size = size
        self.changes: list[TierChange] = []
        self._times: collections.deque[float] = collections.deque(maxlen=self.config.window_frames)
        self._over_since: float | None = None
        self._room_since: float | None = None
        self._last_change = -float("inf")
        self._up_after = self.config.up_after_s
        self._last_up: float | None = None
        self._first: float | None = None

    def load(self) -> float | None:
        """p90 render time over the window / budget (None with too few renders)."""
        if len(self._times) < self.config.min_frames:
            return None
        return float(np.percentile(self._times, 90)) / self.config.budget_ms

    def process(self, now: float, render_ms: float) -> TierChange | None:
        """Account one render (wall time, ms) at ``now`` (s); returns a change to make, or None."""
        c = self.config
        self._times.append(float(render_ms))
        if self._first is None:
            self._first = now
        # severe overuse decides on few renders (each of them a stall), by their median: one slow first
        # render (a cold cache) is not enough
        severe = (len(self._times) >= SEVERE_MIN_FRAMES
                  and float(np.median(self._times)) >= c.severe_load * c.budget_ms)
        load = self.load()
        if severe and load is None:
            load = float(np.percentile(self._times, 90)) / c.budget_ms
        last_down = bool(self.changes) and self.changes[-1].reason == "overuse"
        cooldown = c.severe_cooldown_s if severe and last_down else c.cooldown_s
        if load is None or now - self._last_change < cooldown:
            self._over_since = self._room_since = None
            return None
        i = self.sizes.index(self.size)
        starting = now - self._first < c.startup_s and load < c.startup_load
        over = load > c.high_load and i > 0 and not starting
        up_load = load * self.cost[self.sizes[i + 1]] / self.cost[self.size] if i + 1 < len(self.sizes) else None
        room = up_load is not None and up_load < c.low_load
        self._over_since = (self._over_since or now) if over else None
        self._room_since = (self._room_since or now) if room else None
        if over and (severe or now - self._over_since >= c.down_after_s):
            if self._last_up is not None and now - self._last_up < 2 * self._up_after:
                self._up_after = min(2 * self._up_after, c.max_up_after_s)  # that step up did not hold
            return self._change(now, self._down_to(i, load), "overuse", load)
        if room and now - self._room_since >= self._up_after:
            self._last_up = now
            return self._change(now, self.sizes[i + 1], "headroom", load)
        return None

    def _down_to(self, i: int, load: float) -> int:
        """The tier to step down to from ``sizes[i]`` at ``load``: the largest lower one predicted to fit."""
        for j in range(i - 1, 0, -1):
            if load * self.cost[self.sizes[j]] / self.cost[self.sizes[i]] <= self.config.high_load:
                return self.sizes[j]
        return self.sizes[0]

    def _change(self, now: float, size: int, reason: str, load: float) -> TierChange:
        change = TierChange(now, self.size, size, reason, load)
        log.info("render tier %d -> %d (%s, p90 render %.0f%% of the frame budget)", self.size, size, reason,
                 100 * load)
        self.size = size
        self.changes.append(change)
        self._last_change = now
        self._times.clear()  # the old tier's times say nothing about the new one
        self._over_since = self._room_since = None
        return change
