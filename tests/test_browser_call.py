"""The browser call page (GET /call) in headless Chromium against a real ``python -m kpcast call --listen``.

The listening side runs in network namespace ``a`` with the bundled clip as its camera; Chromium runs in
``b`` (Chromium does not use loopback ICE candidates) with a fake camera playing the same clip off centre.
One peer connection carries both faces: the page sends its face as the sender page does, and renders the
other side's in the page from the keypoints it receives (the 64 x 64 graph on onnxruntime-web); the
Python side renders the browser's. The page hangs up after FRAMES of its own frames.

Margins are for a loaded 2-core machine: the page's WASM renders ~5-10 frames a second beside its own
detector, so it is asked for a handful of rendered, distinct pictures, not a rate.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench import chromium
from bench.chromium import chromium_args, fake_camera_frames, run_page, write_y4m
from models.data import read_clip
from models.fomm.io import WEIGHTS_DIR
from tests.harness import ROOT
from tests.procs import env, stop
from tests.utils import needs_netns

pytestmark = [needs_netns, pytest.mark.skipif(chromium.available() is not None, reason=str(chromium.available())),
              pytest.mark.call]

TOKEN = "br0wser-call"
PORT = 8080
FPS = 6  # the page's camera: a browser that detects and renders on a loaded 2-core machine keeps up
FRAMES = 90  # the page's own frames before it hangs up (15 s of camera)
PYTHON_FPS = 10
READY = "kpcast: waiting for a call"
START_S = 120.0


def _start_listener(h, args: list[str], log: Path) -> subprocess.Popen:
    proc = h.popen("a", [sys.executable, "-m", "kpcast", "call", *args], cwd=ROOT, env=env(),
                   stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stdout.readline() if ready else ""
        if READY in line:
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the listening side did not start: {log.read_text()[-2000:]}")


def test_browser_call_page_against_kpcast_listen(tmp_path: Path, demo_clip: Path) -> None:
    from bench.netns import two_hosts

    camera = write_y4m(tmp_path / "camera.y4m", fake_camera_frames(read_clip(demo_clip)), FPS)
    stats = tmp_path / "listen.json"
    with two_hosts() as h:
        origin = f"http://{h.addr_a}:{PORT}"
        listener = _start_listener(h, [
            "--listen", "--host", h.addr_a, "--port", str(PORT), "--token", TOKEN, "--video", str(demo_clip),
            "--loop", "--fps", str(PYTHON_FPS), "--weights", str(WEIGHTS_DIR / "fomm_face64.pt"), "--framing",
            "centre", "--refresh", "off", "--playout", "immediate", "--threads", "1", "--sink", "null",
            "--stats-json", str(stats)], tmp_path / "listen.log")
        try:
            page = run_page(f"{origin}/call?token={TOKEN}&autostart=1&frames={FRAMES}",
                            chromium_args(camera, secure_origin=origin), netns=h.b, timeout_s=240,
                            screenshot=(tmp_path / "call_page.png", FRAMES // 2))
            rc = stop(listener, 60)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()
    log = (tmp_path / "listen.log").read_text()[-3000:]
    assert page.state == "ended" and page.error is None, (page.state, page.error, page.console[-20:], log)
    remote = page.remote
    assert remote is not None and remote["hello"] is not None, (remote, page.console[-20:])
    # the other side's face, rendered in the page: its source image bound, frames rendered, and moving
    assert remote["source_images"] >= 1, remote
    assert remote["frames_rendered"] >= 15, {k: v for k, v in remote.items() if k != "picture_means"}
    means = np.asarray(remote["picture_means"])
    assert 20 < means.mean() < 235, "the rendered face is blank"
    assert len(np.unique(np.round(means, 2))) >= 5, f"the rendered pictures hardly change: {means[:20]}"
    # the browser's own half reached the Python side, which rendered it
    assert rc == 0, log
    got = json.loads(stats.read_text())
    assert got["ended_by"] == "remote", got["end_reason"]
    assert got["received"]["frames_rendered"] >= 20, got["received"]
    assert got["sent"]["frames_captured"] > 0 and page.stats["frames_captured"] >= FRAMES


def test_the_page_notices_a_vanished_side(tmp_path: Path, demo_clip: Path) -> None:
    """The listening side is killed (SIGKILL: no Bye) mid-call; the page ends the call within seconds (its watchdog:
    1.5 s of silence), not when the connection's consent checks give up."""
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from bench.netns import two_hosts

    camera = write_y4m(tmp_path / "camera.y4m", fake_camera_frames(read_clip(demo_clip)), FPS)
    log_path = tmp_path / "listen.log"
    with two_hosts() as h, ThreadPoolExecutor(1) as pool:
        origin = f"http://{h.addr_a}:{PORT}"
        listener = _start_listener(h, [
            "--listen", "--host", h.addr_a, "--port", str(PORT), "--token", TOKEN, "--video", str(demo_clip),
            "--loop", "--fps", str(PYTHON_FPS), "--weights", str(WEIGHTS_DIR / "fomm_face64.pt"), "--framing",
            "centre", "--refresh", "off", "--playout", "immediate", "--threads", "1", "--sink", "null"], log_path)
        try:
            fut = pool.submit(run_page, f"{origin}/call?token={TOKEN}&autostart=1&frames=100000",
                              chromium_args(camera, secure_origin=origin), netns=h.b, timeout_s=180)
            deadline = time.monotonic() + 150
            while "call up" not in log_path.read_text() and time.monotonic() < deadline and not fut.done():
                time.sleep(0.2)
            assert "call up" in log_path.read_text(), log_path.read_text()[-2000:]
            time.sleep(4.0)  # the page has the other side's Hello and stream
            killed_at = time.time()
            os.kill(listener.pid, signal.SIGKILL)
            page = fut.result()
        finally:
            if listener.poll() is None:
                listener.kill()
            listener.wait()
    remote = page.remote
    assert page.state == "ended" and remote is not None, (page.state, page.error, page.console[-20:])
    assert "silent" in (remote["end_reason"] or ""), remote["end_reason"]
    noticed_s = remote["ended_at_ms"] / 1000 - killed_at
    assert 0.5 < noticed_s < 4.0, noticed_s  # 1.5 s of silence after its last message, plus the page's busy moments
