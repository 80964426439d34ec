"""The sender's predictive keypoint stream: every frame encoded, only unpredictable ones sent.

Per captured frame, ``PredictiveEncoder`` either skips it (nothing goes out: the receiver
shows its own prediction, which is what the encoder assumed) or returns a keyframe or
residual, sent at once as one ``CodedKeypoints`` message: nothing waits for a batch, so
the stream adds no delay. Around that:

- a message the peer could not send (congested channel) makes the next frame a keyframe,
  since the receiver's chain breaks there anyway, and a ``KeyframeRequest`` does the same and
  turns on redundancy for a while: each message also carries the coded frame before it
  (``shared.protocol.RedundantFrame``), so a single lost message no longer breaks the chain;
  a call's first messages carry it too (``START_PROTECT_MESSAGES``);
- with a :class:`sender.rate.RateController` the skip tolerance follows the measured
  wire rate;
- a new source image (:meth:`PredictiveSender.new_source`: re-frame, refresh, request) makes
  the next frame a keyframe and every message after it names the image (``image_id``), so
  no residual predicts across two pictures and the receiver renders each frame on its own;
- :meth:`PredictiveSender.finish` sends the last frame of a stream if it was skipped, so
  the receiver ends on the true last frame;
- with ``bundle`` on, a coded frame waits one frame period: when the next frame is coded too, both
  travel in one message (the waiting one as the message's ``RedundantFrame``, which every receiver
  already decodes), halving the ~95 B of transport a message costs; when the next frame is skipped,
  the waiting one goes out alone. Frames arrive one period later, never more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from sender.rate import RateController
from shared import protocol as P
from shared.kpcodec import CodedFrame, PredictiveConfig, PredictiveEncoder

log = logging.getLogger(__name__)

# After a KeyframeRequest, this many messages (~10 s at the default stream's 16 messages/s) repeat
# the frame before them: a path that lost one message is likely to lose more.
PROTECT_MESSAGES = 160

# A call's first messages carry their predecessor too: nothing is known of the path yet, and a loss
# there breaks the chain while the picture is just coming up (bench.playout at 10 % loss: the first
# frames waited ~200 ms for the requested keyframe, its only stalls). ~2 s, a few hundred bytes.
START_PROTECT_MESSAGES = 32

# send(message) -> encoded bytes sent, 0 when the message was dropped (SenderPeer.send_keypoints)
SendFn = Callable[[P.CodedKeypoints], int]


class PredictiveSender:
    """Encode and send one call's keypoints (``frame`` once per captured frame, in order)."""

    def __init__(self, send: SendFn, cfg: PredictiveConfig, ts_base_us: int,
                 rate: RateController | None = None, bundle: bool = False) -> None:
        self.send = send
        self.cfg = cfg
        self.encoder = PredictiveEncoder(cfg)
        self.ts_base_us = ts_base_us
        self.rate = rate
        self.last_seq = -1
        self.image_id: int | None = None  # the source image the frames refer to (None: untagged)
        self.stats = {"frames_sent": 0, "frames_skipped": 0, "keyframes_sent": 0, "messages_sent": 0,
                      "keypoint_payload_bytes": 0, "keypoint_message_bytes": 0, "keyframe_requests": 0,
                      "kp_dropped": 0, "redundant_frames": 0, "bundled_frames": 0}
        self._protect = START_PROTECT_MESSAGES  # messages still to carry their predecessor
        self._last_sent: CodedFrame | None = None
        self.bundle = bundle
        self._held: tuple[CodedFrame, int] | None = None  # (frame, capture_us) waiting for a partner
        self.last_sent_seqs: list[int] = []  # the frames the last call's message carried (for the sender's log)
        self._now_s = 0.0  # the clock of the last frame

    def hello_params(self) -> P.PredParams:
        return self.cfg.params()

    def request_keyframe(self) -> None:
        """The receiver lost the chain (``KeyframeRequest``): a keyframe now, and redundancy for a while."""
        self.stats["keyframe_requests"] += 1
        self.encoder.request_keyframe()
        # the path loses messages: repeat each frame in the next one (P.RedundantFrame) so that one
        # loss no longer costs a round trip of concealed frames; off again after a quiet spell
        self._protect = PROTECT_MESSAGES

    def new_source(self, image_id: int) -> None:
        """A new source image went out: later frames refer to it, starting with a keyframe."""
        if image_id != self.image_id:
            self._flush(self._now_s)  # a waiting frame belongs to the image before: it goes out named so
            self.image_id = image_id
            self.encoder.request_keyframe()

    def frame(self, seq: int, capture_us: int, vec: np.ndarray, now_s: float) -> int:
        """Encode frame ``seq``; returns the bytes sent (0: skipped or dropped)."""
        if self.rate is not None:
            self.encoder.tolerance = self.rate.update(now_s)
        self.last_seq = seq
        self.last_sent_seqs = []
        self._now_s = now_s
        coded = self.encoder.encode(seq, vec)
        if coded is None:
            self.stats["frames_skipped"] += 1
            return self._flush(now_s)
        if not self.bundle or self.image_id is None:  # a redundant frame needs the image id on the wire
            return self._send(coded, capture_us, now_s)
        if self._held is None:
            self._held = (coded, capture_us)
            return 0
        held, held_us = self._held
        self._held = None
        if coded.prev_seq != held.seq:  # cannot happen in order; send them apart rather than mislabel
            return self._send(held, held_us, now_s) + self._send(coded, capture_us, now_s)
        return self._send(coded, capture_us, now_s, carried=held)

    def _flush(self, now_s: float) -> int:
        """Send the frame waiting for a partner, alone."""
        if self._held is None:
            return 0
        held, capture_us = self._held
        self._held = None
        return self._send(held, capture_us, now_s)

    def finish(self, seq: int, capture_us: int, vec: np.ndarray, now_s: float) -> int:
        """The stream ends at ``seq``: if that frame was skipped, send it (as a keyframe) after all."""
        self.last_sent_seqs = []
        flushed = self._flush(now_s)
        enc = self.encoder
        if seq != self.last_seq or enc.last_coded == seq:
            return flushed
        enc.request_keyframe()  # a keyframe needs no history: the receiver fills the frames before it
        coded = enc.encode(seq, vec)
        assert coded is not None and coded.key
        self.stats["frames_skipped"] -= 1  # it was counted skipped when it was captured
        return flushed + self._send(coded, capture_us, now_s)

    def _send(self, coded: CodedFrame, capture_us: int, now_s: float, carried: CodedFrame | None = None) -> int:
        """One message: ``coded``, with ``carried`` (a bundled frame) or, while protecting, the frame
        sent before it as its ``RedundantFrame``."""
        last = self._last_sent
        redundant = None
        if carried is not None:
            redundant = P.RedundantFrame(carried.prev_seq, carried.key, carried.payload)
        elif (self._protect > 0 and not coded.key and self.image_id is not None and last is not None
                and last.seq == coded.prev_seq):
            redundant = P.RedundantFrame(last.prev_seq, last.key, last.payload)
        msg = P.CodedKeypoints(coded.seq, coded.prev_seq, coded.key, max(0, capture_us - self.ts_base_us),
                               coded.payload, self.image_id, redundant)
        n = self.send(msg)
        self._protect = max(0, self._protect - 1)
        self._last_sent = coded if n else None
        st = self.stats
        st["redundant_frames"] += int(bool(n) and redundant is not None and carried is None)
        if not n:
            # the receiver will miss this frame and cannot decode the ones predicted from it
            st["kp_dropped"] += 1
            self.encoder.request_keyframe()
            return 0
        frames = [coded] if carried is None else [carried, coded]
        self.last_sent_seqs += [f.seq for f in frames]
        st["frames_sent"] += len(frames)
        st["bundled_frames"] += len(frames) - 1
        st["keyframes_sent"] += sum(int(f.key) for f in frames)
        st["messages_sent"] += 1
        st["keypoint_payload_bytes"] += sum(len(f.payload) for f in frames)
        st["keypoint_message_bytes"] += n
        if self.rate is not None:
            self.rate.sent(now_s, n)
        return n

    def summary(self) -> dict:
        out = dict(self.stats)
        out["tolerance_final"] = self.encoder.tolerance
        if self.rate is not None:
            out["rate_changes"] = self.rate.changes
            out["rate_saturated"] = self.rate.saturated
        return out
