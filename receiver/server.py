"""The receiver's HTTP server: signaling (POST /offer), stats, the browser viewer, and the calls it hosts.

Call slots (``max_calls``) are taken when an offer is *accepted for reading*, before its body
arrives, and checked without an await in between, so slow or concurrent offers cannot
overbook. An offer holds its slot while its body is read (at most ``offer_read_timeout_s``,
``MAX_SDP_BYTES``) and answered; one that cannot become a call (malformed, unusable SDP)
gets a 4xx and gives the slot back at once. Only answered offers are calls: they are counted
for ``stop_after_calls`` and listed in ``/stats`` (the newest ``max_finished`` of them).

When every slot is taken, a peer that has not said Hello for ``evict_after_s`` gives its slot
to a new usable offer. A timer alone cannot tell a silent peer from a caller whose setup is
retransmitting on a lossy link (at 20 % loss an honest sender's first message came up to 6 s
after both its channels were open, 15 s after the answer), so the session keeps its own
deadlines; eviction only settles who gets a slot that two want: the one that has shown nothing
loses it, and peers that are not callers cannot lock callers out.

A peer whose connection is not even up (ICE and DTLS not connected) gives way sooner, after
``evict_unconnected_after_s``: answered offers that never connect (a peer with the token posting
4 offers/s for 20 s, each dropped after its answer) otherwise kept every slot turning over among
themselves at ``evict_after_s``, and a real caller got 503 at 6 s. Once its connection is up, a
peer has the full ``evict_after_s`` to say Hello, and a caller that said it is never evicted, so a
caller retransmitting on a lossy link keeps its slot. A 503 says in ``retry_after_s`` when the
soonest slot gives way (absent when none will: every call said Hello), so a sender that offers
again then (``shared.signaling.offer_until_answered``) is not left to chance against a flood.
``evict_after_s`` = inf turns eviction off altogether (kpcast's one-slot listener).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiortc import RTCPeerConnection

from models.fomm.model import MotionModel
from receiver.batching import RenderBatcher
from receiver.callpage import CallPage
from receiver.cors import Cors
from receiver.regions import RegionStage
from receiver.render import Renderer
from receiver.sctp_limits import ADVERTISED_MAX_MESSAGE_BYTES, limit_inbound
from receiver.sendpage import SendPage
from receiver.session import CallSession, SessionConfig
from receiver.tiers import TierSet
from receiver.viewer import ViewerHub, handle_index
from shared.ice_servers import IceServerOptions, check_relay, rtc_configuration
from shared.signaling import MAX_SDP_BYTES, OFFER_PATH, check_token, load_description, offer_problem

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None  # when set, POST /offer needs "Authorization: Bearer <token>"
    max_calls: int = 4  # concurrent calls; more get HTTP 503
    stop_after_calls: int | None = None  # exit after this many calls have ended (demo, tests)
    stats_dir: str | None = None  # each ended call's stats are written here as call_<n>.json
    session: SessionConfig = field(default_factory=SessionConfig)
    fast_render: bool = True  # CPU: render with ONNX Runtime (receiver.render.FastRender)
    int8_render: bool = True  # ... its convolutions in int8 where the weights ship calibration ranges
    max_batch: int = 4  # concurrent calls' frames rendered in one run (receiver.batching); 1 = one by one
    render_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))  # frames side by side
    cors_origins: list[str] = field(default_factory=list)  # pages on these origins may use /offer and /stats
    offer_read_timeout_s: float = 5.0  # an offer's body must arrive within this (its slot is held meanwhile)
    evict_after_s: float = 5.0  # with every slot taken, a peer without a Hello this long gives way to a new offer
    # ... and sooner, one whose connection (ICE/DTLS) is not up this long (up to 4/3 of it, see _gives_way_in): a
    # LAN caller connects in well under a second, one DTLS flight lost costs 1 s more; at most evict_after_s
    evict_unconnected_after_s: float = 3.0
    max_finished: int = 100  # ended calls listed in /stats (the viewer polls it every second)
    ice: IceServerOptions = field(default_factory=IceServerOptions)  # STUN/TURN (--ice-server)
    refine_regions: str | None = None  # region refiner checkpoint (--refine-regions; the CLI loads it); None: off


# Called with a call's peer connection and session right after its offer is answered, before any
# event of that connection runs; it must not await (kpcast's two-way call opens its own channels here).
OnAnswered = Callable[[RTCPeerConnection, CallSession], None]


class ReceiverServer:
    def __init__(self, model: MotionModel, config: ServerConfig, tiers: TierSet | None = None,
                 on_answered: OnAnswered | None = None, regions: RegionStage | None = None) -> None:
        self.model = model
        self.config = config
        self.tiers = tiers  # each call adapts its render tier (receiver.adapt) when set
        self.regions = regions  # every call's frames get their eyes and mouth redrawn (--refine-regions) when set
        self.on_answered = on_answered
        # Calls' frames render side by side, one worker per core, a lone frame on all of them
        # (receiver.batching); source images are encoded on the same workers, between rounds.
        self.executor = ThreadPoolExecutor(max_workers=config.render_workers, thread_name_prefix="render")
        self.batcher = RenderBatcher(self.executor, config.max_batch, workers=config.render_workers)
        self.sessions: dict[str, CallSession] = {}
        self.finished: collections.deque[dict[str, Any]] = collections.deque(maxlen=config.max_finished)
        self.calls_started = 0
        self.calls_finished = 0
        self.offers_pending = 0  # slots held by offers still being read or answered
        self.offer_evicting = False  # an offer over the limit is being read, to take an evictable peer's slot
        self.done = asyncio.Event()
        self.viewer = ViewerHub()
        self.app = web.Application(client_max_size=MAX_SDP_BYTES)
        self.app.router.add_post(OFFER_PATH, self.handle_offer)
        self.app.router.add_get("/stats", self.handle_stats)
        Cors(config.cors_origins, {OFFER_PATH: "POST", "/stats": "GET"}).install(self.app)
        self.app.router.add_get("/health", self.handle_health)
        self.app.router.add_get("/", handle_index)
        self.app.router.add_get("/video.mjpg", self.handle_video)
        SendPage(model).install(self.app)  # GET /send: the browser sender (receiver.sendpage)
        CallPage().install(self.app)  # GET /call: the browser's two-way call (receiver.callpage)
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.config.host, self.config.port)
        await site.start()  # OSError (port in use) propagates to the CLI
        log.info("receiver listening on http://%s:%d", self.config.host, self.config.port)

    async def stop(self) -> None:
        for s in list(self.sessions.values()):
            await s.close("receiver shutting down")
        await self.viewer.close()  # open MJPEG streams end their responses instead of being cut
        if self.runner is not None:
            await self.runner.cleanup()
        self.executor.shutdown(wait=True)

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "calls": len(self.sessions)})

    def _authorized(self, request: web.Request) -> bool:
        """Bearer header, or ``?token=`` for GETs a browser makes (an <img> cannot send headers)."""
        if check_token(request.headers.get("Authorization"), self.config.token):
            return True
        query = request.query.get("token")
        return request.method == "GET" and query is not None and check_token(f"Bearer {query}", self.config.token)

    async def handle_video(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        return await self.viewer.stream(request)

    async def handle_stats(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"active": [s.summary() for s in self.sessions.values()],
                                  "finished": list(self.finished), "calls_finished": self.calls_finished})

    async def handle_offer(self, request: web.Request) -> web.Response:
        if not check_token(request.headers.get("Authorization"), self.config.token):
            log.warning("refused an offer from %s: bad token", request.remote)
            return web.json_response({"error": "unauthorized"}, status=401)
        # Check and take the slot with no await in between: this is what makes max_calls hold.
        if len(self.sessions) + self.offers_pending < self.config.max_calls:
            self.offers_pending += 1
            try:
                return await self._answer(request)
            finally:
                self.offers_pending -= 1  # a call, if one was made, is in self.sessions by now
        # Every slot is taken. If a peer could give way (see _evictable), one offer at a time is
        # still read; it takes that peer's slot only once it has proven usable, so junk offers
        # cannot evict anyone.
        if self.offer_evicting or self._evictable() is None:
            return self._busy()
        self.offer_evicting = True
        took: list[int] = []

        async def make_room() -> bool:
            victim = self._evictable()  # again: it may have said Hello while the offer was read
            if victim is None:
                return False
            self.offers_pending += 1  # the slot is ours from here: nobody else takes it while the victim closes
            took.append(1)
            why = "no hello" if _connected(victim) else "not connected"
            log.warning("call %s: %s after %.1fs and every slot taken: giving its slot to a new offer from %s",
                        victim.call_id, why, time.monotonic() - victim.liveness.created, request.remote)
            await victim.close(f"evicted: {why}, and a new offer needed the slot")
            return True

        try:
            return await self._answer(request, make_room)
        finally:
            self.offer_evicting = False
            self.offers_pending -= len(took)

    def _evictable(self) -> CallSession | None:
        """The longest-waiting peer past its eviction delay (:meth:`_gives_way_in`), if any."""
        now = time.monotonic()
        waiting = [s for s in self.sessions.values() if (w := self._gives_way_in(s, now)) is not None and w <= 0]
        return min(waiting, key=lambda s: s.liveness.created, default=None)

    def _gives_way_in(self, session: CallSession, now: float) -> float | None:
        """Seconds until ``session`` gives its slot to a new offer (<= 0: it would now); None: never
        (it said Hello, it is closing, or eviction is off)."""
        cfg = self.config
        if session.hello is not None or session.closed.is_set() or math.isinf(cfg.evict_after_s):
            return None
        if _connected(session):  # time to say Hello
            return session.liveness.created + cfg.evict_after_s - now
        # Not connected: not even a transport, let alone a caller. Each peer gets its own delay, in
        # [1, 4/3) x the setting, from its random call id: offers posted at a steady rate found the slots
        # they took giving way on their own beat (a deadline is the offer's arrival + a constant), and
        # the next one arrived a few ms after the deadline, ahead of a sender told when (retry_after_s).
        spread = 1.0 + int(session.call_id, 16) / 16 ** len(session.call_id) / 3.0
        after = min(cfg.evict_unconnected_after_s * spread, cfg.evict_after_s)
        return session.liveness.created + after - now

    def _busy(self) -> web.Response:
        """503, with when the soonest slot gives way (``retry_after_s``) when one will."""
        now = time.monotonic()
        waits = [w for s in self.sessions.values() if (w := self._gives_way_in(s, now)) is not None]
        body: dict[str, Any] = {"error": "receiver busy"}
        headers = {}
        if waits:
            body["retry_after_s"] = round(max(0.0, min(waits)), 3)
            headers["Retry-After"] = str(math.ceil(body["retry_after_s"]))  # HTTP's own, in whole seconds
        return web.json_response(body, status=503, headers=headers)

    async def _answer(self, request: web.Request,
                      make_room: Callable[[], Awaitable[bool]] | None = None) -> web.Response:
        try:
            body = await asyncio.wait_for(request.read(), self.config.offer_read_timeout_s)
            offer = load_description(body, "offer")  # ValueError for any bad body, deep nesting included
        except TimeoutError:
            log.warning("offer from %s: body not received within %.0fs", request.remote,
                        self.config.offer_read_timeout_s)
            return web.json_response({"error": "offer body too slow"}, status=408)
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": "offer too large"}, status=413)
        except ValueError as e:  # also JSONDecodeError, UnicodeDecodeError and too deep (load_json)
            return web.json_response({"error": f"bad offer: {e}"}, status=400)
        problem = offer_problem(offer.sdp)
        if problem is not None:
            log.warning("unusable offer from %s: %s", request.remote, problem)
            return web.json_response({"error": f"unusable offer: {problem}"}, status=400)
        if make_room is not None and not await make_room():
            return self._busy()

        rtc = rtc_configuration(self.config.ice)
        pc = RTCPeerConnection(rtc)
        try:
            await pc.setRemoteDescription(offer)
            if pc.sctp is None:
                raise ValueError("no data channel in the offer")
            await pc.setLocalDescription(await pc.createAnswer())
            check_relay(pc.localDescription.sdp, rtc, "receiver")
        except Exception as e:  # aiortc raises assorted errors on SDP it can't use
            log.warning("bad offer from %s: %s", request.remote, e)
            await pc.close()
            return web.json_response({"error": f"cannot answer this offer: {e}"}, status=400)

        # Nothing awaits from here to the return, so no event of the new connection runs before
        # its session is wired up (aiortc starts the transport in a task it has only scheduled).
        call_id = uuid.uuid4().hex[:8]
        index = self.calls_started
        self.calls_started += 1
        renderer = (self.tiers.renderer(self.config.fast_render, self.config.int8_render, self.regions)
                    if self.tiers is not None
                    else Renderer(self.model, self.config.fast_render, self.config.int8_render, self.regions))
        session = CallSession(call_id, index, pc, renderer, self.executor, self.config.session, batcher=self.batcher,
                              on_closed=self._on_closed)
        self.sessions[call_id] = session
        session.on_frame = lambda image, s=session: self.viewer.publish(s.call_id, s.index, image, s.hello.fps)
        wire_session(pc, session)
        session.start()
        if self.on_answered is not None:
            self.on_answered(pc, session)
        log.info("call %s: answered offer from %s", call_id, request.remote)
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})

    def _on_closed(self, session: CallSession) -> None:
        self.sessions.pop(session.call_id, None)
        self.viewer.end(session.call_id)
        summary = session.summary()
        self.finished.append(summary)
        self.calls_finished += 1
        if self.config.stats_dir:
            path = Path(self.config.stats_dir) / f"call_{session.index + 1}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=1))
        if self.config.stop_after_calls and self.calls_finished >= self.config.stop_after_calls:
            self.done.set()


def _connected(session: CallSession) -> bool:
    """The call's transport is up: ICE and DTLS connected (the data channels open next)."""
    return session.pc.connectionState == "connected"


def wire_session(pc: RTCPeerConnection, session: CallSession) -> None:
    """Feed ``session`` from ``pc``: the peer's data channels, bounds on what its SCTP may make us hold
    (what this end advertised, in ``pc.localDescription``), and the session's end with the connection.
    Call it after the local description is set and before any data can arrive."""
    pc.on("datachannel", session.attach)
    limit_inbound(pc.sctp, lambda reason: asyncio.ensure_future(session.close(f"sctp: {reason}")),
                  max_message_bytes=_advertised_max_message_size(pc.localDescription.sdp))

    @pc.on("connectionstatechange")
    async def _state() -> None:
        if pc.connectionState in ("failed", "closed"):
            await session.close(f"connection {pc.connectionState}")


def _advertised_max_message_size(sdp: str) -> int:
    """The max-message-size this end put in its answer: what the peer was told it may send."""
    for line in sdp.splitlines():
        if line.startswith("a=max-message-size:"):
            value = line.split(":", 1)[1].strip()
            if value.isdigit() and int(value) > 0:
                return int(value)
    return ADVERTISED_MAX_MESSAGE_BYTES
