"""Browser viewer: the newest active call's rendered frames as MJPEG, for any number of viewers.

Sessions publish every shown frame into a :class:`ViewerHub`; ``GET /video.mjpg`` streams the
newest active call's latest frame (``multipart/x-mixed-replace``), at most at the call's fps.
MJPEG because every browser shows it in a plain ``<img>`` with no JavaScript, no codec
negotiation and no second WebRTC leg; at 64-256 px a frame is a few kB.

Frames are JPEG-encoded lazily and once per frame, however many viewers there are, and only
when someone is watching, so an unwatched receiver pays nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from aiohttp import web

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
BOUNDARY = "kpcastframe"
JPEG_QUALITY = 85
MAX_VIEWER_FPS = 60.0  # a Hello may announce up to 240 fps; no viewer needs more than this


@dataclass
class _Feed:
    index: int  # the call's start order: the highest active index is "the newest call"
    fps: float
    image: np.ndarray | None = None
    frame_no: int = 0


class ViewerHub:
    """Latest frame per active call; viewers follow the newest call that has shown a frame."""

    def __init__(self) -> None:
        self._feeds: dict[str, _Feed] = {}
        self._changed = asyncio.Condition()
        self._jpeg_key: tuple[str, int] | None = None
        self._jpeg: bytes = b""
        self.viewers = 0
        self.closed = False

    # ------------------------------------------------------------------ publishing side (sessions)
    def publish(self, call_id: str, index: int, image: np.ndarray, fps: float) -> None:
        """Called from the event loop for every frame a call shows; O(1), no encoding here."""
        feed = self._feeds.get(call_id)
        if feed is None:
            feed = self._feeds[call_id] = _Feed(index, fps)
        feed.image = image
        feed.fps = fps
        feed.frame_no += 1
        if self.viewers:
            asyncio.ensure_future(self._notify())

    def end(self, call_id: str) -> None:
        """A call ended: its frames are no longer shown."""
        if self._feeds.pop(call_id, None) is not None and self.viewers:
            asyncio.ensure_future(self._notify())

    async def close(self) -> None:
        """Receiver shutdown: every open stream finishes its response."""
        self.closed = True
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ reading side (viewers)
    def current(self) -> tuple[str, _Feed] | None:
        """The newest call that has shown at least one frame."""
        live = [(f.index, cid, f) for cid, f in self._feeds.items() if f.image is not None]
        if not live:
            return None
        _, cid, feed = max(live, key=lambda t: t[0])
        return cid, feed

    def jpeg(self, call_id: str, feed: _Feed) -> bytes:
        """The feed's latest frame as JPEG, encoded once and shared by all viewers."""
        key = (call_id, feed.frame_no)
        if key != self._jpeg_key:
            ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(feed.image[..., ::-1]),
                                   [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise RuntimeError("JPEG encoding failed")
            self._jpeg_key, self._jpeg = key, buf.tobytes()
        return self._jpeg

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """``GET /video.mjpg``: stream until the viewer leaves or the receiver stops."""
        resp = web.StreamResponse(headers={
            "Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}",
            "Cache-Control": "no-cache, no-store", "Pragma": "no-cache"})
        await resp.prepare(request)
        self.viewers += 1
        sent: tuple[str, int] | None = None
        last_sent = 0.0
        try:
            # something to show before the first call (the <img> gets a size and a "no call" look)
            await self._write_part(resp, _placeholder())
            while not self.closed:
                cur = self.current()
                key = (cur[0], cur[1].frame_no) if cur else None
                if cur is None or key == sent:
                    async with self._changed:
                        try:
                            await asyncio.wait_for(self._changed.wait(), timeout=1.0)
                        except TimeoutError:
                            pass
                    continue
                # pace to the call's fps: a viewer never gets more frames than the call renders
                period = 1.0 / min(max(cur[1].fps, 1.0), MAX_VIEWER_FPS)
                wait = last_sent + period - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue  # take whatever is newest after the pause
                await self._write_part(resp, self.jpeg(*cur))
                sent, last_sent = key, time.monotonic()
        except ConnectionResetError:
            pass  # the viewer went away
        finally:
            self.viewers -= 1
        return resp

    @staticmethod
    async def _write_part(resp: web.StreamResponse, jpeg: bytes) -> None:
        head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n").encode()
        await resp.write(head + jpeg + b"\r\n")


_PLACEHOLDER: bytes | None = None


def _placeholder() -> bytes:
    global _PLACEHOLDER
    if _PLACEHOLDER is None:
        img = np.full((64, 64, 3), 40, np.uint8)
        _PLACEHOLDER = cv2.imencode(".jpg", img)[1].tobytes()
    return _PLACEHOLDER


async def handle_index(request: web.Request) -> web.FileResponse:
    """``GET /``: the viewer page (static; it passes ``?token=`` on to /stats and /video.mjpg)."""
    return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})
