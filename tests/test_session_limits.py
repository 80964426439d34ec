"""Per-call limits of a real CallSession, fed by hand: protocol version, message rate, source image."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import cv2
import msgpack
import numpy as np
import pytest

from bench.fuzz import make_session, tiny_detector_id
from shared import protocol as P
from shared import source_image as S


@pytest.fixture
async def executor() -> AsyncIterator[ThreadPoolExecutor]:
    ex = ThreadPoolExecutor(max_workers=1)
    yield ex
    ex.shutdown(wait=True)


def _jpeg(h: int, w: int) -> bytes:
    img = np.full((h, w, 3), 120, np.uint8)
    img[: h // 2] = 30
    return cv2.imencode(".jpg", img)[1].tobytes()


async def _send_source(session, blob: bytes, image_id: int = 0) -> None:
    for c in S.split_source(blob, image_id):
        session.on_message("control", P.encode(c))
    if session._source_task is not None:
        await session._source_task


async def test_wrong_protocol_version_is_a_counted_rejection(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor)
    hello = msgpack.unpackb(P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))
    for version in (0, P.PROTOCOL_VERSION + 1, 255):
        s.on_message("control", msgpack.packb([version, *hello[1:]]))
    s.on_message("control", msgpack.packb([P.PROTOCOL_VERSION + 1, int(P.MsgType.HEARTBEAT), 5]))
    assert s.rejects.counts == {"version": 4}
    assert s.hello is None and s.stats.messages_received == 4
    assert s.summary()["rejected_by_reason"] == {"version": 4}
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))  # the right version still works
    assert s.hello is not None and s.rejects.total == 4
    await s.close("done")


class FakeChannel:
    """A data channel that records what the session sends on it."""

    def __init__(self, label: str) -> None:
        self.label, self.readyState, self.sent, self.handlers = label, "open", [], {}

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def on(self, event: str, handler) -> None:
        self.handlers[event] = handler


async def test_a_version_1_sender_is_told_in_its_own_version_and_hung_up(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor)
    control = FakeChannel("control")
    s.attach(control)
    # exactly the Hello a version-1 sender sends
    s.on_message("control", msgpack.packb([1, 1, tiny_detector_id(), 64, 30.0, 1, 1, 10]))
    assert s.rejects.counts == {"version": 1} and s.hello is None
    await asyncio.wait_for(s.closed.wait(), 5)
    assert s.stats.end_reason == "unsupported protocol version"
    (bye,) = control.sent
    version, mtype, reason = msgpack.unpackb(bye)  # what a version-1 peer decodes as its Bye
    assert (version, mtype) == (1, int(P.MsgType.BYE)) and "unsupported protocol version 1" in reason


async def test_after_a_hello_an_old_version_message_is_only_a_rejection(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor)
    control = FakeChannel("control")
    s.attach(control)
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))
    s.on_message("control", msgpack.packb([1, 4, 5]))
    assert s.rejects.counts == {"version": 1} and not s.closed.is_set() and control.sent == []
    await s.close("done")


def _pred_hello(**kw) -> P.Hello:
    from shared.kpcodec import PredictiveConfig

    cfg = PredictiveConfig(**kw)
    return P.Hello(tiny_detector_id(), 64, 30.0, int(P.Codec.PRED), ts_base_us=10**12, pred=cfg.params())


def _coded_stream(n: int, **kw) -> list[P.CodedKeypoints]:
    """A real predictive stream of a face that moves now and then (many skips)."""
    from shared.kpcodec import PredictiveConfig, PredictiveEncoder

    enc = PredictiveEncoder(PredictiveConfig(**kw))
    base = np.concatenate([np.linspace(-0.5, 0.5, 20), np.tile([1.0, 0, 0, 1.0], 10)]).astype(np.float32)
    out = []
    for i in range(n):
        v = base.copy()
        v[:20] += 0.02 * (i // 5)  # a step every 5th frame: sent; the 4 after it: skipped
        f = enc.encode(i, v, force=i == n - 1)
        if f is not None:
            out.append(P.CodedKeypoints(f.seq, f.prev_seq, f.key, 33_333 * i, f.payload))
    return out


async def test_predictive_call_decodes_skipped_frames_and_asks_for_keyframes(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor)  # immediate playout
    control, kp = FakeChannel("control"), FakeChannel("kp")
    s.attach(control)
    s.attach(kp)
    s.on_message("control", P.encode(_pred_hello(max_gap=8)))
    msgs = _coded_stream(60, max_gap=8)
    assert len(msgs) == 13  # one in five frames is sent, and the last one
    for m in msgs[:5]:
        s.on_message("kp", P.encode(m))
    assert s.stats.frames_received == msgs[4].seq + 1 and s.stats.frames_skipped == msgs[4].seq + 1 - 5
    assert [q.seq for q in s.immediate.queued()] == list(range(msgs[4].seq + 1))  # every frame, in order
    assert [q.skipped for q in s.immediate.queued()].count(True) == s.stats.frames_skipped
    # message 5 is lost: the following ones cannot be decoded, and the receiver asks for a keyframe, once
    for m in msgs[6:10]:
        s.on_message("kp", P.encode(m))
    assert s.stats.frames_received == msgs[4].seq + 1
    requests = [P.decode(d) for d in control.sent]
    assert requests == [P.KeyframeRequest(msgs[4].seq)] and s.stats.keyframe_requests == 1
    # and a copy on the unreliable keypoint channel, which no lost control chunk holds up
    assert [P.decode(d) for d in kp.sent] == requests
    # the sender answers with a keyframe: decoding resumes (the frames in the gap stay lost)
    from shared.kpcodec import PredictiveConfig, PredictiveEncoder

    key = PredictiveEncoder(PredictiveConfig(max_gap=8)).encode(msgs[10].seq, np.zeros(60, np.float32))
    s.on_message("kp", P.encode(P.CodedKeypoints(key.seq, msgs[9].seq, True, 33_333 * key.seq, key.payload)))
    assert s.stats.frames_received == msgs[4].seq + 2 and s.stats.keyframes_received == 2
    assert s.kp_stream.decoder.needs_keyframe is False
    # nothing of it was a rejection; a residual that no longer fits its history is one, and a wrong codec too
    assert s.rejects.total == 0
    s.on_message("kp", P.encode(msgs[4]))  # stale
    s.on_message("kp", P.encode(P.KeypointBatch.build(500, 0, [np.zeros(60, np.float32)])))
    s.on_message("control", P.encode(msgs[11]))
    assert s.rejects.counts == {"stale": 1, "codec": 1, "channel": 1}
    await s.close("done")


async def test_a_predictive_hello_with_unusable_parameters_is_refused(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor)
    bad = msgpack.unpackb(P.encode(_pred_hello()))
    bad[9][2] = 0.2  # coord_step beyond what the decoder accepts
    s.on_message("control", msgpack.packb(bad))
    s.on_message("kp", P.encode(_coded_stream(1)[0]))
    assert s.rejects.counts == {"field": 1, "order": 1} and s.hello is None
    await s.close("done")


async def test_message_rate_limit_drops_the_excess(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor, max_messages_per_s=50)
    for i in range(120):
        s.on_message("control", P.encode(P.Heartbeat(i)))
    assert s.rejects.counts == {"rate_limited": 70}
    await s.close("done")


async def test_oversized_and_text_messages_are_rejected(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor)
    s.on_message("kp", b"\x00" * (P.MAX_MESSAGE_BYTES + 1))
    s.on_message("control", "a text frame")
    assert s.rejects.counts == {"oversized": 1, "malformed": 1}
    await s.close("done")


async def test_source_image_limits(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor)
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))
    # announced larger than 2 MiB: refused at the first chunk, nothing buffered
    digest = b"\x00" * P.DIGEST_BYTES
    s.on_message("control", P.encode(P.SourceChunk(0, 0, 200, P.MAX_SOURCE_BYTES + 1, digest, b"x" * 100)))
    assert s.rejects.counts == {"field": 1}
    # within the byte limit but more than 4096x4096 pixels once decoded
    big = _jpeg(4100, 4100)
    assert len(big) < P.MAX_SOURCE_BYTES
    await _send_source(s, big, image_id=1)
    # bytes that pass the checksum but are not an image
    await _send_source(s, b"\xff\xd8 not really a jpeg" * 10, image_id=2)
    assert s.rejects.counts == {"field": 1, "source_image": 2}
    assert not s.renderer.ready and s.stats.source_images == 0
    # a sane image is accepted and its hash recorded
    ok = _jpeg(48, 80)
    await _send_source(s, ok, image_id=3)
    assert s.renderer.ready and s.stats.source_sha256 == hashlib.sha256(ok).hexdigest()
    assert s.rejects.total == 3
    await s.close("done")


async def test_hello_from_another_keypoint_detector_ends_the_call(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor)
    s.on_message("control", P.encode(P.Hello("kp-0123456789ab", 64, 30.0)))
    assert s.rejects.counts == {"field": 1}
    await asyncio.wait_for(s.closed.wait(), 5)
    assert s.stats.end_reason == "detector mismatch"


async def test_a_sender_of_another_size_is_rendered_at_the_receivers_size(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor)  # a 64x64 renderer
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 256, 30.0)))
    assert s.hello is not None and s.rejects.total == 0
    await _send_source(s, _jpeg(256, 256))
    assert s.renderer.ready and s.renderer.source.shape == (64, 64, 3)
    # the 256x256 source (dark top half) is shrunk, not cropped: the top half of the 64x64 is still dark
    assert s.renderer.source[:28].mean() < 40 and s.renderer.source[36:].mean() > 100
    await s.close("done")


def _claiming(w: int, h: int, keep: int | None = None) -> bytes:
    """A real JPEG whose frame header claims ``w`` x ``h`` (truncated to ``keep`` bytes)."""
    jpeg = _jpeg(16, 16)
    sof = jpeg.index(b"\xff\xc0")
    out = jpeg[:sof + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + jpeg[sof + 9:]
    return out[:keep] if keep else out


async def test_source_image_bombs_never_reach_the_decoder_and_decoding_is_off_the_loop(
        executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[tuple[int, bool]] = []  # (pixels the header claims, decoded on the event loop's thread)
    real = cv2.imdecode
    loop_thread = threading.get_ident()

    def spy(buf, flags):
        w, h = S.source_image_size(bytes(buf), max_pixels=2**40)
        decoded.append((w * h, threading.get_ident() == loop_thread))
        return real(buf, flags) if w * h <= S.MAX_SOURCE_PIXELS else None  # never allocate a bomb here

    monkeypatch.setattr(cv2, "imdecode", spy)
    s = make_session(executor)
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))
    bombs = [_claiming(32767, 32767, keep=629), _claiming(12000, 12000), _jpeg(4096, 4096)]
    for i, blob in enumerate(bombs):
        await _send_source(s, blob, image_id=i)
    assert decoded == [] and s.rejects.counts == {"source_image": 3} and not s.renderer.ready
    await _send_source(s, _jpeg(48, 80), image_id=len(bombs))
    assert s.renderer.ready and decoded == [(48 * 80, False)]  # decoded, in a worker thread
    await s.close("done")


@pytest.mark.parametrize("playout", ["immediate", "clock"])
async def test_a_second_hello_restarts_the_sequence_numbers(executor: ThreadPoolExecutor, playout: str) -> None:
    s = make_session(executor, playout=playout)
    vec = np.array([0.1, -0.1] * 10 + [1.0, 0.0, 0.0, 1.0] * 10, np.float32)

    def stream() -> None:
        for seq in range(10):
            s.on_message("kp", P.encode(P.KeypointBatch.build(seq, 1_000_000 + seq * 33_333, [vec])))

    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))
    stream()
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))  # the sender restarted
    stream()  # seq 0.. again: neither duplicates nor stale
    assert s.rejects.total == 0 and s.stats.frames_received == 20
    await s.close("done")


async def test_only_valid_messages_are_signs_of_life(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor, hello_timeout_s=5.0, heartbeat_timeout_s=1.5, setup_timeout_s=15.0)
    t0 = s.liveness.created
    assert s._expired(t0 + 14.0) is None and s._expired(t0 + 16.0) == "peer timeout"  # silent peer
    s.on_message("control", b"\x00junk")  # its first message: the Hello is due within hello_timeout_s
    first = s.liveness.first_message
    for _ in range(50):
        s.on_message("control", b"\x00junk")
    assert s._expired(first + 4.0) is None and s._expired(first + 6.0) == "no hello"
    assert s.liveness.last_seen == t0  # junk does not refresh liveness
    stale = t0 - 100.0  # pretend the last valid message is long ago, so any refresh shows
    s.liveness.last_seen = stale
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))
    hello_at = s.liveness.last_seen
    assert hello_at >= t0 and s._expired(hello_at + 1.0) is None
    s.liveness.last_seen = stale
    s.on_message("kp", b"\x00more junk")  # after the Hello too
    # before the source image is in, the (possibly retransmitting) setup gets the setup timeout ...
    assert s.liveness.last_seen == stale
    assert s._expired(stale + 2.0) is None and s._expired(stale + 16.0) == "peer timeout"
    s.renderer.set_source(np.zeros((64, 64, 3), np.uint8))
    assert s._expired(stale + 2.0) == "peer timeout"  # ... and after it, the heartbeat timeout
    s.on_message("control", P.encode(P.Heartbeat(1)))
    assert s.liveness.last_seen >= t0
    await s.close("done")


async def test_a_junk_peer_is_hung_up_on(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor, hello_timeout_s=0.3)
    s.start()
    for _ in range(400):  # junk every 25 ms used to keep the call open forever
        s.on_message("control", b"\x00junk")
        if s.closed.is_set():
            break
        await asyncio.sleep(0.025)
    assert s.closed.is_set() and s.stats.end_reason == "no hello"


async def test_keypoints_before_the_source_image_are_bounded(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor)  # immediate playout, and no source image ever comes
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))
    vec = np.array([0.0, 0.0] * 10 + [1.0, 0.0, 0.0, 1.0] * 10, np.float32)
    for i in range(100):
        s.on_message("kp", P.encode(P.KeypointBatch.build(i * 64, 0, [vec] * 64)))
    assert s.stats.frames_received == 6400 and s.immediate.pending() <= 64
    await s.close("done")
