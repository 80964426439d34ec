"""Headless Chromium for the browser sender page: a fake camera made from a clip, and the page driver.

- :func:`write_y4m`: frames -> a Y4M file, what ``--use-file-for-fake-video-capture`` plays (looped)
  as the camera; :func:`fake_camera_frames` places the bundled 256 x 256 face clip in a larger,
  webcam-like picture so the page's face framing has something to find.
- :func:`run_page`: ``bench/chromium_drive.mjs`` (playwright-core, pinned in package.json) opens a
  URL in ``/usr/bin/chromium``, optionally inside a network namespace (Chromium does not use
  loopback ICE candidates, so a call needs a real interface), waits for the page's state and
  returns ``window.kpcast`` as a dict.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
DRIVER = ROOT / "bench" / "chromium_drive.mjs"
# the fake camera: the 256 x 256 clip enlarged to 400 x 400 in a 640 x 480 frame, off centre
CAMERA_SIZE = (640, 480)
FACE_PLACE = (200, 40, 400)  # x0, y0, side of the clip in the camera frame


def available() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is absent (.ci/setup.sh installs chromium)"
    if shutil.which("node") is None:
        return "node is absent (.ci/setup.sh installs nodejs)"
    for pkg in ("playwright-core", "onnxruntime-web", "@msgpack/msgpack"):
        if not (ROOT / "node_modules" / pkg).exists():
            return f"node_modules/{pkg} is missing (.ci/setup.sh runs npm ci)"
    return None


def fake_camera_frames(clip: np.ndarray, size: tuple[int, int] = CAMERA_SIZE,
                       place: tuple[int, int, int] = FACE_PLACE) -> np.ndarray:
    """(T, H, W, 3) RGB frames: each clip frame resized into ``place`` on a grey background."""
    w, h = size
    x0, y0, s = place
    out = np.full((len(clip), h, w, 3), 96, np.uint8)
    for i, f in enumerate(clip):
        out[i, y0:y0 + s, x0:x0 + s] = cv2.resize(f, (s, s), interpolation=cv2.INTER_CUBIC)
    return out


def write_y4m(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """RGB frames -> a 4:2:0 Y4M file (even width and height)."""
    path = Path(path)
    t, h, w = frames.shape[:3]
    if h % 2 or w % 2:
        raise ValueError("Y4M 4:2:0 needs an even width and height")
    with path.open("wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            f.write(b"FRAME\n")
            f.write(cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420).tobytes())
    return path


def read_y4m(path: str | Path) -> np.ndarray:
    """A Y4M file written by :func:`write_y4m` -> (T, H, W, 3) RGB (what the fake camera shows)."""
    data = Path(path).read_bytes()
    header, rest = data.split(b"\n", 1)
    fields = {p[:1]: p[1:] for p in header.split()[1:]}
    w, h = int(fields[b"W"]), int(fields[b"H"])
    n = w * h * 3 // 2
    frames, pos = [], 0
    while pos < len(rest):
        assert rest[pos:pos + 6] == b"FRAME\n"
        pos += 6
        yuv = np.frombuffer(rest[pos:pos + n], np.uint8).reshape(h * 3 // 2, w)
        frames.append(cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420))
        pos += n
    return np.stack(frames)


@dataclass
class PageRun:
    """What the page said when the driver stopped (``window.kpcast``), plus the driver's own notes."""

    state: str | None
    error: str | None
    error_kind: str | None
    warning: str | None
    stats: dict
    square: list[int] | None
    detector: dict | None
    isolated: bool | None
    samples: list[dict] | None = None
    evaluated: object = None
    timed_out: bool = False
    console: list[str] = field(default_factory=list)
    remote: dict | None = None  # the call page's (/call) counters of the other side's stream


def chromium_args(fake_video: Path | None = None, fake_camera: bool = True, auto_accept: bool = True,
                  secure_origin: str | None = None) -> list[str]:
    """Flags for headless Chromium as root in a container, with a fake camera."""
    args = ["--no-sandbox", "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
            # a backgrounded headless tab must keep its timers and video frames at full rate
            "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows"]
    if fake_camera:
        args.append("--use-fake-device-for-media-stream")
        if fake_video is not None:
            args.append(f"--use-file-for-fake-video-capture={fake_video}")
    if auto_accept:
        args.append("--use-fake-ui-for-media-stream")
    if secure_origin:  # a receiver on a LAN address over plain http (a browser needs a secure page for the camera)
        args.append(f"--unsafely-treat-insecure-origin-as-secure={secure_origin}")
    return args


@dataclass
class Page:
    """One page for the driver to open (in a fresh browser context) and wait on."""

    url: str
    wait_for: tuple[str, ...] = ("ended", "error")
    timeout_s: float = 60.0
    screenshot: tuple[Path, int] | None = None  # (path, after this many captured frames)
    evaluate: str | None = None  # a JavaScript expression to evaluate (awaited) once the page runs
    samples: bool = False
    grant_camera: str | None = None  # an origin to grant the camera to (without the fake-UI flag)

    def job(self) -> dict:
        return {"url": self.url, "waitFor": list(self.wait_for), "timeoutMs": int(self.timeout_s * 1000),
                "evaluate": self.evaluate, "collectSamples": self.samples, "grantCamera": self.grant_camera,
                "screenshot": ({"path": str(self.screenshot[0]), "afterFrames": self.screenshot[1]}
                               if self.screenshot else None)}


def run_pages(pages: list[Page], args: list[str], netns: str | None = None) -> list[PageRun]:
    """Open each page in turn in one headless Chromium (one start-up for them all)."""
    job = {"executable": str(CHROMIUM), "args": args, "pages": [p.job() for p in pages]}
    cmd = ["node", str(DRIVER), json.dumps(job)]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         timeout=sum(p.timeout_s for p in pages) + 30)
    if res.returncode != 0:
        raise RuntimeError(f"the page driver failed ({res.returncode}): {res.stderr[-3000:]}")
    return [PageRun(d.get("state"), d.get("error"), d.get("errorKind"), d.get("warning"), d.get("stats") or {},
                    d.get("square"), d.get("detector"), d.get("isolated"), d.get("samples"), d.get("evaluated"),
                    d.get("timedOut", False), d.get("console", []),
                    d.get("remote")) for d in json.loads(res.stdout)]


def run_page(url: str, args: list[str], netns: str | None = None, **page: object) -> PageRun:
    """Open one page (see :class:`Page` for the options) and wait until its state is one of ``wait_for``."""
    return run_pages([Page(url, **page)], args, netns)[0]
