"""Closed-loop predictive keypoint coding: send only what the receiver cannot predict.

Both ends run the same deterministic predictor on the same *decoded* history, in
integers, so they agree bit for bit without ever exchanging the prediction:

- quantisation: coordinates on a grid of ``coord_step`` over [-1, 1]; Jacobian entries on
  the Q8 codec's logarithmic int8 scale (``shared.kpvector``), whose steps are relative;
- predictor: ``last`` (repeat the previous frame) or ``linear`` (constant velocity);
- per frame the encoder either **skips** it (the prediction is within ``tolerance`` of
  the truth and fewer than ``max_gap`` frames were skipped: nothing is sent, and the
  receiver's history takes the prediction, exactly as the encoder's does), or sends the
  **residual** (quantised truth minus prediction, zig-zag + Exp-Golomb coded with one
  order per group chosen per frame), or a **keyframe** (the absolute Q8 vector) every
  ``keyframe_interval`` frames and whenever the receiver reports a loss.

Every coded frame names the previous coded frame (``prev_seq``): a receiver whose last
decoded frame is ``prev_seq`` fills the skipped frames between by prediction and
decodes; any other receiver has lost something, holds the frame until the missing one
turns up (the keypoint channel is unordered) and otherwise asks for a keyframe. A lost
message can therefore never drift the decoder: it stops decoding until it is in sync.

No torch and no I/O here; ``shared.kpvector`` holds the quantisers and the residual bitstream,
``shared.protocol`` carries the frames on the wire.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shared.kpvector import (
    JAC_RANGE,
    KP_DIM,
    NC,
    Codec,
    decode_residual,
    decode_vectors,
    encode_residual,
    encode_vector,
    jac_to_q8,
    q8_to_jac,
)
from shared.protocol import PREDICTORS, PredParams

log = logging.getLogger(__name__)

SKIP_RULES = ("max", "mean")
MAX_HELD = 16  # out-of-order frames a decoder holds waiting for their predecessor


@dataclass(frozen=True)
class PredictiveConfig:
    """Parameters both ends must share (the sender announces them in its Hello).

    coord_step: coordinate grid in [-1, 1] units (1/512 = 0.25 px at 256x256 at worst: below
        what a viewer sees, and far coarser than Q8's 3e-5, which only costs bits).
    predictor: ``last`` or ``linear`` (integer extrapolation 2 h[-1] - h[-2]).
    tolerance: skip a frame when every coordinate of the prediction is within this of the
        truth (in [-1, 1] units; 0.004 = 0.5 px at 256) and every Jacobian entry within
        ``tolerance * jac_factor`` (a Jacobian error of 0.04 moves a pixel one kernel width
        (0.1) away by 0.004: the same size).
    skip_rule: what "within tolerance" means (sender only; the receiver needs no part of it):
        ``max``: every value within it; ``mean``: the mean absolute error of the coordinates
        (and of the Jacobian entries, times ``jac_factor``) within it and no single value
        beyond ``mean_cap`` times it. Measured on held-out faces (bench.bandwidth), ``mean``
        skips more frames at the same SSIM: one keypoint jittering does not force a frame
        out, while the cap still bounds any keypoint's error.
    max_gap: at most this many frames in a row are skipped (the receiver stays fresh).
    keyframe_interval: an absolute frame at least this often (frames), so a receiver that
        missed a keyframe request recovers anyway.
    """

    coord_step: float = 1.0 / 512
    predictor: str = "last"
    tolerance: float = 0.004
    jac_factor: float = 10.0
    max_gap: int = 4
    keyframe_interval: int = 90
    skip_rule: str = "max"
    mean_cap: float = 3.0

    def __post_init__(self) -> None:
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if not 1e-5 <= self.coord_step <= 0.1:
            raise ValueError("coord_step must be in [1e-5, 0.1]")
        if self.tolerance < 0 or self.max_gap < 0 or self.keyframe_interval < 1:
            raise ValueError("tolerance and max_gap must be >= 0, keyframe_interval >= 1")
        if self.skip_rule not in SKIP_RULES or self.mean_cap < 1:
            raise ValueError(f"skip_rule must be one of {SKIP_RULES} and mean_cap >= 1")

    @property
    def coord_levels(self) -> int:
        """Largest coordinate integer: coordinates are integers in [-L, L]."""
        return int(round(1.0 / self.coord_step))

    def params(self) -> PredParams:
        """What the Hello announces."""
        return PredParams(self.predictor, self.tolerance, self.coord_step, self.max_gap, self.keyframe_interval)

    @classmethod
    def from_params(cls, p: PredParams) -> PredictiveConfig:
        """The receiver's copy of the sender's config; ValueError when the values are not usable."""
        return cls(coord_step=p.coord_step, predictor=p.predictor, tolerance=p.tolerance, max_gap=p.max_gap,
                   keyframe_interval=p.keyframe_interval)


# The sender's default stream (python -m sender, bench.bandwidth's headline), chosen on held-out
# faces at 256: skip while the mean coordinate error of "repeat the last frame" is within 0.004
# (0.5 px at 256) and no value is off by more than 3x that, at least every 9th frame sent. Chosen
# for the mouth, not the bits (bench.expression --streams, 42 clips): at 0.004 the mouth-opening
# correlation of the decoded stream is within 0.003 of every frame in Q8 (0.643 vs 0.646) at 20.3
# kbps on the wire; 0.008 (the previous default) cost 0.049 of it for 13.4 kbps, while SSIM moved by
# only 0.003 -- whole-frame SSIM does not see lips. The mean rule needed ~10 % fewer bits than "every
# value within" at equal SSIM; smoothing the detector's jitter before coding (One-Euro) cost more
# SSIM than it saved bits; "linear" predicts that jitter forward and sends twice the frames of
# "last", and no learned forecaster earns bits at equal error (bench.closed_loop, README).
DEFAULT_STREAM = PredictiveConfig(predictor="last", tolerance=0.004, max_gap=8, skip_rule="mean")


# --------------------------------------------------------------------------- integer domain


def quantise(vec: np.ndarray, cfg: PredictiveConfig) -> np.ndarray:
    """60 floats -> 60 int32: coordinates on the grid, Jacobians on the Q8 log scale."""
    v = np.asarray(vec, np.float64).reshape(-1)
    if v.size != KP_DIM or not np.isfinite(v).all():
        raise ValueError(f"keypoint vector must be {KP_DIM} finite values")
    lv = cfg.coord_levels
    c = np.clip(np.round(v[:NC] / cfg.coord_step), -lv, lv)
    j = jac_to_q8(np.clip(v[NC:], -JAC_RANGE, JAC_RANGE)).astype(np.int32)
    return np.concatenate([c.astype(np.int32), j])


def dequantise(q: np.ndarray, cfg: PredictiveConfig) -> np.ndarray:
    q = np.asarray(q, np.int32)
    c = (q[:NC].astype(np.float64) * cfg.coord_step).astype(np.float32)
    return np.concatenate([np.clip(c, -1.0, 1.0), q8_to_jac(q[NC:].astype(np.int8))])


def predict(history: list[np.ndarray], cfg: PredictiveConfig) -> np.ndarray:
    """The next integer vector from the decoded history (newest last); identical on both ends."""
    if not history:
        raise ValueError("no history to predict from")
    if cfg.predictor == "last" or len(history) < 2:
        return history[-1].copy()
    p = 2 * history[-1] - history[-2]
    lv = cfg.coord_levels
    p[:NC] = np.clip(p[:NC], -lv, lv)
    p[NC:] = np.clip(p[NC:], -127, 127)
    return p


# A closed-loop predictor other than the announced ones (bench.closed_loop tries learned
# forecasters): the decoded integer history, newest last -> the next integer vector. Both ends
# must run the same one; only the built-in integer predictors are bit-exact across machines.
Predictor = Callable[[list[np.ndarray]], np.ndarray]


def _builtin(cfg: PredictiveConfig) -> Predictor:
    return lambda history: predict(history, cfg)


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class CodedFrame:
    """One frame on the wire: ``prev_seq`` is the previous coded frame (-1 before the first)."""

    seq: int
    prev_seq: int
    key: bool
    payload: bytes


class PredictiveEncoder:
    """Sender side. ``encode`` returns the frame to send, or None when it is skipped."""

    def __init__(self, cfg: PredictiveConfig, predictor: Predictor | None = None, history_len: int = 2) -> None:
        self.cfg = cfg
        self.predictor = predictor or _builtin(cfg)
        self.history_len = max(2, int(history_len))  # frames the predictor sees
        # The skip threshold is the one parameter the receiver does not need, so rate control
        # (sender.rate) may change it between frames.
        self.tolerance = cfg.tolerance
        self.history: list[np.ndarray] = []
        self.last_coded = -1
        self.last_key = -(10 ** 9)
        self.gap = 0
        self._want_key = True
        self.counts = {"key": 0, "residual": 0, "skipped": 0}

    def request_keyframe(self) -> None:
        """The receiver reported a loss: the next frame is absolute."""
        self._want_key = True

    def encode(self, seq: int, vec: np.ndarray, force: bool = False) -> CodedFrame | None:
        """The frame to send for ``seq`` (consecutive seqs), or None: skipped, nothing to send.

        ``force``: never skip (the last frame of a stream, so the receiver gets it too).
        """
        cfg = self.cfg
        q = quantise(vec, cfg)
        if self._want_key or not self.history or seq - self.last_key >= cfg.keyframe_interval:
            return self._emit(seq, q, key=True)
        p = self.predictor(self.history)
        if not force and self.gap < cfg.max_gap and self._close(p, vec):
            self._push(p)
            self.gap += 1
            self.counts["skipped"] += 1
            return None
        return self._emit(seq, q, key=False, residual=q - p)

    def _close(self, p: np.ndarray, vec: np.ndarray) -> bool:
        """Is the prediction ``p`` within tolerance of the truth ``vec`` (``skip_rule``)?"""
        cfg = self.cfg
        d = dequantise(p, cfg)
        v = np.asarray(vec, np.float32).reshape(-1)
        ec, ej = np.abs(d[:NC] - v[:NC]), np.abs(d[NC:] - v[NC:]) / cfg.jac_factor
        tol = self.tolerance
        if cfg.skip_rule == "max":
            return bool(ec.max() <= tol and ej.max() <= tol)
        cap = cfg.mean_cap * tol
        return bool(ec.mean() <= tol and ej.mean() <= tol and ec.max() <= cap and ej.max() <= cap)

    def _emit(self, seq: int, q: np.ndarray, key: bool, residual: np.ndarray | None = None) -> CodedFrame:
        if key:
            payload = encode_vector(dequantise(q, self.cfg), Codec.Q8)
            # the receiver decodes the Q8 bytes: take exactly what it will hold
            q = quantise(decode_vectors(payload, Codec.Q8)[0], self.cfg)
            self.history = []
            self.last_key = seq
            self._want_key = False
            self.counts["key"] += 1
        else:
            payload = encode_residual(residual)
            self.counts["residual"] += 1
        frame = CodedFrame(seq, self.last_coded, key, payload)
        self._push(q)
        self.last_coded = seq
        self.gap = 0
        return frame

    def _push(self, q: np.ndarray) -> None:
        self.history = (self.history + [q])[-self.history_len:]


@dataclass(frozen=True)
class Decoded:
    seq: int
    vector: np.ndarray  # (60,) float32
    kind: str  # "key" | "residual" | "skipped"


class PredictiveDecoder:
    """Receiver side: feed ``CodedFrame``s in any order; get decoded frames in order.

    ``needs_keyframe`` turns true when a frame's predecessor is missing and ``max_pending``
    frames wait behind it (the keypoint channel never retransmits): the receiver should
    ask the sender for a keyframe. Until one arrives nothing after the gap is decoded,
    so the picture can freeze on a concealment but never drift.
    """

    def __init__(self, cfg: PredictiveConfig, max_pending: int = 3, predictor: Predictor | None = None,
                 history_len: int = 2) -> None:
        self.cfg = cfg
        self.predictor = predictor or _builtin(cfg)
        self.history_len = max(2, int(history_len))
        self.history: list[np.ndarray] = []
        self.last_seq = -1  # newest decoded seq (coded or skipped)
        self.last_coded = -1
        self.pending: dict[int, CodedFrame] = {}  # keyed by prev_seq
        self.max_pending = max_pending
        self.needs_keyframe = False
        self.counts = {"key": 0, "residual": 0, "skipped": 0, "dropped": 0}

    def predict_next(self) -> np.ndarray | None:
        """What the encoder predicts for the frame after the newest decoded one (concealment)."""
        return dequantise(self.predictor(self.history), self.cfg) if self.history else None

    def predict_at(self, seq: int) -> np.ndarray | None:
        """What the receiver shows for ``seq`` before (or instead of) hearing about it.

        The encoder's prediction chained from the decoded history, exactly what it assumed
        if it skipped every frame since the last coded one; None when ``seq`` is not within
        ``max_gap`` frames after it (then it cannot be a skip: a frame is late or lost).
        """
        k = seq - self.last_seq
        if not self.history or not 1 <= k <= self.cfg.max_gap:
            return None
        h = list(self.history)
        for _ in range(k):
            q = self.predictor(h)
            h = (h + [q])[-self.history_len:]
        return dequantise(q, self.cfg)

    def push(self, frame: CodedFrame) -> list[Decoded]:
        """Decode ``frame`` and whatever it unblocks. Raises ValueError on a corrupt frame."""
        if frame.seq <= self.last_seq or frame.prev_seq >= frame.seq:
            self.counts["dropped"] += 1  # duplicate, stale or inconsistent
            return []
        span = self.cfg.max_gap + 1  # an honest encoder never leaves more frames between two coded ones
        if not frame.key and (frame.prev_seq < 0 or frame.seq - frame.prev_seq > span):
            raise ValueError(f"residual frame {frame.seq} is more than max_gap frames after {frame.prev_seq}")
        out: list[Decoded] = []
        if frame.key:
            q = quantise(decode_vectors(frame.payload, Codec.Q8)[0], self.cfg)
            if frame.prev_seq == self.last_coded and self.history and frame.seq - self.last_seq <= span:
                out += self._fill(frame.seq)
            self.history = []
            self.pending = {k: f for k, f in self.pending.items() if f.seq > frame.seq}
            out.append(self._take(frame.seq, q, "key"))
            self.needs_keyframe = False
        elif self.history and frame.prev_seq == self.last_coded:
            r = decode_residual(frame.payload)
            q = self.predictor(self._filled_history(frame.seq)) + r
            lv = self.cfg.coord_levels
            if np.abs(q[:NC]).max() > lv or np.abs(q[NC:]).max() > 127:
                raise ValueError("residual decodes outside the quantiser's range")
            out += self._fill(frame.seq)
            out.append(self._take(frame.seq, q, "residual"))
        else:
            if frame.prev_seq > self.last_coded:  # its predecessor may still arrive (unordered channel)
                self.pending[frame.prev_seq] = frame
                while len(self.pending) > MAX_HELD:  # a peer's made-up predecessors cannot grow memory
                    del self.pending[min(self.pending)]
                    self.counts["dropped"] += 1
            else:
                self.counts["dropped"] += 1
            if len(self.pending) >= self.max_pending or not self.history:
                self.needs_keyframe = True
            return out
        nxt = self.pending.pop(self.last_coded, None)
        if nxt is not None:
            try:
                out += self.push(nxt)
            except ValueError:  # a corrupt held frame must not lose what this one decoded
                self.counts["dropped"] += 1
        return out

    def _filled_history(self, seq: int) -> list[np.ndarray]:
        """The history as it will be once the skipped frames before ``seq`` are filled (no side effects)."""
        h = list(self.history)
        for _ in range(self.last_seq + 1, seq):
            h = (h + [self.predictor(h)])[-self.history_len:]
        return h

    def _fill(self, seq: int) -> list[Decoded]:
        """The skipped frames between the last coded frame and ``seq``, by prediction."""
        out = []
        for s in range(self.last_seq + 1, seq):
            q = self.predictor(self.history)
            self.history = (self.history + [q])[-self.history_len:]
            self.last_seq = s
            self.counts["skipped"] += 1
            out.append(Decoded(s, dequantise(q, self.cfg), "skipped"))
        return out

    def _take(self, seq: int, q: np.ndarray, kind: str) -> Decoded:
        self.history = (self.history + [q])[-self.history_len:]
        self.last_seq = self.last_coded = seq
        self.counts[kind] += 1
        return Decoded(seq, dequantise(q, self.cfg), kind)
