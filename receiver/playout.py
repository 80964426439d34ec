"""Playout clock: turns a jittery, lossy stream of keypoint frames into one frame per tick.

The receiver's render clock calls :meth:`Playout.tick` every ``1/fps`` s and gets the
frame due at ``now - target delay`` (see :mod:`receiver.jitter_buffer` for the timing
model). Frames are received with :meth:`Playout.push`.

Per tick:

1. **Steering.** The playout keeps an integer cursor (last rendered seq) and advances it
   by one frame per tick, compared with the ideal (fractional) position ``p`` implied by
   the clock mapping. If the next frame would be more than ``early_slack`` frames early
   it holds (repeats) the current frame; more than ``late_slack`` frames late, it skips
   one. At most every other tick is a hold/skip, so playout runs at 0.5x..1.5x speed while
   it catches up (NetEq's preemptive-expand / accelerate, for keypoints); the 1.5-frame
   dead band keeps render-clock jitter from causing flip-flopping. Beyond
   ``resync_frames`` it jumps (counted as dropped frames / resyncs).
2. **Render** seq ``s``: the received frame if buffered (``real``); else linear
   interpolation between the last rendered frame and the next buffered one when that is
   at most ``max_interp_gap`` ahead (``interpolated``: decimation ``kp_every = k``, where the
   target delay is raised by ``k - 1`` frames so the right neighbour is normally there, and
   short losses); else, in a predictive call (``predictor``), the codec's own prediction
   while the frame can still be one the sender skipped (``predicted``: bit-exact what the
   sender assumed, so a skipped frame costs neither bits nor delay; with a forecaster other
   than repeat-last, only for frames older than the newest received: a newer one may be late
   or lost rather than skipped); else a forecast
   conditioned on the rendered history, real and
   previously concealed frames (``concealed``). Long concealments are damped towards a
   freeze after ``damp_after_frames`` so extrapolation cannot run off. A forecast never
   looks more than ``max_forecast_steps`` ahead (beyond that it holds its last step): the
   horizon comes from sequence numbers a peer chooses, so it must not set the work per tick.
3. **Convergence.** The first real frame after a concealment gets a correction
   ``forecast(s) - real`` that fades out over ``blend_frames`` frames, so the picture
   glides back to the truth instead of jumping.
4. **Render-ahead** (``lookahead_ms``, optionally plus the current target delay): the
   output is the frame ``L`` seqs ahead of the playout point, from the buffer if it is
   already there, else forecast from the rendered history plus every newer buffered frame.

Keypoint error of what was rendered against the truth (:meth:`Playout.set_truth`, or
automatically a late real frame for a seq that was concealed) is collected per kind.

The forecaster is anything with ``forecast(history (N,60) float32, steps, samples=1) ->
(samples, steps, 60)`` (``models.forecast``), or a name for ``models.forecast.load_forecaster``,
or None (repeat the last frame). No clocks are read here: tests pass times explicitly.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from receiver.frames import KINDS, FrameKind, PlayoutFrame
from receiver.jitter_buffer import DUPLICATE, OK, JitterBuffer, JitterConfig
from shared.kpvector import KP_DIM, NC

log = logging.getLogger(__name__)



class Forecaster(Protocol):
    def forecast(self, history: np.ndarray, steps: int, samples: int = 1) -> np.ndarray: ...


class RepeatLast:
    """Fallback forecaster: the last frame, forever."""

    def forecast(self, history: np.ndarray, steps: int, samples: int = 1) -> np.ndarray:
        return np.broadcast_to(history[-1], (samples, steps, history.shape[-1])).astype(np.float32)


@dataclass
class PlayoutConfig:
    fps: float = 30.0  # render clock rate and sender capture rate (Hello.fps)
    forecaster: Forecaster | str | None = None  # object, models.forecast name, or None = repeat last
    kp_every: int = 1  # sender decimation (Hello.kp_every)
    jitter: JitterConfig = field(default_factory=JitterConfig)
    history: int = 32  # rendered frames kept to condition the forecaster
    interpolate_gaps: bool = True
    max_interp_gap: int = 8  # frames; the right neighbour must be at most this far ahead
    blend_frames: int = 5
    damp_after_frames: int = 15  # concealed frames before motion is damped towards a freeze
    damp: float = 0.85  # per-frame damping factor after that
    early_slack: float = 0.25  # frames a tick may render ahead of the ideal position
    late_slack: float = 1.25  # frames it may lag before skipping one
    resync_frames: float = 15.0  # jump instead of steering when further off than this
    lookahead_ms: float = 0.0  # render-ahead (latency hiding)
    lookahead_cover_buffer: bool = False  # also hide the jitter-buffer delay itself
    stall_s: float = 0.1  # a gap longer than this between new frames is a stall
    truth_window: int = 1024  # rendered/true vectors kept while waiting for their pair
    restart_after_late: int = 30  # this many consecutive far-behind late frames = sender restarted
    max_forecast_steps: int = 64  # frames; damping has frozen the motion long before this
    restart_jump_s: float = 10.0  # a frame this far ahead of the playout point restarts the stream
    # Predictive calls: seq -> the vector the sender assumed for it if it skipped it, or None
    # (receiver.kpstream.PredictiveStream.predict_at). Tried before interpolation and forecasting.
    predictor: Callable[[int], np.ndarray | None] | None = None


def kp_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Euclidean distance between the 10 keypoints of two vectors (normalised units)."""
    d = (np.asarray(a[:NC], np.float64) - np.asarray(b[:NC], np.float64)).reshape(-1, 2)
    return float(np.sqrt((d * d).sum(axis=1)).mean())


