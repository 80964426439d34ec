"""Keypoints name their source image (``image_id``): the wire field, and the receiver's rule that a
frame is rendered only against the image it names (receiver.sources, receiver.session)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import cv2
import msgpack
import numpy as np
import pytest

from bench.fuzz import make_session, tiny_detector_id
from receiver.sources import SourceRouter
from sender.kpsend import PredictiveSender
from shared import kpvector
from shared import protocol as P
from shared import source_image as S
from shared.kpcodec import PredictiveConfig
from tests.harness import until

V = P.PROTOCOL_VERSION
Q8 = kpvector.encode_vector(np.zeros(60), P.Codec.Q8)


def _vec(marker: float) -> np.ndarray:
    """A keypoint vector whose first coordinate says which frame it is."""
    v = np.array([0.0, 0.0] * 10 + [1.0, 0.0, 0.0, 1.0] * 10, np.float32)
    v[0] = marker
    return v


# --------------------------------------------------------------------------- the wire field


@pytest.mark.parametrize("image_id", [None, 0, 1, 127, 2**40])
def test_keypoint_messages_round_trip_with_and_without_image_id(image_id: int | None) -> None:
    batch = P.KeypointBatch.build(7, 1000, [_vec(0.5)], P.Codec.Q8, image_id=image_id)
    coded = P.CodedKeypoints(9, -1, True, 33, Q8, image_id)
    for msg, arity in ((batch, 8), (coded, 7)):
        data = P.encode(msg)
        assert P.decode(data) == msg
        assert len(msgpack.unpackb(data)) == arity + (image_id is not None)  # absent: the old layout exactly


def test_messages_without_the_field_decode_as_untagged() -> None:
    old = msgpack.packb([V, 3, 0, 1, 0, 0, 1, Q8], use_bin_type=True)  # what an untagging sender sends
    assert P.decode(old).image_id is None
    old_coded = msgpack.packb([V, 7, 5, 0, True, 0, Q8], use_bin_type=True)
    assert P.decode(old_coded).image_id is None
    # one small int more: 1 byte on the wire while ids stay under 128
    tagged = P.encode(P.CodedKeypoints(5, -1, True, 0, Q8, 3))
    assert len(tagged) == len(old_coded) + 1


@pytest.mark.parametrize("bad", [None, -1, True, False, 1.0, "1", b"\x01", [1], 2**62 + 1])
def test_malformed_image_ids_are_rejected(bad: object) -> None:
    for head in ([V, 3, 0, 1, 0, 0, 1, Q8], [V, 7, 5, 0, True, 0, Q8]):
        with pytest.raises(P.ProtocolError) as e:
            P.decode(msgpack.packb([*head, bad], use_bin_type=True))
        assert e.value.reason == "field"


def test_only_one_optional_field_and_only_on_keypoints() -> None:
    # (a CodedKeypoints may carry image_id and then a redundant frame: one field more than that)
    for raw in ([V, 3, 0, 1, 0, 0, 1, Q8, 1, 2], [V, 7, 5, 0, True, 0, Q8, 1, [1, False, b""], 2],
                [V, 4, 5, 1], [V, 5, "why", 1], [V, 2, 0, 0, 1, 3, b"x" * 16, b"abc", 1]):
        with pytest.raises(P.ProtocolError) as e:
            P.decode(msgpack.packb(raw, use_bin_type=True))
        assert e.value.reason == "malformed"


def test_the_predictive_sender_restarts_at_a_keyframe_for_each_new_image() -> None:
    sent: list[P.CodedKeypoints] = []
    ps = PredictiveSender(lambda m: sent.append(m) or 20, PredictiveConfig(), ts_base_us=0)
    ps.new_source(0)
    for seq in range(6):
        ps.frame(seq, seq * 33_000, _vec(0.1 + 0.01 * seq), 0.0)
    ps.new_source(1)
    ps.frame(6, 6 * 33_000, _vec(0.5), 0.0)
    assert all(m.image_id == 0 for m in sent[:-1]) and sent[0].key
    assert sent[-1].image_id == 1 and sent[-1].key and sent[-1].seq == 6
    assert ps.stats["keyframe_requests"] == 0  # not the receiver's doing


# --------------------------------------------------------------------------- the router


def test_router_maps_seqs_to_images_and_drops_replaced_ones() -> None:
    r = SourceRouter()
    r.switch(0)
    assert r.admit(5, 0) and r.admit(12, 1) and r.admit(10, 1)  # reordered: image 1 starts at 10 at the latest
    assert [r.image_for(s) for s in (5, 9, 10, 30)] == [0, 0, 1, 1]
    r.add_ready(1, "image 1")
    r.switch(1)
    assert not r.admit(8, 0) and r.counts["old_image"] == 1 and r.is_old(8) is False  # seqs of 0 are forgotten
    assert r.admit(11, None)  # untagged: the held image
    with pytest.raises(P.ProtocolError):
        r.admit(9, 2)  # image 2 before image 1's seq 10: ids must grow with seq
    with pytest.raises(P.ProtocolError):
        for k in range(2, 2 + 5):
            r.admit(100 * k, k)  # naming images far ahead without sending them is bounded


# --------------------------------------------------------------------------- the session


@pytest.fixture
async def executor() -> AsyncIterator[ThreadPoolExecutor]:
    ex = ThreadPoolExecutor(max_workers=1)
    yield ex
    ex.shutdown(wait=True)


def _jpeg(level: int) -> bytes:
    return cv2.imencode(".jpg", np.full((64, 64, 3), level, np.uint8))[1].tobytes()


DARK, BRIGHT = 30, 220


def _spy(session) -> list[tuple[float, int]]:
    """(marker of the vector, brightness of the source it was rendered with) for each render."""
    shown: list[tuple[float, int]] = []
    job = session.renderer.job  # a render is made against the source in use when it is asked for

    def spy(vec: np.ndarray):  # returns a receiver.render.RenderJob
        shown.append((round(float(vec[0]), 3), int(session.renderer.source.mean())))
        return job(vec)

    session.renderer.job = spy
    return shown


async def _send_image(session, level: int, image_id: int) -> None:
    for c in S.split_source(_jpeg(level), image_id):
        session.on_message("control", P.encode(c))
    await session._source_task


def _kp(seq: int, image_id: int | None, marker: float) -> bytes:
    return P.encode(P.KeypointBatch.build(seq, 1_000_000 + seq * 33_333, [_vec(marker)], image_id=image_id))


async def test_immediate_playout_renders_each_frame_on_the_image_it_names(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor, playout="immediate")
    shown = _spy(s)
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))
    await _send_image(s, DARK, 0)
    s.start()
    s.on_message("kp", _kp(0, 0, 0.10))
    await until(lambda: len(shown) == 1, "1 frame shown", interval_s=0.01)
    # the sender re-framed: keypoints of image 1 overtake its source image
    s.on_message("kp", _kp(1, 1, 0.21))
    await asyncio.sleep(0.2)
    assert len(shown) == 1  # not drawn on the dark image while the bright one is on its way
    await _send_image(s, BRIGHT, 1)
    await until(lambda: len(shown) == 2, "2 frames shown", interval_s=0.01)
    s.on_message("kp", _kp(2, 1, 0.22))
    await until(lambda: len(shown) == 3, "3 frames shown", interval_s=0.01)
    s.on_message("kp", _kp(3, 0, 0.13))  # a late frame of the replaced image (made-up seq order aside)
    s.on_message("kp", _kp(4, None, 0.24))  # untagged: the image in use
    await until(lambda: len(shown) == 4, "4 frames shown", interval_s=0.01)
    assert shown == [(0.10, DARK), (0.21, BRIGHT), (0.22, BRIGHT), (0.24, BRIGHT)]
    assert s.stats.frames_old_image == 1 and s.rejects.total == 0
    assert s.summary()["frames_old_image"] == 1 and s.summary()["source_switches"] == 1
    await s.close("done")


async def _clock_call(executor: ThreadPoolExecutor):
    """A clock-playout session showing the dark image 0, and the spy on what it renders."""
    s = make_session(executor, playout="clock")
    shown = _spy(s)
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))
    await _send_image(s, DARK, 0)
    s.start()
    return s, shown


async def test_clock_playout_never_mixes_images(executor: ThreadPoolExecutor) -> None:
    """Frames stream at 30 fps; at seq 20 the sender switches to image 1, whose JPEG arrives only after
    its first 10 frames. Every frame is shown on its own image, the old image's frames still buffered
    when the new one completes are shown on the old one, and a late old frame is dropped."""
    s, shown = await _clock_call(executor)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for seq in range(50):
        await asyncio.sleep(max(0.0, t0 + seq / 30 - loop.time()))
        image = 0 if seq < 20 else 1
        s.on_message("kp", _kp(seq, image, 0.01 * seq))
        if seq == 30:
            await _send_image(s, BRIGHT, 1)
    # once image 1 is in use (when is up to the playout clock, i.e. to the machine's speed):
    await until(lambda: s.stats.source_switches == 1, "the switch to image 1", interval_s=0.01)
    s.on_message("kp", _kp(19, 0, 0.19))  # duplicate seq: rejected by the sequence filter anyway
    s.on_message("kp", _kp(200, 0, 0.5))  # an old image's frame after the switch: dropped, not shown
    # until the playout clock has passed the last frame (it may have been concealed on a busy machine)
    await until(lambda: s.playout.cursor is not None and s.playout.cursor >= 49, "the playout past seq 49",
                interval_s=0.01)
    await s.close("done")
    for marker, level in shown:
        seq = round(marker * 100)
        assert (level < 100) == (seq < 20), (marker, level)  # concealed frames too: by the seq they stand for
    assert any(level > 100 for _, level in shown) and any(level < 100 for _, level in shown)
    # (whether frames of image 1 had to wait for it depends on the machine's speed; the immediate-playout
    # test checks the waiting itself)
    assert s.stats.frames_old_image == 1 and s.stats.source_switches == 1


async def test_a_refresh_that_arrives_before_its_keypoints_costs_no_frame(executor: ThreadPoolExecutor) -> None:
    """The usual case: the image goes out on the reliable channel ahead of its keypoints. Frames of the
    old image still buffered are shown on it, the new one takes over at its first frame, none waits."""
    s, shown = await _clock_call(executor)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    seq = 0
    # 30 frames, and more of image 1 while it is not in use yet (a busy machine may conceal the first ones)
    while seq < 30 or (s.stats.source_switches == 0 and seq < 300):
        await asyncio.sleep(max(0.0, t0 + seq / 30 - loop.time()))
        if seq == 15:
            await _send_image(s, BRIGHT, 1)  # decoded and encoded here, in use only from seq 15 on
        s.on_message("kp", _kp(seq, 0 if seq < 15 else 1, 0.01 * seq))
        seq += 1
    await until(lambda: s.playout.cursor is not None and s.playout.cursor >= seq - 1, "the playout past the last frame",
                interval_s=0.01)
    await s.close("done")
    assert all((level < 100) == (round(m * 100) < 15) for m, level in shown)  # markers of seq >= 100 are >= 1
    assert s.stats.source_switches == 1 and s.stats.frames_source_wait == 0 and s.stats.frames_old_image == 0


async def test_an_image_completed_while_another_decodes_is_not_lost(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor, playout="immediate")
    shown = _spy(s)
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))
    await _send_image(s, DARK, 0)
    s.start()
    for image_id, level in ((1, 120), (2, BRIGHT)):  # a refresh, then at once a re-frame
        for c in S.split_source(_jpeg(level), image_id):
            s.on_message("control", P.encode(c))
    s.on_message("kp", _kp(0, 2, 0.3))
    await until(lambda: len(shown) == 1, "1 frame shown", interval_s=0.01)
    assert shown == [(0.3, BRIGHT)] and s.rejects.total == 0 and s.stats.source_images == 3
    await s.close("done")


async def test_frames_naming_images_that_never_come_do_not_lock_out_the_one_that_does(
        executor: ThreadPoolExecutor) -> None:
    """An outside probe's finding: frames naming images 1-3, never sent, filled the receiver's table of
    named images, and the image that did come (4) was refused. Once it is in, the names that never came
    are given up (receiver.sources): their waiting frames are dropped and image 4's are shown on it."""
    s = make_session(executor, playout="immediate")
    shown = _spy(s)
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))
    await _send_image(s, DARK, 0)
    s.start()
    s.on_message("kp", _kp(0, 0, 0.10))
    await until(lambda: len(shown) == 1, "1 frame shown", interval_s=0.01)
    for seq, image_id in ((1, 1), (2, 2), (3, 3)):  # images that never come: these frames wait for them
        s.on_message("kp", _kp(seq, image_id, 0.1 + 0.01 * seq))
    s.on_message("kp", _kp(4, 4, 0.14))  # image 4's first frame, before image 4: the table is full
    assert s.rejects.counts.get("field") == 1
    await _send_image(s, BRIGHT, 4)
    s.on_message("kp", _kp(5, 4, 0.25))
    await until(lambda: len(shown) == 2, "image 4's frame shown", interval_s=0.01)
    assert shown == [(0.10, DARK), (0.25, BRIGHT)]  # none of the orphans drawn on either picture
    assert s.sources.counts["given_up"] == 3 and s.stats.frames_old_image == 3
    assert s.summary()["source_switches"] == 1
    await s.close("done")
