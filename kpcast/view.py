"""What one person sees in a two-way call: the other person large, themselves small, and the call's rates.

:func:`compose` draws the picture (pure: arrays in, array out); :class:`LiveRates` turns the call's
running counters into the one-line summary shown on it; :class:`CallView` keeps the latest picture
of each side and shows the composition on a :class:`ViewSink` (``window``, ``file:PATH``, ``null``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from receiver.sinks import FileSink, SinkError
from shared.kpvector import TRANSPORT_OVERHEAD_B

log = logging.getLogger(__name__)

SINKS = "null | window | file:PATH"
# Without a picture of the other side for this long, the self-view refreshes the picture on its own
# (the other side has not appeared yet, or froze), so the window never looks hung.
REMOTE_STALE_S = 0.5
BACKGROUND = (24, 24, 24)


@dataclass(frozen=True)
class Layout:
    size: int = 512  # side of the square picture
    pip: float = 0.28  # the self-view's side, as a fraction of ``size``
    margin: int = 8  # pixels between the self-view and the picture's edges

    @property
    def pip_side(self) -> int:
        return max(8, round(self.size * self.pip))

    def pip_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the self-view: the bottom-right corner, like most call apps."""
        side = self.pip_side
        x1 = y1 = self.size - self.margin
        return x1 - side, y1 - side, x1, y1