def _load(forecaster: Forecaster | str | None) -> Forecaster:
    if forecaster is None:
        return RepeatLast()
    if isinstance(forecaster, str):
        from models.forecast import load_forecaster  # models/ never imports receiver/

        return load_forecaster(forecaster)
    return forecaster


class Playout:
    """Jitter buffer + playout clock + concealment. Not thread-safe: call from one loop."""

    def __init__(self, config: PlayoutConfig | None = None) -> None:
        self.cfg = config or PlayoutConfig()
        if self.cfg.fps <= 0 or self.cfg.kp_every < 1:
            raise ValueError("fps must be > 0 and kp_every >= 1")
        self.forecaster = _load(self.cfg.forecaster)
        # A forecaster other than repeat-last also guesses the frames newer than any received: the
        # codec's skip prediction (repeat-last) is exact only for frames the sender did skip, and
        # a frame not in yet may instead be late (low-delay playout) or lost.
        self._guess_ahead = getattr(self.forecaster, "name", "last") != "last" and not isinstance(
            self.forecaster, RepeatLast)
        self.interval_s = 1.0 / self.cfg.fps
        jc = self.cfg.jitter
        # With decimation the right-hand neighbour of an in-between frame arrives k-1 frames
        # later than the frame itself; wait for it so it can be interpolated, not forecast.
        jc.extra_delay_ms = max(jc.extra_delay_ms, (self.cfg.kp_every - 1) * self.interval_s * 1000.0)
        self.buffer = JitterBuffer(jc)
        self._lookahead_ms = self.cfg.lookahead_ms
        self._forecast_failed = False
        self.reset()

    # ------------------------------------------------------------------ public API
    def reset(self) -> None:
        """Forget the stream (e.g. the sender restarted); counters are kept."""
        self.buffer.reset()
        self.cursor: int | None = None
        self._startup = True
        self._last_step = 1
        self._hist: deque[tuple[int, np.ndarray]] = deque(maxlen=max(2, self.cfg.history))
        self._clean: tuple[int, np.ndarray] | None = None  # last base frame without blend correction
        self._last_out: PlayoutFrame | None = None
        self._conceal_run = 0
        self._corr: np.ndarray | None = None
        self._blend_left = 0
        self._last_new_s: float | None = None
        self._late_run = 0
        if not hasattr(self, "_counts"):
            self._counts = {k: 0 for k in ("rendered", "new_frames", "repeated", "real", "concealed",
                                           "interpolated", "predicted", "lookahead_forecast", "dropped", "stalls",
                                           "resyncs", "restarts", "late", "duplicates", "forecast_errors")}
            self._max_gap_s = 0.0
            self._pending: OrderedDict[tuple[int, bool], tuple[str, np.ndarray]] = OrderedDict()
            self._truth: OrderedDict[int, np.ndarray] = OrderedDict()
            self._err = {k: [0.0, 0] for k in (*KINDS, "lookahead")}
        else:
            self._counts["restarts"] += 1
            self._pending.clear()
            self._truth.clear()

    def forget_before(self, seq: int) -> np.ndarray | None:
        """Frames before ``seq`` no longer count for concealment, interpolation or blending.

        For a new source image: keypoints of another framing must not be extrapolated or blended
        into this one's. The clock and the buffer are kept. Returns the vector of ``seq`` without
        blend correction when it was the last one played, else None.
        """
        self._hist = deque(((s, v) for s, v in self._hist if s >= seq), maxlen=self._hist.maxlen)
        clean = self._clean[1] if self._clean is not None and self._clean[0] == seq else None
        if self._clean is not None and self._clean[0] < seq:
            self._clean = None
        if clean is not None and self._hist and self._hist[-1][0] == seq:
            self._hist[-1] = (seq, clean)
        self._corr, self._blend_left, self._conceal_run = None, 0, 0
        return clean

    def pending(self) -> int:
        """Received frames buffered and not yet played (e.g. to drain before hanging up)."""
        return len(self.buffer)

    def set_lookahead_ms(self, ms: float) -> None:
        """Change render-ahead at run time (e.g. to RTT/2 from the peer connection's stats)."""
        self._lookahead_ms = max(0.0, float(ms))

    def push(self, seq: int, capture_us: int, vector: np.ndarray, arrival_s: float, predicted: bool = False) -> bool:
        """Offer a received frame; False when rejected as a duplicate or too late (counted).

        ``predicted``: a frame the sender skipped, decoded when the next coded frame arrived
        (see ``JitterBuffer.push``). It is normally shown by prediction before then; arriving
        after its time it only serves as the truth of what was shown, and is not "late".
        """
        vec = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vec.shape[0] != KP_DIM:
            raise ValueError(f"keypoint vector must have {KP_DIM} values, got {vec.shape[0]}")
        if predicted:
            status = self.buffer.push(int(seq), int(capture_us), vec, float(arrival_s), predicted=True)
            if status != OK and status != DUPLICATE:
                self.set_truth(int(seq), vec)
            return status != DUPLICATE
        if self.cursor is not None and seq - self.cursor > self.cfg.restart_jump_s * self.cfg.fps:
            # Far ahead (a long outage, or a peer's made-up number): steering would skip or conceal
            # every frame in between; start over from this frame instead, like a new stream.
            log.warning("seq %d is %d frames ahead of playout; restarting the stream", seq, seq - self.cursor)
            self.reset()
        status = self.buffer.push(int(seq), int(capture_us), vec, float(arrival_s))
        if status == OK:
            self._late_run = 0
            return True
        if status == DUPLICATE:
            self._counts["duplicates"] += 1
        else:
            self._counts["late"] += 1
            # A frame that arrives after its seq was concealed is the truth for that concealment.
            self.set_truth(int(seq), vec)
        if self.cursor is not None and seq < self.cursor - self.cfg.resync_frames * 4:
            # Many frames in a row far behind (late, or "duplicates" of long-gone seqs): the
            # sender restarted its sequence numbers. Start over rather than reject forever.
            self._late_run += 1
            if self._late_run >= self.cfg.restart_after_late:
                log.warning("stream restarted (seq %d far behind %d); resetting playout", seq, self.cursor)
                self.reset()
                self.buffer.push(int(seq), int(capture_us), vec, float(arrival_s))
        return False

    def set_truth(self, seq: int, vector: np.ndarray) -> None:
        """Supply the true vector of ``seq`` (before or after it was rendered) for error stats."""
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        found = False
        for key in ((seq, False), (seq, True)):
            item = self._pending.pop(key, None)
            if item is not None:
                self._add_error(item[0], item[1], v)
                found = True
        if not found and seq not in self._truth:
            self._truth[seq] = v
            while len(self._truth) > self.cfg.truth_window:
                self._truth.popitem(last=False)

    def tick(self, now_s: float) -> PlayoutFrame | None:
        """Produce the frame for render time ``now_s``; None only before any frame arrived."""
        buf = self.buffer
        if self.cursor is None:
            first = buf.first()
            if first is None:
                return None
            self.cursor = first.seq - 1
            step = 1
        else:
            step = self._steer(self._ideal(now_s))
        if step == 0 and self._last_out is not None:
            self._counts["rendered"] += 1
            self._counts["repeated"] += 1
            out = self._last_out
            return PlayoutFrame(out.seq, out.vector, out.kind, out.capture_us, out.due_s, now_s, True,
                                out.lookahead, out.blend, buf.target_delay_s * 1000.0)
        s = self.cursor + step
        vector, kind, capture_us, blend = self._render_base(s)
        self._counts["dropped"] += buf.release_through(s)  # received frames skipped by steering
        self.cursor = s
        self._last_step = step
        self._count_new(now_s, kind)
        self._expect(s, kind, vector)
        out_seq, la = s, self._lookahead_frames()
        if la > 0:
            out_seq = s + la
            vector, kind = self._render_ahead(s, out_seq)
            capture_us = self._capture_us_of(out_seq)
            self._expect(out_seq, "lookahead", vector)
        frame = PlayoutFrame(out_seq, vector, kind, int(capture_us), buf.playout_time(self._capture_us_of(s)),
                             now_s, False, la, blend, buf.target_delay_s * 1000.0)
        self._last_out = frame
        return frame

    def next_in(self) -> bool:
        """Whether the frame after the cursor is buffered (received, or decoded by prediction): it can be
        rendered before it falls due (the session's early render) without anyone waiting for it."""
        return self.cursor is not None and self.buffer.get(self.cursor + 1) is not None

    def next_due_s(self) -> float | None:
        """Local time at which the frame after the cursor falls due (None until the clock is known).

        The render clock ticks then (phase-locked to the sender's capture grid) instead of on a
        free-running period: a free-running tick shows each frame anywhere from a quarter frame
        early to ``late_slack`` frames late, on average half a frame (17 ms at 30 fps) of latency
        that buys nothing.
        """
        if self.cursor is None or self.buffer.newest is None or not self.buffer.has_timing:
            return None
        return self.buffer.playout_time(self._capture_us_of(self.cursor + 1))

    def stats(self) -> dict:
        b = self.buffer.stats()
        out = dict(self._counts)
        out.update({
            "received": b["received"], "evicted": b["evicted"], "buffered": b["buffered"],
            "predicted_received": b["predicted"], "predicted_late": b["predicted_late"],
            "target_delay_ms": b["target_delay_ms"], "jitter_ms": b["jitter_ms"],
            "offset_ms": b["offset_ms"], "drift_ppm": b["drift_ppm"],
            "max_gap_ms": self._max_gap_s * 1000.0, "lookahead_ms": self._lookahead_ms,
        })
        for k, (total, n) in self._err.items():
            out[f"{k}_kp_error"] = total / n if n else None
            out[f"{k}_kp_error_n"] = n
        return out

    # ------------------------------------------------------------------ steering
    def _ideal(self, now_s: float) -> float:
        """Fractional seq due at ``now_s`` given the clock mapping and the current target delay."""
        ref = self.buffer.newest
        if ref is None:
            return float(self.cursor or 0)
        c = self.buffer.capture_due(now_s)
        return ref.seq + (c - ref.capture_us * 1e-6) * self.cfg.fps

    def _steer(self, p: float) -> int:
        cfg = self.cfg
        dev = (self.cursor + 1) - p  # > 0: the next frame would be early
        if self._startup:
            if dev > cfg.early_slack:
                return 0  # hold the first frame until it is due
            self._startup = False
            self._last_new_s = None  # waiting for the first frame to fall due is not a stall
        if dev < -cfg.resync_frames:
            self._counts["resyncs"] += 1
            return max(1, math.floor(p + cfg.early_slack) - self.cursor)
        if dev > cfg.resync_frames:
            return 0
        if dev > cfg.early_slack:
            return 0 if self._last_step != 0 else 1
        if dev < -cfg.late_slack:
            return 2 if self._last_step != 2 else 1
        return 1

    def _count_new(self, now_s: float, kind: str) -> None:
        c = self._counts
        c["rendered"] += 1
        c["new_frames"] += 1
        c[kind] += 1
        if self._last_new_s is not None:
            gap = now_s - self._last_new_s
            self._max_gap_s = max(self._max_gap_s, gap)
            if gap > self.cfg.stall_s:
                c["stalls"] += 1
        self._last_new_s = now_s

    def _lookahead_frames(self) -> int:
        ms = self._lookahead_ms
        if self.cfg.lookahead_cover_buffer:
            ms += self.buffer.target_delay_s * 1000.0
        return max(0, round(ms / 1000.0 * self.cfg.fps))

    # ------------------------------------------------------------------ rendering
    def _capture_us_of(self, seq: int) -> float:
        f = self.buffer.get(seq)
        if f is not None:
            return f.capture_us
        ref = self.buffer.newest
        if ref is None:
            return 0.0
        return ref.capture_us + (seq - ref.seq) * 1e6 / self.cfg.fps

    def _render_base(self, s: int) -> tuple[np.ndarray, FrameKind, float, float]:
        """Vector for seq ``s`` at the playout point; updates history and blend state."""
        cfg = self.cfg
        frame = self.buffer.get(s)
        blend = 0.0
        if frame is not None:
            clean, capture_us = frame.vector, float(frame.capture_us)
            kind = "predicted" if frame.predicted else "real"
            if self._conceal_run > 0 and self._hist and cfg.blend_frames > 0:
                pred = self._forecast_to(s, self._hist_array(), self._hist[-1][0])
                self._corr = pred - clean
                self._blend_left = cfg.blend_frames
            self._conceal_run = 0
        else:
            capture_us = self._capture_us_of(s)
            right = None
            newest = self.buffer.newest
            unknown = self._guess_ahead and (newest is None or s > newest.seq)
            predicted = None if unknown else self._predicted(s)
            if predicted is None and cfg.interpolate_gaps and self._clean is not None:
                right = self.buffer.next_after(s, max(cfg.max_interp_gap, cfg.kp_every))
            if predicted is not None:
                # not a concealment: no blend afterwards (the next coded frame corrects the prediction
                # by exactly what the sender measured) and no damping
                clean, kind = predicted, "predicted"
            elif right is not None:
                ls, lv = self._clean
                w = (s - ls) / (right.seq - ls)
                clean, kind = lv + w * (right.vector - lv), "interpolated"
            else:
                clean, kind = self._conceal(s), "concealed"
        vector = clean
        if kind != "concealed" and self._blend_left > 0 and self._corr is not None:
            blend = self._blend_left / (cfg.blend_frames + 1)
            vector = clean + blend * self._corr
            self._blend_left -= 1
        vector = np.asarray(vector, dtype=np.float32)
        self._clean = (s, np.asarray(clean, dtype=np.float32))
        self._hist.append((s, vector))
        return vector, kind, capture_us, blend

    def _predicted(self, s: int) -> np.ndarray | None:
        if self.cfg.predictor is None:
            return None
        try:
            v = self.cfg.predictor(s)
        except Exception:  # a broken predictor must not stop the picture: conceal instead
            self._counts["forecast_errors"] += 1
            log.exception("closed-loop predictor failed")
            return None
        return None if v is None else np.asarray(v, dtype=np.float32).reshape(-1)

    def _conceal(self, s: int) -> np.ndarray:
        self._blend_left = 0  # the forecast continues from what was rendered, so no correction
        if not self._hist:
            raise RuntimeError("nothing to conceal from")  # cannot happen: playout starts on a real frame
        last_seq, last_vec = self._hist[-1]
        v = self._forecast_to(s, self._hist_array(), last_seq)
        self._conceal_run += 1
        extra = self._conceal_run - self.cfg.damp_after_frames
        if extra > 0:  # long outage: fade the motion out instead of extrapolating forever
            v = last_vec + (v - last_vec) * (self.cfg.damp ** extra)
        v = np.asarray(v, dtype=np.float32)
        v[:NC] = np.clip(v[:NC], -1.0, 1.0)
        return v

    def _hist_array(self) -> np.ndarray:
        return np.stack([v for _, v in self._hist]).astype(np.float32)

    def _forecast_to(self, s: int, hist: np.ndarray, last_seq: int) -> np.ndarray:
        steps = min(max(1, s - last_seq), self.cfg.max_forecast_steps)
        try:
            out = np.asarray(self.forecaster.forecast(hist, steps, 1), dtype=np.float32)
            v = out[0, steps - 1]
            if v.shape != (KP_DIM,) or not np.isfinite(v).all():
                raise ValueError(f"bad forecast of shape {out.shape}")
            return v.copy()  # callers clip it in place; it may be a view of the forecaster's output
        except Exception:  # a broken forecaster must not stop the picture
            self._counts["forecast_errors"] += 1
            if not self._forecast_failed:
                log.exception("forecaster failed; repeating the last frame instead")
                self._forecast_failed = True
            return hist[-1].copy()

    def _render_ahead(self, s: int, target: int) -> tuple[np.ndarray, FrameKind]:
        frame = self.buffer.get(target)
        if frame is not None:
            return frame.vector, "real"
        newer = self.buffer.frames_between(s, target)
        hist = self._hist_array()
        last_seq = s
        if newer:
            hist = np.concatenate([hist, np.stack([f.vector for f in newer])])[-max(2, self.cfg.history):]
            last_seq = newer[-1].seq
        self._counts["lookahead_forecast"] += 1
        v = self._forecast_to(target, hist, last_seq)
        v[:NC] = np.clip(v[:NC], -1.0, 1.0)
        return v, "concealed"

    # ------------------------------------------------------------------ error bookkeeping
    def _expect(self, seq: int, kind: str, vector: np.ndarray) -> None:
        truth = self._truth.get(seq)  # kept: a lookahead and a base frame may share a seq
        if truth is not None:
            self._add_error(kind, vector, truth)
            return
        key = (seq, kind == "lookahead")
        self._pending[key] = (kind, vector)
        self._pending.move_to_end(key)
        while len(self._pending) > self.cfg.truth_window:
            self._pending.popitem(last=False)

    def _add_error(self, kind: str, vector: np.ndarray, truth: np.ndarray) -> None:
        e = self._err.setdefault(kind, [0.0, 0])
        e[0] += kp_error(vector, truth)
        e[1] += 1
