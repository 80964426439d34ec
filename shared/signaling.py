"""Offer/answer signaling over HTTP: the sender POSTs its SDP offer, the receiver answers.

``POST /offer`` with JSON ``{"sdp": ..., "type": "offer"}`` and, when the receiver has a
token, the header ``Authorization: Bearer <token>``; the reply is the SDP answer as JSON, or
HTTP 503 ``{"error": "receiver busy", "retry_after_s": S}`` when every call slot is taken (``S``:
when the soonest one gives way to a new offer, absent when none will), which
:func:`offer_until_answered` offers again after.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

import aiohttp
from aiortc import RTCSessionDescription

log = logging.getLogger(__name__)

MAX_SDP_BYTES = 64 * 1024
OFFER_PATH = "/offer"


class SignalingError(RuntimeError):
    """The receiver refused or could not be reached."""


class ReceiverBusy(SignalingError):
    """HTTP 503: every call slot is taken. ``retry_after_s``: when the receiver says the soonest slot
    gives way to a new offer (None: it did not say, e.g. every call there is a caller)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# Offering again to a busy receiver: these waits in turn, then the last one's, within the caller's time.
BUSY_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)
BUSY_MIN_WAIT_S = 0.1  # a receiver's "a slot gives way now" is still not offered again at once
BUSY_MARGIN_S = 0.01  # after the moment the receiver named, so the slot has given way on arrival


def check_token(header: str | None, token: str | None) -> bool:
    """Constant-time check of an ``Authorization: Bearer`` header against the token."""
    if not token:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].encode(), token.encode())


def load_json(body: bytes | str) -> object:
    """``json.loads`` whose every failure is a ValueError, so a caller's ``except ValueError`` is a 400.

    The decoder recurses once per nesting level: a 40 KB body of 20,000 ``[`` raises RecursionError,
    which was a 500 from the receiver (and a traceback from a sender given such an answer).
    """
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def load_description(body: bytes | str, expected_type: str) -> RTCSessionDescription:
    """A JSON session description (an HTTP body); ValueError with a clear message for anything else."""
    return parse_description(load_json(body), expected_type)


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
                if resp.status == 503:
                    raise ReceiverBusy(f"receiver busy (HTTP 503): {(await resp.text())[:200]}",
                                       await _retry_after(resp))
                if resp.status != 200:
                    text = (await resp.text())[:200]
                    raise SignalingError(f"receiver answered HTTP {resp.status}: {text}")
                return parse_description(await resp.json(loads=load_json), "answer")
    except aiohttp.ClientError as e:
        raise SignalingError(f"cannot reach receiver at {url}: {e}") from e
    except TimeoutError as e:
        raise SignalingError(f"receiver at {url} did not answer within {timeout_s:.0f}s") from e
    except ValueError as e:
        raise SignalingError(f"receiver sent a bad answer: {e}") from e


async def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    """A 503's ``retry_after_s`` (receiver.server), if it is a sane number of seconds."""
    try:
        value = load_json(await resp.read()).get("retry_after_s")
    except (ValueError, AttributeError):
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 3600
    return float(value) if ok else None


async def offer_until_answered(url: str, offer: RTCSessionDescription, token: str | None = None,
                               within_s: float = 15.0) -> RTCSessionDescription:
    """:func:`send_offer`, offered again while the receiver is busy (HTTP 503), for up to ``within_s``.

    Slots free up: a peer that never connected or never said Hello gives way to a new offer
    (receiver.server). Answered offers that never connect, posted 4 a second, once took every slot
    and a sender that gave up at its first 503 was locked out. So a busy receiver is offered again
    when it says the soonest slot gives way (``retry_after_s``), or else after 0.5, 1, 2, 4, 4 ... s;
    any other failure is raised at once.
    """
    deadline = time.monotonic() + within_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return await send_offer(url, offer, token)
        except ReceiverBusy as e:
            if e.retry_after_s is not None:
                wait = max(BUSY_MIN_WAIT_S, e.retry_after_s + BUSY_MARGIN_S)
            else:
                wait = BUSY_BACKOFF_S[min(attempt, len(BUSY_BACKOFF_S)) - 1]
            if time.monotonic() + wait > deadline:
                raise ReceiverBusy(f"receiver busy: no call slot came free within {within_s:g} s (--connect-timeout; "
                                   f"{attempt} offers)", e.retry_after_s) from e
            log.warning("receiver busy (HTTP 503, offer %d): offering again in %.2f s%s", attempt, wait,
                        "" if e.retry_after_s is None else ", when it says a slot gives way")
            await asyncio.sleep(wait)
