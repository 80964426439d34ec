"""One call's predictive keypoint stream at the receiver: coded frames in, every frame out.

Wraps ``shared.kpcodec.PredictiveDecoder`` with what a call needs around it:

- capture times: a coded frame carries its own (``CodedKeypoints.ts_us`` after the Hello's
  ``ts_base_us``); a frame the sender skipped gets the coded frame's time minus whole frame
  periods (it was never sent, so it has no arrival that could say anything about the network);
- loss recovery: a message carrying its predecessor (``P.RedundantFrame``, sent after a loss was
  reported) repairs a single lost message; when the decoder's chain is broken (``needs_keyframe``) a
  ``KeyframeRequest`` is due, at most one per ``request_interval_s`` (the sender answers
  within a round trip; asking again each frame would only turn every frame into a keyframe);
- the closed-loop prediction for playout (:meth:`PredictiveStream.predict_at`): what the
  sender assumed the receiver shows for a frame it skipped, so the playout shows exactly that.

Everything a peer can get wrong raises ``ProtocolError``; nothing else escapes ``push``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from shared import protocol as P
from shared.kpcodec import CodedFrame, PredictiveConfig, PredictiveDecoder

log = logging.getLogger(__name__)

REQUEST_INTERVAL_S = 0.25  # about a round trip plus a frame on a slow path
MAX_TIMES_HELD = 64  # capture times of out-of-order frames the decoder still holds


@dataclass(frozen=True)
class StreamFrame:
    """A decoded frame: ``skipped`` when the sender sent nothing for it (decoded by prediction)."""

    seq: int
    capture_us: int
    vector: np.ndarray  # (60,) float32
    skipped: bool


class PredictiveStream:
    """Decoder + capture times + keyframe-request pacing for one call (not thread-safe)."""

    def __init__(self, cfg: PredictiveConfig, fps: float, ts_base_us: int = 0,
                 request_interval_s: float = REQUEST_INTERVAL_S) -> None:
        self.cfg = cfg
        # Ask at the first frame whose predecessor is missing: on the unordered channel that is almost
        # always a loss, and waiting for more frames to be sure only prolongs the frozen picture (a
        # reordered predecessor still decodes; the keyframe that follows costs one message).
        self.decoder = PredictiveDecoder(cfg, max_pending=1)
        self.frame_us = 1e6 / fps
        self.ts_base_us = ts_base_us
        self.request_interval_s = request_interval_s
        self._times: OrderedDict[int, int] = OrderedDict()  # seq -> capture time of a coded frame
        self._last_request_s = float("-inf")
        self.counts = {"coded": 0, "keyframes": 0, "residuals": 0, "skipped": 0, "keyframe_requests": 0,
                       "recovered": 0}

    @staticmethod
    def from_hello(hello: P.Hello) -> PredictiveStream:
        """The stream a predictive Hello announces; ProtocolError when its parameters are unusable."""
        if hello.pred is None:
            raise P.ProtocolError("codec", "the Hello announces no predictive codec")
        try:
            cfg = PredictiveConfig.from_params(hello.pred)
        except ValueError as e:
            raise P.ProtocolError("field", f"codec parameters: {e}") from None
        return PredictiveStream(cfg, hello.fps, hello.ts_base_us)

    def push(self, msg: P.CodedKeypoints) -> list[StreamFrame]:
        """Decode one message; returns the frames it completes, in order (possibly none)."""
        out: list[StreamFrame] = []
        r = msg.redundant
        if r is not None and msg.prev_seq > self.decoder.last_seq and msg.prev_seq not in self._times:
            # its predecessor never arrived (or not yet): decode it from the copy first. Its capture
            # time is not on the wire; whole frame periods before this frame's is what the sender had.
            prev = P.CodedKeypoints(msg.prev_seq, r.prev_seq, r.key,
                                    max(0, round(msg.ts_us - (msg.seq - msg.prev_seq) * self.frame_us)), r.payload)
            try:
                out = self._push(prev)
                self.counts["recovered"] += int(any(f.seq == msg.prev_seq for f in out))
            except P.ProtocolError:
                out = []  # a bad copy must not lose the frame that carried it
        return out + self._push(msg)

    def _push(self, msg: P.CodedKeypoints) -> list[StreamFrame]:
        dec = self.decoder
        dropped = dec.counts["dropped"]
        self._times[msg.seq] = self.ts_base_us + msg.ts_us
        while len(self._times) > MAX_TIMES_HELD:
            self._times.popitem(last=False)
        try:
            decoded = dec.push(CodedFrame(msg.seq, msg.prev_seq, msg.key, msg.payload))
        except ValueError as e:  # a residual that does not decode against our history
            self._times.pop(msg.seq, None)
            raise P.ProtocolError("residual", str(e)) from None
        held = any(f.seq == msg.seq for f in dec.pending.values())  # waiting for its predecessor: fine
        if not decoded and not held and dec.counts["dropped"] > dropped:
            self._times.pop(msg.seq, None)
            raise P.ProtocolError("stale", f"coded frame {msg.seq} is a duplicate or older than frame {dec.last_seq}")
        out: list[StreamFrame] = []
        next_us: float | None = None  # capture time of the coded frame after the current one
        for d in reversed(decoded):
            if d.kind == "skipped":
                cap = (next_us if next_us is not None else self.ts_base_us + msg.ts_us) - self.frame_us
                next_us = cap
            else:
                cap = self._times.pop(d.seq, self.ts_base_us + msg.ts_us)
                next_us = cap
                self.counts["coded"] += 1
                self.counts["keyframes" if d.kind == "key" else "residuals"] += 1
            out.append(StreamFrame(d.seq, int(round(cap)), d.vector, d.kind == "skipped"))
        out.reverse()
        self.counts["skipped"] += sum(f.skipped for f in out)
        return out

    def keyframe_request(self, now_s: float) -> P.KeyframeRequest | None:
        """The request to send now, if the chain is broken and none went out recently."""
        if not self.decoder.needs_keyframe or now_s - self._last_request_s < self.request_interval_s:
            return None
        self._last_request_s = now_s
        self.counts["keyframe_requests"] += 1
        log.info("keypoint chain broken after frame %d: asking for a keyframe", self.decoder.last_seq)
        return P.KeyframeRequest(self.decoder.last_seq)

    def predict_at(self, seq: int) -> np.ndarray | None:
        """The sender's own prediction for ``seq`` (None beyond ``max_gap`` of the newest decoded frame)."""
        return self.decoder.predict_at(seq)

    def stats(self) -> dict:
        return {**self.counts, "dropped": self.decoder.counts["dropped"], "held": len(self.decoder.pending),
                "needs_keyframe": self.decoder.needs_keyframe, "predictor": self.cfg.predictor,
                "max_gap": self.cfg.max_gap}
