"""Signaling helpers: token check, session-description validation, offering again to a busy receiver."""

from __future__ import annotations

import json
import logging
import time

import pytest

from shared.signaling import (
    ReceiverBusy,
    SignalingError,
    check_token,
    load_description,
    offer_until_answered,
    parse_description,
    send_offer,
)


def test_token_check() -> None:
    assert check_token(None, None) and check_token("anything", "")
    assert check_token("Bearer s3cret", "s3cret")
    assert not check_token("Bearer wrong", "s3cret")
    assert not check_token("s3cret", "s3cret")
    assert not check_token(None, "s3cret")


@pytest.mark.parametrize("obj,match", [
    ([], "JSON object"),
    ({"sdp": "v=0\r\n", "type": "answer"}, "expected type"),
    ({"sdp": "hello", "type": "offer"}, "v=0"),
    ({"sdp": "v=0" + "x" * 70_000, "type": "offer"}, "64 KiB"),
])
def test_bad_descriptions(obj: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_description(obj, "offer")


async def test_unreachable_receiver_is_a_clear_error(free_port: int) -> None:
    from aiortc import RTCSessionDescription
    with pytest.raises(SignalingError, match="cannot reach"):
        await send_offer(f"http://127.0.0.1:{free_port}", RTCSessionDescription("v=0\r\n", "offer"), timeout_s=2)


ANSWER = {"sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n", "type": "answer"}


async def _fake_receiver(port: int, replies: list[tuple[int, object]]):
    """A /offer that answers ``replies`` in turn (the last one from then on); returns its runner and the
    monotonic times of the offers it got."""
    from aiohttp import web

    times: list[float] = []

    async def offer(request: web.Request) -> web.Response:
        times.append(time.monotonic())
        status, body = replies[min(len(times), len(replies)) - 1]
        if isinstance(body, bytes):
            return web.Response(body=body, status=status, content_type="application/json")
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/offer", offer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, times


def _offer():
    from aiortc import RTCSessionDescription
    return RTCSessionDescription("v=0\r\n", "offer")


async def test_a_busy_receiver_is_offered_again_when_it_says_a_slot_gives_way(
        free_port: int, caplog: pytest.LogCaptureFixture) -> None:
    busy = (503, {"error": "receiver busy", "retry_after_s": 0.3})
    runner, times = await _fake_receiver(free_port, [busy, busy, (200, ANSWER)])
    try:
        with caplog.at_level(logging.WARNING, "shared.signaling"):
            answer = await offer_until_answered(f"http://127.0.0.1:{free_port}", _offer(), within_s=10)
    finally:
        await runner.cleanup()
    assert answer.type == "answer" and len(times) == 3
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(0.3 <= g < 1.5 for g in gaps), gaps  # when it said, not a blind backoff
    assert "receiver busy (HTTP 503, offer 1): offering again in 0.31 s" in caplog.text


async def test_without_a_hint_the_offers_back_off_and_give_up_at_the_deadline(free_port: int) -> None:
    runner, times = await _fake_receiver(free_port, [(503, {"error": "receiver busy"})])
    t0 = time.monotonic()
    try:
        with pytest.raises(ReceiverBusy, match="no call slot came free within 2 s"):
            await offer_until_answered(f"http://127.0.0.1:{free_port}", _offer(), within_s=2.0)
    finally:
        await runner.cleanup()
    # offered at 0, 0.5 and 1.5 s; the next (2 s later) would be past the deadline: given up then, not later
    assert len(times) == 3 and time.monotonic() - t0 < 2.0
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] == pytest.approx(0.5, abs=0.3) and gaps[1] == pytest.approx(1.0, abs=0.3), gaps


async def test_other_refusals_are_not_offered_again(free_port: int) -> None:
    runner, times = await _fake_receiver(free_port, [(400, {"error": "bad offer"})])
    try:
        with pytest.raises(SignalingError, match="HTTP 400") as e:
            await offer_until_answered(f"http://127.0.0.1:{free_port}", _offer(), within_s=10)
    finally:
        await runner.cleanup()
    assert not isinstance(e.value, ReceiverBusy) and len(times) == 1


async def test_an_answer_nested_too_deep_is_a_bad_answer_not_a_crash(free_port: int) -> None:
    deep = b"[" * 20_000 + b"]" * 20_000
    runner, _ = await _fake_receiver(free_port, [(200, deep)])
    try:
        with pytest.raises(SignalingError, match="bad answer: JSON nested too deeply"):
            await send_offer(f"http://127.0.0.1:{free_port}", _offer())
    finally:
        await runner.cleanup()


def test_load_description_refuses_deep_json_with_a_value_error() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        load_description(b'{"sdp": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "offer")
    assert load_description(json.dumps({"sdp": "v=0\r\n", "type": "offer"}), "offer").sdp == "v=0\r\n"
