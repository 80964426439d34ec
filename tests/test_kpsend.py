"""The sender's predictive stream (sender.kpsend): what goes out for skipped, dropped and last frames."""

from __future__ import annotations

import numpy as np

from sender.kpsend import PredictiveSender
from shared import protocol as P
from shared.kpcodec import CodedFrame, PredictiveConfig, PredictiveDecoder

BASE = np.concatenate([np.linspace(-0.5, 0.5, 20), np.tile([1.0, 0, 0, 1.0], 10)]).astype(np.float32)


class Wire:
    """Encodes every message (as the peer does), decodes it back; can refuse to send some."""

    def __init__(self, refuse: set[int] = frozenset()) -> None:
        self.msgs: list[P.CodedKeypoints] = []
        self.refuse = set(refuse)

    def __call__(self, msg: P.CodedKeypoints) -> int:
        if msg.seq in self.refuse:
            return 0
        data = P.encode(msg)
        self.msgs.append(P.decode(data))
        return len(data)


def test_skipped_frames_send_nothing_and_the_rest_go_out_at_once() -> None:
    wire = Wire()
    ps = PredictiveSender(wire, PredictiveConfig(max_gap=8), ts_base_us=1_000_000)
    sent = [ps.frame(i, 1_000_000 + 33_333 * i, BASE + 0.02 * (i // 5), i / 30) for i in range(20)]
    # the frame that moves goes out in the same call (no batching delay); the still ones do not
    assert [i for i, n in enumerate(sent) if n] == [0, 5, 10, 15] == [m.seq for m in wire.msgs]
    assert [m.ts_us for m in wire.msgs] == [33_333 * i for i in (0, 5, 10, 15)]  # after the Hello's base
    st = ps.summary()
    assert st["frames_sent"] == 4 and st["frames_skipped"] == 16 and st["keyframes_sent"] == 1
    assert st["keypoint_message_bytes"] == sum(n for n in sent)


def test_a_dropped_message_makes_the_next_frame_a_keyframe() -> None:
    wire = Wire(refuse={5})
    ps = PredictiveSender(wire, PredictiveConfig(max_gap=8), ts_base_us=0)
    for i in range(12):
        ps.frame(i, 33_333 * i, BASE + 0.02 * (i // 5), i / 30)
    assert [(m.seq, m.key) for m in wire.msgs] == [(0, True), (6, True), (10, False)]
    assert ps.summary()["kp_dropped"] == 1


def test_keyframe_requests_are_honoured_and_the_last_frame_is_always_sent() -> None:
    wire = Wire()
    ps = PredictiveSender(wire, PredictiveConfig(max_gap=30), ts_base_us=0)
    for i in range(4):
        ps.frame(i, 33_333 * i, BASE, i / 30)
    ps.request_keyframe()
    ps.frame(4, 4 * 33_333, BASE, 4 / 30)  # still, but asked for: sent, absolute
    for i in range(5, 9):
        ps.frame(i, 33_333 * i, BASE, i / 30)
    assert ps.finish(8, 8 * 33_333, BASE, 8 / 30) > 0  # skipped when captured, sent at the end
    assert ps.finish(8, 8 * 33_333, BASE, 8 / 30) == 0  # only once
    assert [(m.seq, m.key) for m in wire.msgs] == [(0, True), (4, True), (8, True)]
    # the receiver gets every frame of the stream
    dec = PredictiveDecoder(ps.cfg)
    seqs = [d.seq for m in wire.msgs for d in dec.push(CodedFrame(m.seq, m.prev_seq, m.key, m.payload))]
    assert seqs == list(range(9))
    st = ps.summary()
    assert st["frames_sent"] + st["frames_skipped"] == 9 and st["keyframe_requests"] == 1
