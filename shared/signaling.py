"""Offer/answer signaling over HTTP: the sender POSTs its SDP offer, the receiver answers.

``POST /offer`` with JSON ``{"sdp": ..., "type": "offer"}`` and, when the receiver has a
token, the header ``Authorization: Bearer <token>``; the reply is the SDP answer as JSON.
"""

from __future__ import annotations

import hmac
import logging

import aiohttp
from aiortc import RTCSessionDescription

log = logging.getLogger(__name__)

MAX_SDP_BYTES = 64 * 1024
OFFER_PATH = "/offer"


class SignalingError(RuntimeError):
    """The receiver refused or could not be reached."""


def check_token(header: str | None, token: str | None) -> bool:
    """Constant-time check of an ``Authorization: Bearer`` header against the token."""
    if not token:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].encode(), token.encode())


def parse_description(obj: object, expected_type: str) -> RTCSessionDescription:
    """Validate a JSON session description; raises ValueError with a clear message."""
    if not isinstance(obj, dict):
        raise ValueError("session description must be a JSON object")
    sdp, typ = obj.get("sdp"), obj.get("type")
    if typ != expected_type:
        raise ValueError(f"expected type '{expected_type}', got {typ!r:.20}")
    if not isinstance(sdp, str) or not sdp.startswith("v=0") or len(sdp) > MAX_SDP_BYTES:
        raise ValueError("sdp must be an SDP string starting with v=0 and under 64 KiB")
    return RTCSessionDescription(sdp=sdp, type=typ)


def offer_problem(sdp: str) -> str | None:
    """Why an offer cannot become a kpcast call, or None.

    aiortc accepts offers that can never connect (no candidates, no DTLS fingerprint, no data
    channel) and offers with audio/video it would then decode for nothing; each would hold a
    call slot until a timeout. There is no trickle ICE here, so the candidates must be in the offer.
    """
    lines = sdp.splitlines()
    media = [ln.split(" ", 1)[0][2:] for ln in lines if ln.startswith("m=")]
    if "application" not in media:
        return "no data channel (m=application) in the offer"
    if any(m != "application" for m in media):
        return "this receiver takes data channels only, not audio or video"
    if not any(ln.startswith("a=candidate:") for ln in lines):
        return "no ICE candidates in the offer (gather them before sending it: no trickle ICE)"
    if not any(ln.startswith("a=fingerprint:") for ln in lines):
        return "no DTLS fingerprint in the offer"
    return None


async def send_offer(url: str, offer: RTCSessionDescription, token: str | None = None,
                     timeout_s: float = 10.0) -> RTCSessionDescription:
    """POST the offer to the receiver at ``url`` (base URL or full /offer URL)."""
    if not url.rstrip("/").endswith(OFFER_PATH):
        url = url.rstrip("/") + OFFER_PATH
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
            async with http.post(url, json={"sdp": offer.sdp, "type": offer.type}, headers=headers) as resp:
                if resp.status == 401:
                    raise SignalingError("receiver refused the call: wrong or missing token (--token)")
                if resp.status != 200:
                    text = (await resp.text())[:200]
                    raise SignalingError(f"receiver answered HTTP {resp.status}: {text}")
                return parse_description(await resp.json(), "answer")
    except aiohttp.ClientError as e:
        raise SignalingError(f"cannot reach receiver at {url}: {e}") from e
    except TimeoutError as e:
        raise SignalingError(f"receiver at {url} did not answer within {timeout_s:.0f}s") from e
    except ValueError as e:
        raise SignalingError(f"receiver sent a bad answer: {e}") from e
