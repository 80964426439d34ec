"""Rate control for the predictive keypoint stream: ``--target-kbps`` sets the skip tolerance.

The tolerance is the one codec parameter only the sender uses (``PredictiveEncoder.tolerance``),
so it can change at any frame. Bits on the wire fall as it rises, because fewer frames
differ from their prediction by more than it, and each frame not sent saves its whole
message: the payload plus ``overhead_bytes`` of DTLS/SCTP/UDP/IP.

The controller is deliberately plain, so it cannot oscillate:

- the rate is measured over the last ``window_s`` of sent messages (bytes + overhead each);
- at most once per ``window_s`` (so every measurement only sees frames coded with the
  current tolerance), when the rate is off the target by more than ``deadband``, the
  tolerance is multiplied by ``(rate / target) ** gain``, limited to ``max_step`` either way
  (the rate falls roughly as tolerance^-0.8 on held-out faces, so gain 0.5 closes about half
  the gap per step: a talking head's rate swings by a third from one window to the next, and
  chasing every swing only moves the quality around; tests/test_rate.py);
- it stays within ``[min_tolerance, max_tolerance]``: below the floor nothing more is
  gained in quality, above the ceiling the picture degrades while ``max_gap`` and the
  keyframes still set a minimum rate (the controller then reports ``saturated``).

For the q8/f16 streams (every k-th frame's vector, in batches) ``choose_rate`` picks the
decimation and batch whose estimated wire rate fits ``--target-kbps`` instead.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from shared import protocol as P
from shared.kpvector import KP_DIM, TRANSPORT_OVERHEAD_B

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class RateConfig:
    """Parameters of :class:`RateController`.

    target_kbps: keypoint messages on the wire, transport overhead included.
    overhead_bytes: transport bytes each message costs beyond its own bytes.
    window_s: the rate is measured over this much past time, and adjusted at most this often.
    gain: exponent of the rate error in the multiplicative tolerance update.
    max_step: largest factor one update changes the tolerance by.
    deadband: relative rate error left alone (content changes the rate by this much anyway).
    min_tolerance, max_tolerance: the range the tolerance is kept in ([-1, 1] units).
    """

    target_kbps: float
    overhead_bytes: int = TRANSPORT_OVERHEAD_B
    window_s: float = 3.0
    gain: float = 0.5
    max_step: float = 2.0
    deadband: float = 0.15
    min_tolerance: float = 0.001
    max_tolerance: float = 0.05

    def __post_init__(self) -> None:
        if self.target_kbps <= 0 or self.window_s <= 0 or self.max_step <= 1 or self.gain <= 0:
            raise ValueError("target_kbps, window_s, gain must be > 0 and max_step > 1")
        if not 0 < self.min_tolerance <= self.max_tolerance:
            raise ValueError("need 0 < min_tolerance <= max_tolerance")


class RateController:
    """Feed it every keypoint message sent (:meth:`sent`), ask it for the tolerance (:meth:`update`)."""

    def __init__(self, cfg: RateConfig, tolerance: float) -> None:
        self.cfg = cfg
        self.tolerance = min(max(tolerance, cfg.min_tolerance), cfg.max_tolerance)
        self._msgs: deque[tuple[float, int]] = deque()  # (time, wire bytes)
        self._bytes = 0
        self._start: float | None = None
        self._last_change: float | None = None
        self.changes = 0
        self.saturated = False

    def sent(self, t_s: float, message_bytes: int) -> None:
        """A keypoint message of ``message_bytes`` (encoded) went out at ``t_s``."""
        wire = message_bytes + self.cfg.overhead_bytes
        self._msgs.append((t_s, wire))
        self._bytes += wire

    def rate_kbps(self, t_s: float) -> float | None:
        """Wire rate over the last window (None until a whole window has passed)."""
        if self._start is None or t_s - self._start < self.cfg.window_s:
            return None
        self._trim(t_s)
        return self._bytes * 8 / self.cfg.window_s / 1000

    def _trim(self, t_s: float) -> None:
        while self._msgs and self._msgs[0][0] <= t_s - self.cfg.window_s:
            self._bytes -= self._msgs.popleft()[1]

    def update(self, t_s: float) -> float:
        """The tolerance to code the next frame with (call once per frame, any rate)."""
        cfg = self.cfg
        if self._start is None:
            self._start = self._last_change = t_s
        if t_s - self._last_change < cfg.window_s:
            return self.tolerance
        rate = self.rate_kbps(t_s)
        if rate is None:
            return self.tolerance
        err = rate / cfg.target_kbps
        if abs(err - 1.0) <= cfg.deadband:
            self.saturated = False
            return self.tolerance
        factor = min(max(max(err, 1e-3) ** cfg.gain, 1.0 / cfg.max_step), cfg.max_step)
        new = min(max(self.tolerance * factor, cfg.min_tolerance), cfg.max_tolerance)
        saturated = err > 1.0 and new >= cfg.max_tolerance
        if saturated and not self.saturated:
            log.warning("keypoint rate %.1f kbps is over the %.1f kbps target even at tolerance %.3f",
                        rate, cfg.target_kbps, new)
        self.saturated = saturated
        if new != self.tolerance:
            self.changes += 1
            log.debug("rate %.1f kbps (target %.1f): tolerance %.4f -> %.4f", rate, cfg.target_kbps,
                      self.tolerance, new)
            self.tolerance = new
        self._last_change = t_s  # measure a whole window at this tolerance before judging it
        return self.tolerance


# --------------------------------------------------------------------------- q8/f16 streams

# --target-kbps may batch frames, but never so many that batching alone delays a frame by more.
TARGET_MAX_BATCH_DELAY_MS = 100.0


def estimate_kp_wire_kbps(kp_every: int, batch: int, fps: float, codec: P.Codec = P.Codec.Q8) -> float:
    """Keypoint wire rate: encoded message bytes + transport overhead per message, at ``fps``."""
    # Large seq/timestamp values so variable-length integer fields are sized as in a long call.
    msg = P.KeypointBatch.build(10_000_000, 2**62, [np.zeros(KP_DIM, np.float32)]
                                * batch, codec, step=kp_every, interval_us=int(1e6 * kp_every / fps))
    messages_per_s = fps / (kp_every * batch)
    return (len(P.encode(msg)) + TRANSPORT_OVERHEAD_B) * messages_per_s * 8 / 1000


def choose_rate(target_kbps: float, fps: float, codec: P.Codec = P.Codec.Q8,
                max_batch_delay_ms: float = TARGET_MAX_BATCH_DELAY_MS) -> tuple[int, int, float, bool]:
    """Smallest decimation k, then smallest batch, whose estimated keypoint wire rate fits the target.

    Returns ``(kp_every, batch, estimated_kbps, fits)``; when nothing fits, the cheapest candidate
    with ``fits=False``. Batches are limited so batching delays a frame by at most
    ``max_batch_delay_ms``: decimation costs accuracy, batching costs latency.
    """
    cheapest: tuple[int, int, float] | None = None
    for k in range(1, 65):
        for b in range(1, P.MAX_FRAMES_PER_BATCH + 1):
            if b > 1 and (b - 1) * k / fps * 1000 > max_batch_delay_ms:
                break
            kbps = estimate_kp_wire_kbps(k, b, fps, codec)
            if kbps <= target_kbps:
                return k, b, kbps, True
            if cheapest is None or kbps < cheapest[2]:
                cheapest = (k, b, kbps)
    assert cheapest is not None
    return (*cheapest, False)
