"""Per-call limits of a real CallSession, fed by hand: protocol version, message rate, source image."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import cv2
import msgpack
import numpy as np
import pytest

from bench.fuzz import make_session, tiny_detector_id
from shared import protocol as P


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
    for c in P.split_source(blob, image_id):
        session.on_message("control", P.encode(c))
    if session._source_task is not None:
        await session._source_task


async def test_wrong_protocol_version_is_a_counted_rejection(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor)
    hello = msgpack.unpackb(P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))
    for version in (0, 2, 255):
        s.on_message("control", msgpack.packb([version, *hello[1:]]))
    s.on_message("control", msgpack.packb([2, int(P.MsgType.HEARTBEAT), 5]))
    assert s.rejects.counts == {"version": 4}
    assert s.hello is None and s.stats.messages_received == 4
    assert s.summary()["rejected_by_reason"] == {"version": 4}
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))  # the right version still works
    assert s.hello is not None and s.rejects.total == 4
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
