"""Keypoint jitter buffer: ordering, duplicate/late rejection, clock mapping, adaptive delay.

The buffer holds received frames keyed by sequence number until the playout clock
releases them (:meth:`JitterBuffer.release_through`). It also owns the timing model:

- **Clock mapping.** ``transit = arrival - capture`` mixes the unknown sender/receiver
  clock offset with the network delay. Its *minimum* over a sliding window is the
  offset plus the base delay; everything above it is jitter. The window is kept as
  per-bucket minima (``offset_bucket_s`` of sender time each, ``offset_buckets`` of them)
  so memory is O(1). A least-squares slope through the bucket minima estimates clock
  drift (sender crystal running fast or slow, clamped to +-``max_drift``), and the offset
  is extrapolated with it, so a 0.1 % drift neither grows nor drains the buffer and
  does not bias the window minimum by ``drift * window``.
- **Adaptive target delay** (how long after the "fastest possible" arrival a frame is
  played): a ``quantile`` (0.95) of the relative delays (transit - offset) of the last
  ``window`` frames, plus a margin. Like NetEq, fast attack, slow decay: the target
  jumps up at once when the quantile rises, and comes down at most
  ``shrink_ms_per_s`` when the network calms down, which the playout turns into an
  inaudible (invisible) ~1.5 % speed-up. Late frames still feed the delay statistics,
  so lateness raises the target. The window is also bounded in time (``window_s``), so a
  decimated stream (fewer frames per second) forgets as fast as a full one.
- **Start-up drain.** The first keypoints of a call can queue behind the source image on
  the shared SCTP association (a lost chunk stalls it for a retransmission timeout) and
  arrive in one burst. That is not network jitter, but it used to lift the target by
  hundreds of ms and, at 15 ms/s, keep it there for the rest of a short call. For the
  first ``startup_s`` the excess over the quantile therefore halves every
  ``startup_half_life_s`` (the playout skips frames to catch up) instead. The session also
  keeps frames that arrive before the source image is ready (plus 100 ms) out of the delay
  statistics (:meth:`JitterBuffer.ignore_delays_until`): they are the burst.
- **Jitter** for stats is the RFC 3550 interarrival jitter (``J += (|D| - J) / 16``).

Memory is bounded: at most ``capacity`` frames (oldest evicted and counted), a fixed
window of delays and a fixed window of seen sequence numbers for duplicate detection.
Nothing here reads a clock: every call takes the time, so tests drive it directly.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from receiver.frames import KeypointFrame

log = logging.getLogger(__name__)

OK, DUPLICATE, LATE = "ok", "duplicate", "late"


@dataclass
class JitterConfig:
    capacity: int = 256  # frames held at most (8.5 s at 30 fps)
    initial_delay_ms: float = 60.0
    min_delay_ms: float = 0.0
    max_delay_ms: float = 1000.0
    quantile: float = 0.95
    window: int = 90  # relative delays the quantile is taken over (3 s at 30 fps) ...
    window_s: float = 3.0  # ... and no older than this (sender capture time)
    min_samples: int = 10  # below this, never go under initial_delay_ms
    margin_ms: float = 10.0  # covers the playout clock's +-quarter-frame steering slack
    extra_delay_ms: float = 0.0  # added on top (the playout adds (kp_every - 1) frames here)
    shrink_ms_per_s: float = 15.0
    startup_s: float = 6.0  # after the first frame: a start-up burst drains fast (see module doc)
    startup_half_life_s: float = 0.5
    offset_bucket_s: float = 1.0
    offset_buckets: int = 10
    max_drift: float = 0.005  # |sender clock rate - 1| larger than this is not believed
    seen_window: int = 1024  # seqs remembered for duplicate detection


class JitterBuffer:
    """Ordered store of received frames plus the sender-clock -> local-clock model."""

    def __init__(self, config: JitterConfig | None = None) -> None:
        self.cfg = config or JitterConfig()
        self.reset()

    def reset(self) -> None:
        self._frames: dict[int, KeypointFrame] = {}
        self._seqs: list[int] = []  # sorted keys of _frames
        self.floor: int | None = None  # highest seq released to playout; <= this is late
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque()
        self._transits: deque[tuple[float, float]] = deque(maxlen=self.cfg.window)  # (capture_s, transit_s)
        self._buckets: deque[list[float]] = deque()  # [bucket index, capture_s of min, min transit]
        self._offset_ref_t = 0.0
        self._offset_ref = 0.0
        self.drift = 0.0
        self._target_s = self.cfg.initial_delay_ms / 1000.0
        self._last_update_s: float | None = None
        self._first_arrival_s: float | None = None
        self._delays_from_s = float("-inf")
        self._prev_transit: float | None = None
        self.jitter_s = 0.0
        self.newest: KeypointFrame | None = None
        self.counts = {"received": 0, "duplicates": 0, "late": 0, "evicted": 0, "predicted": 0, "predicted_late": 0}

    # ------------------------------------------------------------------ frames
    def __len__(self) -> int:
        return len(self._seqs)

    def push(self, seq: int, capture_us: int, vector: np.ndarray, arrival_s: float, predicted: bool = False) -> str:
        """Add a frame; returns ``"ok"``, ``"duplicate"`` or ``"late"`` (seq already released).

        ``predicted``: a frame the sender skipped, decoded by prediction when the next coded frame
        came. It was never sent, so its "arrival" says nothing about the network: it stays out of
        the timing model (else every skip would look like a frame-period of jitter and raise the
        target delay by ``max_gap`` frames) and, as it was normally shown by prediction before it
        was decoded, it is not counted late either.
        """
        if seq in self._seen:
            self.counts["duplicates"] += 1
            return DUPLICATE
        self._remember(seq)
        if not predicted:
            self._observe(capture_us * 1e-6, arrival_s)
        frame = KeypointFrame(seq, int(capture_us), np.asarray(vector, dtype=np.float32).reshape(-1), arrival_s,
                              predicted)
        if self.floor is not None and seq <= self.floor:
            if predicted:
                self.counts["predicted_late"] += 1
                return LATE
            self.counts["late"] += 1
            # A late frame is too late to show, but it still tells where the sender is: without
            # this the playout clock, anchored on the newest frame, can run ahead of a sender
            # slower than its announced fps and conceal forever.
            if self.newest is None or seq > self.newest.seq:
                self.newest = frame
            return LATE
        self.counts["predicted" if predicted else "received"] += 1
        self._frames[seq] = frame
        bisect.insort(self._seqs, seq)
        if not predicted and (self.newest is None or seq > self.newest.seq):
            self.newest = frame  # the clock anchors on sent frames: a skipped one's time is an estimate
        while len(self._seqs) > self.cfg.capacity:
            old = self._seqs.pop(0)
            del self._frames[old]
            self.counts["evicted"] += 1
        return OK

    def _remember(self, seq: int) -> None:
        self._seen.add(seq)
        self._seen_order.append(seq)
        while len(self._seen_order) > self.cfg.seen_window:
            self._seen.discard(self._seen_order.popleft())

    def get(self, seq: int) -> KeypointFrame | None:
        return self._frames.get(seq)

    def first(self) -> KeypointFrame | None:
        return self._frames[self._seqs[0]] if self._seqs else None

    def next_after(self, seq: int, max_ahead: int | None = None) -> KeypointFrame | None:
        """The buffered frame with the smallest seq > ``seq`` (within ``max_ahead``), if any."""
        i = bisect.bisect_right(self._seqs, seq)
        if i == len(self._seqs):
            return None
        nxt = self._seqs[i]
        if max_ahead is not None and nxt - seq > max_ahead:
            return None
        return self._frames[nxt]

    def frames_between(self, lo: int, hi: int) -> list[KeypointFrame]:
        """Buffered frames with lo < seq <= hi, in order."""
        i = bisect.bisect_right(self._seqs, lo)
        j = bisect.bisect_right(self._seqs, hi)
        return [self._frames[s] for s in self._seqs[i:j]]

    def release_through(self, seq: int) -> int:
        """Drop frames with seq <= ``seq`` (played or skipped); later arrivals of them are late.

        Returns how many buffered frames were dropped unplayed (seq < ``seq``).
        """
        i = bisect.bisect_right(self._seqs, seq)
        dropped = 0
        for s in self._seqs[:i]:
            if s < seq:
                dropped += 1
            del self._frames[s]
        del self._seqs[:i]
        self.floor = seq if self.floor is None else max(self.floor, seq)
        return dropped

    # ------------------------------------------------------------------ timing model
    def ignore_delays_until(self, arrival_s: float) -> None:
        """Frames arriving before ``arrival_s`` still play and set the clock offset, but do not
        move the target delay (the session calls this around the source image's arrival)."""
        self._delays_from_s = arrival_s

    def _observe(self, capture_s: float, arrival_s: float) -> None:
        transit = arrival_s - capture_s
        if self._prev_transit is not None:  # RFC 3550 interarrival jitter
            self.jitter_s += (abs(transit - self._prev_transit) - self.jitter_s) / 16.0
        self._prev_transit = transit
        self._update_offset(capture_s, transit)
        if arrival_s < self._delays_from_s:
            return
        self._transits.append((capture_s, transit))
        while self._transits[0][0] < capture_s - self.cfg.window_s:
            self._transits.popleft()
        self._update_target(arrival_s)

    def _update_offset(self, capture_s: float, transit: float) -> None:
        idx = int(np.floor(capture_s / self.cfg.offset_bucket_s))
        for b in self._buckets:
            if b[0] == idx:
                if transit < b[2]:
                    b[1], b[2] = capture_s, transit
                break
        else:
            if self._buckets and idx < self._buckets[0][0]:
                pass  # older than the whole window: ignore for the offset
            else:
                self._buckets.append([idx, capture_s, transit])
                self._buckets = deque(sorted(self._buckets, key=lambda b: b[0]))
        while self._buckets and self._buckets[0][0] <= self._buckets[-1][0] - self.cfg.offset_buckets:
            self._buckets.popleft()
        t = np.array([b[1] for b in self._buckets])
        m = np.array([b[2] for b in self._buckets])
        slope = 0.0
        if len(t) >= 4 and t.max() - t.min() >= 3 * self.cfg.offset_bucket_s:
            tc = t - t.mean()
            slope = float(np.dot(tc, m - m.mean()) / np.dot(tc, tc))
            slope = float(np.clip(slope, -self.cfg.max_drift, self.cfg.max_drift))
        self.drift = -slope  # transit falling over time = sender clock running fast
        ref_t = float(t.max())
        self._offset_ref_t = ref_t
        self._offset_ref = float(np.min(m + slope * (ref_t - t)))

    def offset_at(self, capture_s: float) -> float:
        """Estimated min transit (clock offset + base delay) for a frame captured at ``capture_s``."""
        return self._offset_ref - self.drift * (capture_s - self._offset_ref_t)

    def _relative_delays(self) -> np.ndarray:
        if not self._transits:
            return np.zeros(0)
        a = np.array(self._transits)
        return np.maximum(a[:, 1] - (self._offset_ref - self.drift * (a[:, 0] - self._offset_ref_t)), 0.0)

    def _update_target(self, now_s: float) -> None:
        cfg = self.cfg
        rel = self._relative_delays()
        raw = float(np.quantile(rel, cfg.quantile)) + (cfg.margin_ms + cfg.extra_delay_ms) / 1000.0
        if len(rel) < cfg.min_samples:
            raw = max(raw, cfg.initial_delay_ms / 1000.0)
        dt = 0.0 if self._last_update_s is None else max(0.0, now_s - self._last_update_s)
        self._last_update_s = now_s if self._last_update_s is None else max(self._last_update_s, now_s)
        if self._first_arrival_s is None:
            self._first_arrival_s = now_s
        if raw >= self._target_s:
            self._target_s = raw  # fast attack
        else:
            drain = cfg.shrink_ms_per_s / 1000.0 * dt
            if now_s - self._first_arrival_s < cfg.startup_s:
                drain = max(drain, (self._target_s - raw) * (1.0 - 0.5 ** (dt / cfg.startup_half_life_s)))
            self._target_s = max(raw, self._target_s - drain)
        self._target_s = float(np.clip(self._target_s, cfg.min_delay_ms / 1000.0, cfg.max_delay_ms / 1000.0))

    @property
    def target_delay_s(self) -> float:
        return self._target_s

    def playout_time(self, capture_us: float) -> float:
        """Local time at which a frame captured at ``capture_us`` (sender clock) is due."""
        c = capture_us * 1e-6
        return c + self.offset_at(c) + self._target_s

    def capture_due(self, now_s: float) -> float:
        """Sender capture time (s) of the frame due at local time ``now_s`` (inverse of playout_time)."""
        # c + off_ref - drift * (c - t_ref) + target = now  ->  solve for c
        return (now_s - self._target_s - self._offset_ref - self.drift * self._offset_ref_t) / (1.0 - self.drift)

    @property
    def has_timing(self) -> bool:
        return bool(self._buckets)

    def stats(self) -> dict:
        return {
            **self.counts,
            "buffered": len(self._seqs),
            "target_delay_ms": self._target_s * 1000.0,
            "jitter_ms": self.jitter_s * 1000.0,
            "offset_ms": self._offset_ref * 1000.0,
            "drift_ppm": self.drift * 1e6,
        }
