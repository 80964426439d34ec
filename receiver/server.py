"""The receiver's HTTP server: signaling (POST /offer), stats, the browser viewer, and the calls it hosts."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection

from models.fomm.model import MotionModel
from receiver.render import Renderer
from receiver.session import CallSession, SessionConfig
from receiver.viewer import ViewerHub, handle_index
from shared.signaling import MAX_SDP_BYTES, OFFER_PATH, check_token, parse_description

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
    fast_render: bool = True  # CPU: render with ONNX Runtime (receiver.render.onnx_render)


class ReceiverServer:
    def __init__(self, model: MotionModel, config: ServerConfig) -> None:
        self.model = model
        self.config = config
        # One worker: torch already uses every core for one render; two renders at once only thrash.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
        self.sessions: dict[str, CallSession] = {}
        self.finished: list[dict[str, Any]] = []
        self.calls_started = 0
        self.done = asyncio.Event()
        self.viewer = ViewerHub()
        self.app = web.Application(client_max_size=MAX_SDP_BYTES)
        self.app.router.add_post(OFFER_PATH, self.handle_offer)
        self.app.router.add_get("/stats", self.handle_stats)
        self.app.router.add_get("/health", self.handle_health)
        self.app.router.add_get("/", handle_index)
        self.app.router.add_get("/video.mjpg", self.handle_video)
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
                                  "finished": self.finished})

    async def handle_offer(self, request: web.Request) -> web.Response:
        if not check_token(request.headers.get("Authorization"), self.config.token):
            log.warning("refused an offer from %s: bad token", request.remote)
            return web.json_response({"error": "unauthorized"}, status=401)
        if len(self.sessions) >= self.config.max_calls:
            return web.json_response({"error": "receiver busy"}, status=503)
        try:
            offer = parse_description(await request.json(), "offer")
        except (ValueError, json.JSONDecodeError) as e:
            return web.json_response({"error": f"bad offer: {e}"}, status=400)
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": "offer too large"}, status=413)

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        call_id = uuid.uuid4().hex[:8]
        index = self.calls_started
        self.calls_started += 1
        renderer = Renderer(self.model, self.config.fast_render)
        session = CallSession(call_id, index, pc, renderer, self.executor, self.config.session,
                              on_closed=self._on_closed)
        self.sessions[call_id] = session
        session.on_frame = lambda image, s=session: self.viewer.publish(s.call_id, s.index, image, s.hello.fps)
        pc.on("datachannel", session.attach)

        @pc.on("connectionstatechange")
        async def _state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await session.close(f"connection {pc.connectionState}")

        try:
            await pc.setRemoteDescription(offer)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # aiortc raises assorted errors on SDP it can't use
            log.warning("bad offer: %s", e)
            await session.close("bad offer")
            return web.json_response({"error": f"cannot answer this offer: {e}"}, status=400)
        session.start()
        log.info("call %s: answered offer from %s", call_id, request.remote)
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})

    def _on_closed(self, session: CallSession) -> None:
        self.sessions.pop(session.call_id, None)
        self.viewer.end(session.call_id)
        summary = session.summary()
        self.finished.append(summary)
        if self.config.stats_dir:
            path = Path(self.config.stats_dir) / f"call_{session.index + 1}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=1))
        if self.config.stop_after_calls and len(self.finished) >= self.config.stop_after_calls:
            self.done.set()
