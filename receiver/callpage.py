"""The browser call page: ``GET /call`` sends this browser's face as ``/send`` does and shows the
other side's, rendered in the page from the keypoints it receives (no video crosses the link).

The page (``receiver/web/call.html``, modules in ``receiver/web/call/``) reuses the sender page's
modules and vendor files (``receiver.sendpage``) for its own half, and renders the other side with
the 64 x 64 render graph exported for browsers (``models.fomm.webrender``), whatever tier this
side renders at itself: a browser on a CPU holds 64 x 64 at best. Routes:

- ``/call/render.json``: the graph's wiring and file names (``models.fomm.webrender.WebRender.info``);
- ``/call/render/<name>.{bind,frame}.onnx``: exported on the first request (in a worker thread),
  cached under ``cache/web/``, named by the weights and the code;
- ``/call/js/``: the page's own modules.

``python -m kpcast call --listen`` answers a ``/call`` page's offer with its own face on the same
peer connection (``kpcast.call``); ``python -m receiver`` answers it as any sender, so the page
shows its own half only. Every response under ``/call`` is cross-origin isolated, as ``/send``'s are.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from aiohttp import web

from models.fomm.io import detector_id, load_motion_model, weights_for_size
from models.fomm.model import MotionModel
from models.fomm.webrender import cached_web_render
from receiver.sendpage import CACHE_DIR, ISOLATION_HEADERS, WEB_DIR

log = logging.getLogger(__name__)

CALL_PATH = "/call"
WEB_SIZE = 64  # the tier a browser renders (bench.browser --render-only measures it)


class CallPage:
    """The ``/call`` routes. ``model``: the 64 x 64 model to render with (default: the shipped one,
    loaded on the first request for the graph); it must share the detector of the model the
    receiver renders with, as every shipped tier does."""

    def __init__(self, model: MotionModel | None = None, cache_dir: Path = CACHE_DIR) -> None:
        self._model = model
        self.cache_dir = Path(cache_dir)
        self._info: dict | None = None
        self._lock = asyncio.Lock()

    def install(self, app: web.Application) -> None:
        app.router.add_get(CALL_PATH, self.handle_page)
        app.router.add_get(f"{CALL_PATH}/render.json", self.handle_info)
        app.router.add_get(f"{CALL_PATH}/render/{{name}}", self.handle_graph)
        app.router.add_static(f"{CALL_PATH}/js/", WEB_DIR / "call", append_version=False)
        app.on_response_prepare.append(_isolate)

    def model(self) -> MotionModel:
        if self._model is None:
            self._model, _ = load_motion_model(weights_for_size(WEB_SIZE))
        return self._model

    async def info(self) -> dict:
        """The graph's wiring (``<name>.json``), exported first if the cache lacks it."""
        async with self._lock:
            if self._info is None:
                path = await asyncio.to_thread(lambda: cached_web_render(self.model(), self.cache_dir))
                # the detector whose keypoints the graph renders: the other side's Hello must name it
                self._info = {**json.loads(path.read_text()), "detector_id": detector_id(self.model())}
        return self._info

    async def handle_page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "call.html", headers={"Cache-Control": "no-cache"})

    async def handle_info(self, request: web.Request) -> web.Response:
        return web.json_response(await self.info(), headers={"Cache-Control": "no-cache"})

    async def handle_graph(self, request: web.Request) -> web.StreamResponse:
        info = await self.info()
        name = request.match_info["name"]
        if name not in (info["bind_onnx"], info["frame_onnx"]):
            # a page loaded before this side restarted with other weights (or code)
            return web.json_response({"error": f"this page's render graph is {info['bind_onnx']}"}, status=404)
        # named by weights and code: the same URL is always the same bytes
        return web.FileResponse(self.cache_dir / name, headers={
            "Cache-Control": "public, max-age=31536000, immutable", "Content-Type": "application/octet-stream"})


async def _isolate(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == CALL_PATH or request.path.startswith(CALL_PATH + "/"):
        response.headers.update(ISOLATION_HEADERS)
