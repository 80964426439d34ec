"""The browser sender: ``GET /send`` serves a page that joins a call with nothing installed.

The page (``receiver/web/send.html`` and its modules in ``receiver/web/send/``) runs this
receiver's own keypoint detector, exported to ONNX, with onnxruntime-web, speaks the wire
protocol in JavaScript (@msgpack/msgpack) and calls ``POST /offer`` like ``python -m sender``.
Everything it loads comes from here, so it works offline:

- ``/send/detector.json``: the detector's fingerprint (what the Hello must name) and file name;
- ``/send/detector-<fingerprint>-<code>.onnx``: exported from the model this receiver renders with, on
  the first request (``models.fomm.export.cached_detector_onnx``; the set-up makes the shipped
  one beforehand) and cached under ``cache/web/``;
- ``/send/js/``: the page's modules; ``/send/vendor/ort/`` and ``/send/vendor/msgpack/``: the
  pinned npm packages (``package.json``, ``package-lock.json``), installed by ``.ci/setup.sh``
  (``npm ci``) into ``node_modules/``.

Every response under ``/send`` is cross-origin isolated (COOP ``same-origin`` + COEP
``require-corp``): onnxruntime-web needs SharedArrayBuffer for more than one WASM thread.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from models.fomm.export import cached_detector_onnx, detector_cache_path
from models.fomm.io import detector_id
from models.fomm.model import MotionModel

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
WEB_DIR = Path(__file__).resolve().parent / "web"
NODE_MODULES = ROOT / "node_modules"
CACHE_DIR = ROOT / "cache" / "web"
SEND_PATH = "/send"
# npm package folders the page imports from (its import map names these URLs)
VENDOR = {"ort": Path("onnxruntime-web") / "dist", "msgpack": Path("@msgpack") / "msgpack" / "dist.esm"}
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
                     "Cross-Origin-Resource-Policy": "same-origin"}


class SendPage:
    """The ``/send`` routes for one receiver's model."""

    def __init__(self, model: MotionModel, cache_dir: Path = CACHE_DIR, node_modules: Path = NODE_MODULES) -> None:
        self.model = model
        self.detector_id = detector_id(model)
        self.cache_dir = Path(cache_dir)
        # the file's name says which weights and which code exported it: one URL, one content
        self.onnx_name = detector_cache_path(model, self.cache_dir).name
        self.node_modules = Path(node_modules)
        self._onnx: Path | None = None
        self._export_lock = asyncio.Lock()

    def install(self, app: web.Application) -> None:
        app.router.add_get(SEND_PATH, self.handle_page)
        app.router.add_get(f"{SEND_PATH}/detector.json", self.handle_detector_info)
        app.router.add_get(f"{SEND_PATH}/detector-{{fingerprint}}.onnx", self.handle_detector)
        app.router.add_static(f"{SEND_PATH}/js/", WEB_DIR / "send", append_version=False)
        for name, sub in VENDOR.items():
            folder = self.node_modules / sub
            if folder.is_dir():
                app.router.add_static(f"{SEND_PATH}/vendor/{name}/", folder)
            else:  # the page says what is missing instead of failing on a 404 deep in a module
                log.warning("%s is missing: the browser sender needs `npm ci` (.ci/setup.sh)", folder)
                app.router.add_get(f"{SEND_PATH}/vendor/{name}/{{tail:.*}}", _missing_vendor)
        app.on_response_prepare.append(_isolate)

    async def handle_page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "send.html", headers={"Cache-Control": "no-cache"})

    async def handle_detector_info(self, request: web.Request) -> web.Response:
        m = self.model.config
        return web.json_response({"id": self.detector_id, "size": m.motion_size, "input": "frame",
                                  "output": "keypoints", "onnx": self.onnx_name},
                                 headers={"Cache-Control": "no-cache"})

    async def handle_detector(self, request: web.Request) -> web.StreamResponse:
        if f"detector-{request.match_info['fingerprint']}.onnx" != self.onnx_name:
            # a page loaded before this receiver restarted with other weights (or code)
            return web.json_response({"error": f"this receiver's detector is {self.detector_id}"}, status=404)
        path = await self.onnx_path()
        # named by fingerprint: the same URL is always the same bytes
        return web.FileResponse(path, headers={"Cache-Control": "public, max-age=31536000, immutable",
                                               "Content-Type": "application/octet-stream"})

    async def onnx_path(self) -> Path:
        """The detector's ONNX file, exported (in a worker thread, once) if the cache lacks it."""
        async with self._export_lock:
            if self._onnx is None or not self._onnx.exists():
                self._onnx = await asyncio.to_thread(cached_detector_onnx, self.model, self.cache_dir)
        return self._onnx


async def _isolate(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == SEND_PATH or request.path.startswith(SEND_PATH + "/"):
        response.headers.update(ISOLATION_HEADERS)


async def _missing_vendor(request: web.Request) -> web.Response:
    return web.Response(status=503, text="the receiver's node_modules/ is missing: run `npm ci` (.ci/setup.sh)")
