"""The browser render graph (models.fomm.webrender) and the /call routes (receiver.callpage), in this
process with a tiny model: the two graphs render what PyTorch renders, and the page, its modules and the
graphs come from this side, cross-origin isolated, exported once and refused under another name."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bench.fuzz import tiny_model
from models.fomm.io import detector_id
from models.fomm.webrender import WebRender, cached_web_render, check, export_web_render
from receiver.callpage import CallPage
from receiver.sendpage import ISOLATION_HEADERS


def test_web_render_graphs_match_pytorch(tmp_path: Path) -> None:
    model = tiny_model()
    web_ = export_web_render(model)
    assert web_.bind_outputs and web_.size == model.config.size
    assert check(model, web_, frames=4) < 1e-4
    info = cached_web_render(model, tmp_path)
    meta = json.loads(info.read_text())
    assert (tmp_path / meta["bind_onnx"]).read_bytes() == web_.bind  # deterministic export, one name
    assert cached_web_render(model, tmp_path) == info  # exported once
    loaded = WebRender((tmp_path / meta["bind_onnx"]).read_bytes(), (tmp_path / meta["frame_onnx"]).read_bytes(),
                       meta["bind_outputs"], meta["size"])
    assert check(model, loaded, frames=2) < 1e-4


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[TestClient, CallPage]]:
    page = CallPage(tiny_model(), cache_dir=tmp_path / "cache")
    app = web.Application()
    page.install(app)
    c = TestClient(TestServer(app))
    await c.start_server()
    try:
        yield c, page
    finally:
        await c.close()


async def test_call_page_serves_its_graphs_isolated(client: tuple[TestClient, CallPage]) -> None:
    c, page = client
    r = await c.get("/call")
    assert r.status == 200 and r.content_type == "text/html"
    for k, v in ISOLATION_HEADERS.items():  # onnxruntime-web's threads need SharedArrayBuffer
        assert r.headers[k] == v
    html = await r.text()
    assert not re.search(r"(src|href)=\"https?://", html)
    for mod in ("app", "render", "remote"):
        r = await c.get(f"/call/js/{mod}.js")
        assert r.status == 200 and "javascript" in r.content_type, mod
        assert not re.search(r"(from|import\(|fetch\()\s*[\"'`]https?:", await r.text()), mod
    r = await c.get("/call/render.json")
    info = await r.json()
    assert info["detector_id"] == detector_id(page.model()) and r.headers["Cross-Origin-Opener-Policy"]
    for name in (info["bind_onnx"], info["frame_onnx"]):
        r = await c.get(f"/call/render/{name}")
        assert r.status == 200 and len(await r.read()) > 1000 and "immutable" in r.headers["Cache-Control"]
    assert (await c.get("/call/render/render64-other-graph.frame.onnx")).status == 404
    assert (await c.get("/call/js/../callpage.py")).status in (403, 404)
