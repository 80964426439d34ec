"""The receiver's /send routes (receiver.sendpage), in this process with a tiny model: the page, its
modules and the pinned packages from this receiver only, cross-origin isolated, and the detector's
ONNX file exported on the first request, cached by fingerprint, refused under another fingerprint."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bench.fuzz import tiny_model
from models.fomm.export import onnx_session
from models.fomm.io import detector_id
from receiver.sendpage import ISOLATION_HEADERS, NODE_MODULES, SendPage

HAVE_NODE_MODULES = (NODE_MODULES / "onnxruntime-web").exists() and (NODE_MODULES / "@msgpack" / "msgpack").exists()


async def _client(page: SendPage) -> TestClient:
    app = web.Application()
    page.install(app)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[TestClient, SendPage]]:
    page = SendPage(tiny_model(), cache_dir=tmp_path / "cache")
    c = await _client(page)
    try:
        yield c, page
    finally:
        await c.close()


async def test_page_and_modules_come_from_this_receiver(client: tuple[TestClient, SendPage]) -> None:
    c, _ = client
    r = await c.get("/send")
    assert r.status == 200 and r.content_type == "text/html"
    html = await r.text()
    for k, v in ISOLATION_HEADERS.items():  # onnxruntime-web's threads need SharedArrayBuffer
        assert r.headers[k] == v
    assert not re.search(r"(src|href)=\"https?://", html) and "//cdn" not in html
    for path in re.findall(r"\"(/send/[^\"]+)\"", html):  # the import map and the module
        assert (await c.get(path)).status == 200, path
    for mod in ("app", "protocol", "kpcodec", "framing", "detector", "peer"):
        r = await c.get(f"/send/js/{mod}.js")
        assert r.status == 200 and "javascript" in r.content_type, mod
        text = await r.text()
        assert not re.search(r"(from|import\(|fetch\()\s*[\"'`]https?:", text), mod  # nothing loaded from elsewhere
    assert (await c.get("/send/js/../sendpage.py")).status in (403, 404)  # no way out of the folder


@pytest.mark.skipif(not HAVE_NODE_MODULES, reason="node_modules missing (.ci/setup.sh runs npm ci)")
async def test_pinned_packages_are_served(client: tuple[TestClient, SendPage]) -> None:
    c, _ = client
    for path in ("/send/vendor/ort/ort.wasm.min.mjs", "/send/vendor/ort/ort-wasm-simd-threaded.wasm",
                 "/send/vendor/msgpack/index.mjs"):
        r = await c.get(path)
        assert r.status == 200, path
        assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"


async def test_missing_packages_say_what_to_run(tmp_path: Path) -> None:
    c = await _client(SendPage(tiny_model(), cache_dir=tmp_path, node_modules=tmp_path / "none"))
    try:
        r = await c.get("/send/vendor/ort/ort.wasm.min.mjs")
        assert r.status == 503 and "npm ci" in await r.text()
    finally:
        await c.close()


async def test_detector_onnx_is_this_receivers_detector(client: tuple[TestClient, SendPage], tmp_path: Path) -> None:
    c, page = client
    info = await (await c.get("/send/detector.json")).json()
    assert info["id"] == detector_id(page.model) and info["size"] == page.model.config.motion_size
    assert not (tmp_path / "cache").exists()  # exported on the first request, not before
    r = await c.get(f"/send/{info['onnx']}")
    assert r.status == 200
    blob = await r.read()
    assert (tmp_path / "cache" / info["onnx"]).read_bytes() == blob
    assert "immutable" in r.headers["Cache-Control"]  # the name is the content's fingerprint
    # the file computes this model's keypoints
    x = np.random.default_rng(0).random((1, 3, info["size"], info["size"]), np.float32)
    import torch

    want = page.model.keypoints(torch.from_numpy(x)).detach().numpy()
    got = onnx_session(blob).run(None, {info["input"]: x})[0]
    assert np.abs(want - got).max() < 1e-4
    # a page loaded before the receiver restarted with other weights asks for another fingerprint
    r = await c.get("/send/detector-kp-000000000000.onnx")
    assert r.status == 404 and info["id"] in (await r.json())["error"]
