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


def moving(i: int) -> np.ndarray:
    """Every frame moves: every frame is coded (in-the-wild faces send most of theirs)."""
    return BASE + np.float32(0.01 * i)


def decode_all(msgs: list[P.CodedKeypoints], cfg: PredictiveConfig, n: int) -> dict[int, np.ndarray]:
    from receiver.kpstream import PredictiveStream

    stream = PredictiveStream(cfg, 30.0)
    got = {}
    for m in msgs:
        for f in stream.push(m):
            got[f.seq] = f.vector
    assert sorted(got) == list(range(n))
    return got


def test_bundled_frames_share_messages_and_decode_exactly_as_unbundled() -> None:
    cfg = PredictiveConfig(max_gap=8)
    plain, bundled = Wire(), Wire()
    a = PredictiveSender(plain, cfg, ts_base_us=0)
    b = PredictiveSender(bundled, cfg, ts_base_us=0, bundle=True)
    for ps in (a, b):
        ps.new_source(0)
    arrived: dict[int, int] = {}
    for i in range(20):
        a.frame(i, 33_333 * i, moving(i), i / 30)
        b.frame(i, 33_333 * i, moving(i), i / 30)
        for s in b.last_sent_seqs:
            arrived[s] = i
    b.finish(19, 19 * 33_333, moving(19), 20 / 30)
    for s in b.last_sent_seqs:
        arrived[s] = 20
    assert len(plain.msgs) == 20 and len(bundled.msgs) == 10  # two frames a message
    assert all(m.redundant is not None and m.image_id == 0 for m in bundled.msgs)
    assert max(arrived[s] - s for s in range(20)) <= 1  # a frame waits one frame period at most
    got_a, got_b = decode_all(plain.msgs, cfg, 20), decode_all(bundled.msgs, cfg, 20)
    assert all(np.array_equal(got_a[s], got_b[s]) for s in range(20))
    st = b.summary()
    assert st["frames_sent"] == 20 and st["messages_sent"] == 10 and st["bundled_frames"] == 10


def test_a_waiting_frame_goes_alone_when_the_next_is_skipped_a_new_image_comes_or_the_stream_ends() -> None:
    wire = Wire()
    ps = PredictiveSender(wire, PredictiveConfig(max_gap=8), ts_base_us=0, bundle=True)
    ps.new_source(0)
    assert ps.frame(0, 0, BASE, 0.0) == 0  # the keyframe waits for a partner
    assert ps.frame(1, 33_333, BASE, 1 / 30) > 0 and ps.last_sent_seqs == [0]  # skipped: the keyframe goes alone
    ps.frame(2, 2 * 33_333, moving(2), 2 / 30)  # coded, waits
    ps.new_source(1)  # the waiting frame still belongs to image 0
    assert [(m.seq, m.image_id) for m in wire.msgs][-1] == (2, 0)  # (its redundant copy: the start's protection)
    ps.frame(3, 3 * 33_333, moving(3), 3 / 30)  # the new image's keyframe waits
    assert ps.finish(3, 3 * 33_333, moving(3), 4 / 30) > 0  # the end sends it
    assert [(m.seq, m.image_id, m.key) for m in wire.msgs][-1] == (3, 1, True)


def test_a_dropped_bundle_loses_both_frames_and_asks_for_a_keyframe() -> None:
    wire = Wire(refuse={3})
    ps = PredictiveSender(wire, PredictiveConfig(max_gap=8), ts_base_us=0, bundle=True)
    ps.new_source(0)
    for i in range(6):
        ps.frame(i, 33_333 * i, moving(i), i / 30)
    assert [m.seq for m in wire.msgs] == [1, 5]  # 0+1 together, 2+3 refused, 4 is a keyframe waiting for 5
    assert wire.msgs[-1].redundant is not None and wire.msgs[-1].redundant.key  # the keyframe rides along
    assert ps.summary()["kp_dropped"] == 1
