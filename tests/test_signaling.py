"""Signaling helpers: token check and session-description validation."""

from __future__ import annotations

import pytest

from shared.signaling import SignalingError, check_token, parse_description, send_offer


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
