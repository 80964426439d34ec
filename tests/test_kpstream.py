"""The receiver's predictive stream (receiver.kpstream): capture times, keyframe requests, errors."""

from __future__ import annotations

import numpy as np
import pytest

from receiver.kpstream import PredictiveStream
from shared import protocol as P
from shared.kpcodec import PredictiveConfig, PredictiveEncoder

BASE = np.concatenate([np.linspace(-0.5, 0.5, 20), np.tile([1.0, 0, 0, 1.0], 10)]).astype(np.float32)
FRAME_US = 33_333


def coded(n: int, cfg: PredictiveConfig, step_every: int = 5) -> list[P.CodedKeypoints]:
    enc = PredictiveEncoder(cfg)
    out = []
    for i in range(n):
        f = enc.encode(i, BASE + 0.02 * (i // step_every))
        if f is not None:
            out.append(P.CodedKeypoints(f.seq, f.prev_seq, f.key, FRAME_US * i + 1000, f.payload))
    return out


def test_skipped_frames_get_capture_times_whole_frames_before_the_coded_one() -> None:
    cfg = PredictiveConfig(max_gap=8)
    st = PredictiveStream(cfg, fps=1e6 / FRAME_US, ts_base_us=7_000_000)
    frames = [f for m in coded(11, cfg) for f in st.push(m)]
    assert [f.seq for f in frames] == list(range(11))
    assert [f.skipped for f in frames] == [i % 5 != 0 for i in range(11)]
    for f in frames:  # coded frames carry their own time; skipped ones are counted back from the next
        assert f.capture_us == pytest.approx(7_000_000 + FRAME_US * f.seq + 1000, abs=2)
    assert st.counts == {"coded": 3, "keyframes": 1, "residuals": 2, "skipped": 8, "keyframe_requests": 0,
                         "recovered": 0}


def test_a_broken_chain_asks_for_a_keyframe_at_most_every_interval() -> None:
    cfg = PredictiveConfig(max_gap=8)
    st = PredictiveStream(cfg, fps=30, request_interval_s=0.25)
    msgs = coded(60, cfg)
    st.push(msgs[0])
    assert st.keyframe_request(0.0) is None
    requests = []
    for i, m in enumerate(msgs[2:], start=1):  # msgs[1] lost
        assert st.push(m) == []
        requests.append(st.keyframe_request(i * 0.1))
    sent = [r for r in requests if r is not None]
    assert sent[0] == P.KeyframeRequest(0) and 3 <= len(sent) <= 1 + len(requests) * 0.1 / 0.25 + 1
    assert st.predict_at(1) is not None and st.predict_at(20) is None  # beyond max_gap: not a skip


def test_bad_frames_are_protocol_errors() -> None:
    cfg = PredictiveConfig(max_gap=4)
    st = PredictiveStream(cfg, fps=30)
    msgs = coded(12, cfg)
    st.push(msgs[0])
    with pytest.raises(P.ProtocolError) as e:
        st.push(msgs[0])
    assert e.value.reason == "stale"
    # a residual claiming more skipped frames than the Hello's max_gap allows
    with pytest.raises(P.ProtocolError) as e:
        st.push(P.CodedKeypoints(50, 0, False, 0, msgs[1].payload))
    assert e.value.reason == "residual"
    # a residual that would decode outside the quantiser's range
    big = P.CodedKeypoints(1, 0, False, 0, _residual_of(np.full(60, 3000, np.int32)))  # 1/512 grid: +-512
    with pytest.raises(P.ProtocolError) as e:
        st.push(big)
    assert e.value.reason == "residual"
    with pytest.raises(P.ProtocolError):
        PredictiveStream.from_hello(P.Hello("m", 64, 30.0))


def _residual_of(r: np.ndarray) -> bytes:
    from shared.kpcodec import encode_residual

    return encode_residual(r)


def test_after_a_reported_loss_a_lost_message_is_repaired_by_the_next_one() -> None:
    from sender.kpsend import START_PROTECT_MESSAGES, PredictiveSender

    cfg = PredictiveConfig(max_gap=8, keyframe_interval=1000)  # (a periodic keyframe carries no predecessor)
    sent: list[bytes] = []

    def send(msg: P.CodedKeypoints) -> int:
        sent.append(P.encode(msg))
        return len(sent[-1])

    ps = PredictiveSender(send, cfg, ts_base_us=0)
    ps.new_source(0)
    n = 240
    vecs = [BASE + 0.02 * ((i // 3) % 12) for i in range(n)]  # steps, within the coordinate range
    i = 0
    while len(sent) < START_PROTECT_MESSAGES + 10:
        ps.frame(i, FRAME_US * i, vecs[i], i / 30)
        i += 1
    start = [P.decode(m) for m in sent]
    # the call's first messages are protected (the path is unknown yet), and only those
    assert all((m.redundant is not None) == (k < START_PROTECT_MESSAGES and not m.key) for k, m in enumerate(start))
    plain = len(sent)
    ps.request_keyframe()  # the receiver reported a loss
    for j in range(i, n):
        ps.frame(j, FRAME_US * j, vecs[j], j / 30)
    ps.finish(n - 1, FRAME_US * (n - 1), vecs[n - 1], 8.0)
    protected = [P.decode(m) for m in sent[plain:]]
    assert protected[0].key and protected[0].redundant is None  # the keyframe needs no predecessor
    assert all(m.redundant is not None for m in protected[1:] if not m.key)
    assert ps.stats["redundant_frames"] == sum(not m.key for m in protected) + sum(m.redundant is not None
                                                                                   for m in start)
    # a receiver that loses every third protected message still decodes every frame, asking for nothing
    st = PredictiveStream(cfg, fps=30)
    got = {}
    for k, data in enumerate(sent):
        if k > plain and k % 3 == 0 and k < len(sent) - 1:  # (the last one has no successor to repair it)
            continue
        for f in st.push(P.decode(data)):
            got[f.seq] = f.vector
        assert st.keyframe_request(k * 0.1) is None
    assert sorted(got) == list(range(n))
    assert st.counts["recovered"] == sum(1 for k in range(plain + 1, len(sent) - 1) if k % 3 == 0)
    for i in range(n):  # what the sender's own decoder holds, frame by frame
        assert np.abs(got[i][:20] - vecs[i][:20]).max() <= cfg.tolerance + cfg.coord_step
