"""Browser viewer: a real call, then MJPEG over HTTP and the page in headless Chromium."""

from __future__ import annotations

import hashlib
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.live import active_calls, free_port, get, kill, start_sender, wait_for
from tests.procs import start_receiver, stop

TOKEN = "v13wer"
CHROMIUM = Path("/usr/bin/chromium")
SENDER_FPS = 20  # tests.live.start_sender's rate


@pytest.fixture(scope="module")
def live_call(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path, demo_clip: Path) -> Iterator[int]:
    """A receiver (with a token) hosting one call that keeps going until the module is done."""
    tmp = tmp_path_factory.mktemp("viewer")
    port = free_port()
    recv = start_receiver(["--port", str(port), "--weights", str(tiny_weights), "--token", TOKEN],
                          log_path=tmp / "receiver.log")
    # --tolerance 0: the tiny random model barely moves its keypoints, and the predictive default would
    # (rightly) show the same picture for most frames; here the viewer must show a moving call
    sender = start_sender(port, tiny_weights, demo_clip, "--token", TOKEN, "--tolerance", "0",
                          log_path=tmp / "sender.log")
    try:
        wait_for(lambda: any(c["frames_rendered"] > 5 for c in active_calls(port, TOKEN)), 40,
                 "the call to render frames")
        yield port
    finally:
        kill(sender)
        recv.terminate()
        stop(recv)


def read_mjpeg(url: str, n: int, timeout_s: float = 20.0) -> tuple[list[bytes], float]:
    """The first ``n`` JPEG parts of a multipart stream and the seconds parts 2..n took."""
    frames: list[bytes] = []
    t_first = None
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        assert r.headers.get_content_type() == "multipart/x-mixed-replace"
        boundary = r.headers.get_param("boundary")
        while len(frames) < n:
            line = r.readline()
            if not line:
                raise AssertionError("stream ended")
            if line.strip() != f"--{boundary}".encode():
                continue
            headers = {}
            while (h := r.readline().strip()):
                k, v = h.decode().split(":", 1)
                headers[k.strip().lower()] = v.strip()
            assert headers["content-type"] == "image/jpeg"
            frames.append(r.read(int(headers["content-length"])))
            if len(frames) == 2:
                t_first = time.monotonic()
    return frames, time.monotonic() - t_first


def test_mjpeg_stream_has_moving_frames_for_several_viewers(live_call: int) -> None:
    port = live_call
    url = f"http://127.0.0.1:{port}/video.mjpg"
    assert get(url)[0] == 401  # the token protects the picture, not just the stats
    results: dict[int, tuple[list[bytes], float]] = {}

    def viewer(i: int) -> None:
        results[i] = read_mjpeg(f"{url}?token={TOKEN}", 12)

    threads = [threading.Thread(target=viewer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(results) == {0, 1}, "a viewer got no frames"
    for frames, seconds in results.values():
        # the first part is a placeholder (or the latest frame); the rest are rendered call frames
        imgs = [cv2.imdecode(np.frombuffer(f, np.uint8), cv2.IMREAD_COLOR) for f in frames]
        assert all(img is not None and img.shape == (64, 64, 3) for img in imgs)
        distinct = {hashlib.sha256(f).hexdigest() for f in frames[1:]}
        assert len(distinct) >= 8, f"only {len(distinct)} distinct frames of {len(frames) - 1}: the call is not moving"
        # never faster than the call's frame rate (10 intervals at 20 fps = 0.5 s, allow timer slack)
        assert seconds >= 10 / SENDER_FPS * 0.8
    # the page and the stats it polls, with the token from the query string
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as r:
        page = r.read().decode()
    assert "video.mjpg" in page and "stats" in page
    assert "http://" not in page and "https://" not in page  # no external assets or CDNs
    status, stats = get(f"http://127.0.0.1:{port}/stats?token={TOKEN}")
    assert status == 200 and stats["active"][0]["frames_rendered"] > 0
    assert get(f"http://127.0.0.1:{port}/stats?token=nope")[0] == 401


def chromium(profile: Path, *args: str, timeout_ms: int = 3000) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=900,700",
           f"--timeout={timeout_ms}",  # an MJPEG stream never finishes loading: stop after this, then shoot/dump
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=45)


def screenshot(url: str, out: Path, profile: Path) -> np.ndarray:
    res = chromium(profile, f"--screenshot={out}", url)
    assert out.exists(), f"chromium wrote no screenshot (rc {res.returncode}): {res.stderr[-1500:]}"
    img = cv2.imread(str(out))
    assert img is not None and img.shape[:2] == (700, 900)
    return img.astype(np.int16)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (.ci/setup.sh installs it via apt)")
def test_page_in_headless_chromium_shows_moving_video(live_call: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{live_call}/?token={TOKEN}"
    for i in range(3):  # a cold Chromium may shoot before the first frame has arrived: retry then
        a = screenshot(url, tmp_path / "a.png", tmp_path / f"profile_a{i}")
        if a[40:600, 0:540].std() > 10:
            break
    time.sleep(1.0)
    b = screenshot(url, tmp_path / "b.png", tmp_path / "profile_b")
    # the <img> is 512x512 at the top left, under the title (16 px margins + a ~40 px heading)
    va, vb = a[40:600, 0:540], b[40:600, 0:540]
    assert va.std() > 10, "the video region is flat: no picture (placeholder or nothing) was shown"
    assert np.abs(va - vb).mean() > 0.5, "two screenshots a second apart show the same picture"
    # the page's script polled /stats (with the token) and filled in the live call's numbers; a cold
    # Chromium may dump the DOM before the first poll has answered, so give it three tries
    for i in range(3):
        # (a loaded machine starts Chromium slowly and answers /stats late: give the page's
        # once-a-second poll more turns on each try, 5, 10, then 20 s)
        dom = chromium(tmp_path / f"profile_dom{i}", "--dump-dom", url, timeout_ms=5000 * 2 ** i).stdout
        if '<div id="status">live</div>' in dom:
            break
    status = re.search(r'<div id="status">(.*?)</div>', dom)
    assert '<div id="status">live</div>' in dom, (status and status.group(1), dom[-1500:])
    assert '<td class="v" id="fps">-</td>' not in dom
    # the predictive stream's cost (the sender's default codec) is filled in too
    assert '<td class="v" id="msgs">-</td>' not in dom and '<td class="v" id="keys">-</td>' not in dom