def compose(remote: np.ndarray | None, local: np.ndarray | None, layout: Layout = Layout(),
            text: str = "") -> np.ndarray:
    """The picture one person sees, (size, size, 3) uint8 RGB: the other side's face (``remote``)
    filling it, their own camera (``local``) mirrored in a corner, ``text`` on top. Either picture may
    be missing (None): the call has not shown it yet."""
    size = layout.size
    if remote is not None:
        out = cv2.resize(remote, (size, size), interpolation=cv2.INTER_LINEAR)
    else:
        out = np.empty((size, size, 3), np.uint8)
        out[:] = BACKGROUND
        _text(out, "waiting for the other side", (layout.margin, size // 2), size)
    if local is not None:
        x0, y0, x1, y1 = layout.pip_box()
        # Mirrored, as a mirror shows one's face: moving right moves right (the other side gets it unmirrored).
        out[y0:y1, x0:x1] = cv2.resize(np.ascontiguousarray(local[:, ::-1]), (x1 - x0, y1 - y0),
                                       interpolation=cv2.INTER_AREA)
        cv2.rectangle(out, (x0 - 1, y0 - 1), (x1, y1), (235, 235, 235), 1)
    if text:
        _text(out, text, (layout.margin, layout.margin + 12), size)
    return out


def _text(image: np.ndarray, text: str, origin: tuple[int, int], size: int) -> None:
    scale = min(0.5, 0.35 * size / 256)  # a line of rates fits across even a 256 picture
    # a dark outline under the light text keeps it readable on any face; drawn as shifted copies, since a
    # thicker stroke also widens the glyphs in OpenCV 5 and would not line up with the text on top
    x, y = origin
    for dx, dy in ((-1, -1), (1, 1), (1, -1), (-1, 1)):
        cv2.putText(image, text, (x + dx, y + dy), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


@dataclass(frozen=True)
class Counters:
    """The call's running totals at one instant (what :class:`LiveRates` differentiates)."""

    in_bytes: int  # keypoint message bytes received, transport overhead included
    out_bytes: int  # the same, sent
    shown: int  # frames of the other side rendered
    latency_ms: float | None  # capture (the other side's clock) to shown, recent median


class LiveRates:
    """kbps each way and fps shown over the last ``window_s``, from running totals."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, Counters]] = deque()

    def update(self, now: float, c: Counters) -> str:
        self.samples.append((now, c))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        t0, c0 = self.samples[0]
        dt = now - t0
        if dt <= 0:
            return "connecting"
        kbps_in = (c.in_bytes - c0.in_bytes) * 8 / 1000 / dt
        kbps_out = (c.out_bytes - c0.out_bytes) * 8 / 1000 / dt
        fps = (c.shown - c0.shown) / dt
        latency = f"{c.latency_ms:.0f} ms" if c.latency_ms is not None else "- ms"
        return f"in {kbps_in:.0f} kbps {fps:.0f} fps {latency}, out {kbps_out:.0f} kbps"


def wire_bytes(message_bytes: int, messages: int) -> int:
    """Keypoint bytes as the wire carries them (each message pays the DTLS/SCTP/UDP/IP overhead)."""
    return message_bytes + TRANSPORT_OVERHEAD_B * messages


# ---------------------------------------------------------------------------------------- sinks

class ViewSink:
    """Where the composed picture goes; ``quit_requested`` turns True when the person asks to hang up."""

    quit_requested = False

    def show(self, image: np.ndarray, title: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NullView(ViewSink):
    def __init__(self) -> None:
        self.frames = 0

    def show(self, image: np.ndarray, title: str) -> None:
        self.frames += 1


class FileView(ViewSink):
    """The composed pictures as an H.264 mp4 (``receiver.sinks.FileSink``), opened at the first one so it
    gets the other side's frame rate (``fps`` is asked then)."""

    def __init__(self, path: str, size: int, fps: Callable[[], float]) -> None:
        self.path, self.size, self.fps = path, size, fps
        self.sink: FileSink | None = None
        self.frames = 0

    def show(self, image: np.ndarray, title: str) -> None:
        if self.sink is None:
            self.sink = FileSink(self.path, self.fps(), self.size)
        self.sink.write(image, self.frames)
        self.frames += 1

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


class WindowView(ViewSink):
    """An OpenCV window; its title carries the live rates; ``q`` (or Esc) hangs up."""

    NAME = "kpcast"

    def __init__(self) -> None:
        check_view_spec("window")
        cv2.namedWindow(self.NAME, cv2.WINDOW_AUTOSIZE)
        self.title = ""

    def show(self, image: np.ndarray, title: str) -> None:
        cv2.imshow(self.NAME, image[..., ::-1])
        if title != self.title:
            cv2.setWindowTitle(self.NAME, f"kpcast: {title}")
            self.title = title
        if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
            self.quit_requested = True

    def close(self) -> None:
        cv2.destroyWindow(self.NAME)
        cv2.waitKey(1)  # let HighGUI actually take the window down


def check_view_spec(spec: str) -> None:
    """Refuse a ``--sink`` that cannot work at start-up, before models load (SinkError)."""
    if spec == "window":
        if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
            raise SinkError("no display for --sink window (DISPLAY is not set); use --sink file:call.mp4")
        return
    if spec == "null" or (spec.startswith("file:") and len(spec) > 5):
        return
    raise SinkError(f"unknown sink {spec!r}: use {SINKS}")


def make_view(spec: str, size: int, fps: Callable[[], float]) -> ViewSink:
    check_view_spec(spec)
    if spec == "window":
        return WindowView()
    if spec.startswith("file:"):
        return FileView(spec[5:], size, fps)
    return NullView()


# ---------------------------------------------------------------------------------------- the view

class CallView:
    """The latest picture of each side, composed and shown whenever the other side's changes (or, while it
    is stale, when one's own does). Runs on the event loop: every call here is a few milliseconds."""

    def __init__(self, sink: ViewSink, layout: Layout, counters: Callable[[], Counters],
                 rates_every_s: float = 0.5) -> None:
        self.sink = sink
        self.layout = layout
        self.counters = counters
        self.rates = LiveRates()
        self.rates_every_s = rates_every_s
        self.text = "connecting"
        self._text_at = -1e9
        self._local: np.ndarray | None = None
        self._remote: np.ndarray | None = None
        self._remote_at = -1e9
        self.first_remote = asyncio.Event()  # the other side's face was shown once
        self.quit = asyncio.Event()  # the person asked to hang up (``q`` in the window)
        self.shown = 0
        self.failed = 0

    def local(self, image: np.ndarray) -> None:
        """One's own captured (framed) picture."""
        self._local = image
        if time.monotonic() - self._remote_at > REMOTE_STALE_S:
            self._show()

    def remote(self, image: np.ndarray) -> None:
        """A picture of the other side, as rendered."""
        self._remote, self._remote_at = image, time.monotonic()
        if not self.first_remote.is_set():
            log.info("call up: showing the other side")
            self.first_remote.set()
        self._show()

    def _show(self) -> None:
        now = time.monotonic()
        if now - self._text_at >= self.rates_every_s:
            self.text, self._text_at = self.rates.update(now, self.counters()), now
        try:
            self.sink.show(compose(self._remote, self._local, self.layout, self.text), self.text)
        except Exception:  # a broken display must not break the call; it ends when the person hangs up
            self.failed += 1
            if self.failed == 1:  # once: this runs for every frame
                log.exception("could not show the picture")
            return
        self.shown += 1
        if self.sink.quit_requested and not self.quit.is_set():
            log.info("hang-up asked in the window")
            self.quit.set()

    def close(self) -> None:
        try:
            self.sink.close()
        except Exception:  # the call's stats matter more than a last frame of the recording
            log.exception("could not close the view")
