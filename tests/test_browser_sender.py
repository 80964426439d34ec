"""The browser sender (GET /send) in headless Chromium, calling a real receiver across network namespaces.

Chromium does not use loopback ICE candidates, so the receiver listens in namespace ``a`` and
Chromium runs in ``b`` with a fake camera playing the bundled face clip (placed off centre in a
640 x 480 picture, so the page's face framing has to find it). The receiver's model has the
shipped keypoint detector (the page runs it, and the face framing needs real keypoints) and a
tiny random renderer, so rendering keeps up on a loaded 2-core machine.

- a call: every captured frame reaches the receiver (sent or predicted), most are shown (rendered, or
  the same picture again for the same keypoints; how many is the loaded CPU's timing, so >= half), the
  source image arrives byte for byte, and the page's and the receiver's counts add up;
- the browser's keypoints match the Python detector's on the same fake-camera frames;
- the bad cases the page explains: wrong token, detector mismatch, receiver unreachable, no
  camera, camera refused, no face.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bench import chromium
from bench.chromium import Page, PageRun, chromium_args, fake_camera_frames, read_y4m, run_page, run_pages, write_y4m
from models.data import read_clip
from models.fomm.export import code_id, onnx_session
from models.fomm.io import WEIGHTS_DIR, detector_id, load_motion_model, save_motion_model
from models.fomm.model import MotionModel
from sender.framing import crop_square
from tests.harness import DEMO_CLIP, ROOT, wait_for
from tests.procs import start_receiver, stop
from tests.utils import needs_netns

pytestmark = [needs_netns, pytest.mark.skipif(chromium.available() is not None, reason=str(chromium.available())),
              pytest.mark.call]  # chromium and receivers in network namespaces

TOKEN = "br0wser"
PORT, OTHER_PORT = 8080, 8081
# The fake camera plays the clip's frames at 6 fps: slow enough that a browser and a receiver sharing a
# loaded 2-core machine keep up with every frame (the receiver's immediate playout skips to the newest
# frame when more than 3 wait: rendering stalls, not the browser's stream); bench.browser measures 25 fps.
FRAMES = 60
FPS = 6
SAMPLES = 24  # detector inputs the page keeps (the last ones of the call)


@pytest.fixture(scope="module")
def browser_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped detector under a tiny random renderer (same fingerprint, fast to render)."""
    shipped, _ = load_motion_model(WEIGHTS_DIR / "fomm_face64.pt")
    cfg = type(shipped.config).from_dict({**shipped.config.to_dict(), "dm_block_expansion": 8, "dm_max_features": 32,
                                          "dm_num_blocks": 3, "gen_block_expansion": 8, "gen_max_features": 32,
                                          "gen_num_bottleneck_blocks": 1})
    torch.manual_seed(0)
    model = MotionModel(cfg)
    model.kp_detector.load_state_dict(shipped.kp_detector.state_dict())
    path = tmp_path_factory.mktemp("browser_weights") / "shipped_detector_tiny_renderer.pt"
    save_motion_model(path, model, {"model_id": "browser-test"})
    assert detector_id(load_motion_model(path)[0]) == detector_id(shipped)
    return path


@pytest.fixture(scope="module")
def camera(tmp_path_factory: pytest.TempPathFactory, demo_clip: Path) -> Path:
    return write_y4m(tmp_path_factory.mktemp("camera") / "camera.y4m", fake_camera_frames(read_clip(demo_clip)), FPS)


@dataclass
class Receivers:
    hosts: object
    tmp: Path
    page: str  # the page's URL (receiver A: shipped detector, token)
    other: str  # receiver B: another detector, no token, allows A's origin

    def args(self, **kw: object) -> list[str]:
        return chromium_args(secure_origin=self.page.split("/send")[0], **kw)


@pytest.fixture(scope="module")
def receivers(tmp_path_factory: pytest.TempPathFactory, browser_weights: Path,
              tiny_weights: Path) -> Iterator[Receivers]:
    from bench.netns import two_hosts

    tmp = tmp_path_factory.mktemp("browser")
    with two_hosts() as h:
        origin = f"http://{h.addr_a}:{PORT}"
        # This test holds the browser's stream to every frame, not the receiver's scheduling: immediate
        # playout (the clock playout's deadlines are the playout tests' subject, and a CPU-starved browser
        # sends some frames late), eager rendering (the ONNX renderer is built when the source image
        # arrives, seconds on a loaded machine, and frames queued meanwhile are skipped to the newest)
        args_a = ["--host", h.addr_a, "--port", str(PORT), "--weights", str(browser_weights), "--token", TOKEN,
                  "--playout", "immediate", "--eager-render", "--threads", "1", "--stats-dir", str(tmp / "a")]
        args_b = ["--host", h.addr_a, "--port", str(OTHER_PORT), "--weights", str(tiny_weights), "--cors-origin",
                  origin, "--stats-dir", str(tmp / "b")]
        with ThreadPoolExecutor(2) as pool:  # both start at once: each spends seconds importing torch
            fa = pool.submit(start_receiver, args_a, netns=h.a, log_path=tmp / "receiver_a.log")
            fb = pool.submit(start_receiver, args_b, netns=h.a, log_path=tmp / "receiver_b.log")
            a, b = fa.result(), fb.result()
        try:
            yield Receivers(h, tmp, f"{origin}/send", f"http://{h.addr_a}:{OTHER_PORT}")
        finally:
            a.terminate()
            b.terminate()
            stop(a)
            stop(b)


@pytest.fixture(scope="module")
def call(receivers: Receivers, camera: Path) -> tuple[PageRun, dict]:
    r = receivers
    url = f"{r.page}?token={TOKEN}&autostart=1&frames={FRAMES}&samples={SAMPLES}"
    page = run_page(url, r.args(fake_video=camera), netns=r.hosts.b, timeout_s=120, samples=True,
                    screenshot=(r.tmp / "page_mid_call.png", FRAMES // 2))
    path = r.tmp / "a" / "call_1.json"
    wait_for(path.exists, 15, "the receiver to write the call's stats")
    return page, json.loads(path.read_text())


def test_call_from_a_browser(call: tuple[PageRun, dict], receivers: Receivers) -> None:
    page, got = call
    st = page.stats
    assert page.state == "ended" and page.error is None, (page.state, page.error, page.console[-10:])
    assert page.detector["backend"] in ("wasm", "webgpu") and page.isolated, page.detector
    assert (receivers.tmp / "page_mid_call.png").exists()
    # the page's framing found the face the fake camera shows (off centre) and framed it like the training
    # clips: dlib's face box (sender/framing.py's detector) inside the square, the side ~1.9x the face width
    # (the keypoint-derived box and dlib's HOG box differ by some pixels, and both follow the moving head)
    x0, y0, side = page.square
    left, top, right, bottom = _dlib_box(read_clip(DEMO_CLIP)[0])
    slack = 0.05 * side
    assert x0 - slack <= left and right <= x0 + side + slack and y0 - slack <= top and bottom <= y0 + side + slack, \
        (page.square, (left, top, right, bottom))
    want = min(1.9 * (right - left), chromium.CAMERA_SIZE[1])
    assert abs(side - want) <= 0.2 * want, (page.square, want)  # seen: 424-471 for 480
    # the Hello named the page's detector, which is the receiver's
    assert got["hello"]["model"] == page.detector["id"] and got["hello"]["codec"] == "PRED"
    assert got["end_reason"].startswith("bye") or got["end_reason"] == "connection closed", got["end_reason"]
    # every captured frame went out (sent or predicted), and a clean link delivered all of them
    assert st["frames_captured"] == FRAMES
    assert st["frames_sent"] + st["frames_skipped"] == FRAMES and st["kp_dropped"] == 0
    assert got["frames_received"] == FRAMES and got["frames_rejected"] == 0, got["rejected_by_reason"]
    assert got["frames_skipped"] == st["frames_skipped"] and got["keyframes_received"] == st["keyframes_sent"]
    assert got["keypoint_messages"] == st["messages_sent"]
    assert got["keypoint_message_bytes"] == st["keypoint_message_bytes"]
    assert got["keypoint_payload_bytes"] == st["keypoint_payload_bytes"]
    # frames shown: rendered, or the last picture shown again for a frame whose keypoints equal the last
    # ones (a skipped frame predicted by "repeat the last", or a zero residual sent after max_gap skips).
    # How many is the receiver's CPU time, not delivery: the immediate playout drops what it can't render
    # in time (a CI run with Chromium on the same 2 cores showed 50 of 60, unloaded runs 57-60), so the
    # count only has to hold at half speed, and every received frame is accounted for at most once.
    shown = got["frames_rendered"] + got["frames_repeated"]
    assert shown + got["frames_dropped"] + got["frames_old_image"] <= got["frames_received"], got
    assert shown >= 0.5 * FRAMES, got
    assert got["frames_rendered"] >= 0.5 * st["frames_sent"], got
    # the source image, byte for byte
    assert got["source_sha256"] == st["source_sha256"] and got["source_image_bytes"] == st["source_image_bytes"]
    assert st["source_images_sent"] == 1 + st["framing_reframes"] + st["source_requests"]
    print(f"browser call: {st['frames_captured']} frames captured, {got['frames_received']} received, "
          f"{got['frames_rendered']} rendered + {got['frames_repeated']} repeated, {st['messages_sent']} messages "
          f"({st['keypoint_message_bytes'] / FRAMES:.1f} B/frame), square {page.square}, "
          f"detector {np.median(st['detect_ms']):.0f} ms p50")
    # the predictive stream really predicted (a talking head is mostly predictable)
    assert 0 < st["frames_skipped"] < FRAMES and st["keyframes_sent"] >= 1


def _dlib_box(frame: np.ndarray) -> tuple[int, int, int, int]:
    """dlib's face box (sender/framing.py's detector) on the fake camera's picture of ``frame``."""
    from models.landmarks import FaceLandmarks

    box = FaceLandmarks().detect(fake_camera_frames(frame[None])[0], 0)
    assert box is not None
    return box


# Keypoints in [-1, 1] units (1/128 = 1 px at 256 x 256). The page's input and Python's differ by
# Chromium's YUV -> RGB conversion of the fake camera (a level or two per pixel); through the
# detector that moves keypoints by a fraction of a pixel. The same input gives the same keypoints
# to float precision (onnxruntime-web WASM vs ONNX Runtime on this CPU).
# Measured (2026-12, Chromium 156): 9e-6 on the same input; 0.06 levels of pixel difference, keypoints
# 0.01 px mean / 0.11 px worst at 256, Jacobian entries 0.003 worst.
SAME_INPUT_TOL = 1e-4
COORD_TOL = 1 / 128  # <= 1 px at 256 x 256 (worst keypoint, worst frame)
COORD_MEAN_TOL = 0.25 / 128  # <= 0.25 px on average
JAC_TOL = 0.05  # Jacobian entries, worst one


def test_browser_keypoints_match_python(call: tuple[PageRun, dict], camera: Path) -> None:
    page, _ = call
    samples = page.samples
    assert samples and len(samples) == SAMPLES
    onnx = ROOT / "cache" / "web" / f"detector-{page.detector['id']}-{code_id()}.onnx"
    sess = onnx_session(onnx.read_bytes())
    frames = read_y4m(camera)
    pipeline: dict[tuple, np.ndarray] = {}  # square -> every camera frame through Python's pipeline
    worst_same, coord_err, jac_err, pixel_err = 0.0, [], [], []
    for s in samples:
        x = np.array(s["input"], np.uint8).reshape(64, 64, 3)
        vec = np.array(s["vec"], np.float32)
        # 1. the same pixels: the runtimes agree
        ref = sess.run(None, {"frame": (x.transpose(2, 0, 1)[None] / 255.0).astype(np.float32)})[0][0]
        worst_same = max(worst_same, float(np.abs(ref - vec).max()))
        # 2. the same camera frame through Python's pipeline (crop_square -> 256 -> 64, area filter):
        # the fake camera loops the clip, so find the frame the page saw by its pixels
        square = tuple(s["square"])
        if square not in pipeline:
            pipeline[square] = np.stack([cv2.resize(crop_square(f, square, 256), (64, 64),
                                                    interpolation=cv2.INTER_AREA) for f in frames])
        py = pipeline[square]
        d = np.abs(py.astype(np.int16) - x.astype(np.int16)).mean(axis=(1, 2, 3))
        i = int(np.argmin(d))
        pixel_err.append(float(d[i]))
        want = sess.run(None, {"frame": (py[i].transpose(2, 0, 1)[None] / 255.0).astype(np.float32)})[0][0]
        coord_err.append(np.abs(want[:20] - vec[:20]))
        jac_err.append(float(np.abs(want[20:] - vec[20:]).max()))
    coord_err = np.array(coord_err)
    print(f"same input: {worst_same:.2e}; camera frames: pixels {np.mean(pixel_err):.2f} levels mean, keypoints "
          f"{coord_err.mean() * 128:.2f} px mean / {coord_err.max() * 128:.2f} px worst at 256, "
          f"Jacobian {max(jac_err):.3f}")
    assert worst_same <= SAME_INPUT_TOL
    assert max(pixel_err) < 2, pixel_err  # the matched frame really is the one the page saw
    assert coord_err.max() <= COORD_TOL and coord_err.mean() <= COORD_MEAN_TOL
    assert max(jac_err) <= JAC_TOL


@pytest.fixture(scope="module")
def refused_calls(receivers: Receivers, camera: Path) -> dict[str, PageRun]:
    """Three pages in one Chromium (one start-up): a wrong token, another detector, nobody listening."""
    addr = receivers.other.rsplit(":", 1)[0]
    # (the centre square: no face search before the call, these are about the call)
    queries = {"token": "token=nope&autostart=1&framing=centre",
               # receiver B renders with another detector: the call connects, B reads the Hello and says why it hangs up
               "mismatch": f"receiver={receivers.other}&autostart=1&framing=centre",
               "unreachable": f"receiver={addr}:9&autostart=1&framing=centre"}  # nothing listens on port 9
    runs = run_pages([Page(f"{receivers.page}?{q}", wait_for=("error",), timeout_s=40) for q in queries.values()],
                     receivers.args(fake_video=camera), netns=receivers.hosts.b)
    return dict(zip(queries, runs, strict=True))


def _failed(run: PageRun, kind: str) -> str:
    assert run.state == "error" and run.error_kind == kind, (run.state, run.error_kind, run.error, run.console[-10:])
    return run.error


def test_wrong_token(refused_calls: dict[str, PageRun]) -> None:
    assert "token" in _failed(refused_calls["token"], "token")


def test_detector_mismatch(refused_calls: dict[str, PageRun]) -> None:
    error = _failed(refused_calls["mismatch"], "mismatch")
    assert "detector" in error.lower() and "kp-" in error  # both fingerprints are named


def test_receiver_unreachable(refused_calls: dict[str, PageRun]) -> None:
    assert "reach" in _failed(refused_calls["unreachable"], "unreachable")


def test_no_camera(receivers: Receivers) -> None:
    run = run_page(f"{receivers.page}?autostart=1", receivers.args(fake_camera=False), netns=receivers.hosts.b,
                   wait_for=("error",), timeout_s=40)
    assert "camera" in _failed(run, "nocamera").lower()


def test_camera_refused(receivers: Receivers, camera: Path) -> None:
    run = run_page(f"{receivers.page}?autostart=1", receivers.args(fake_video=camera, auto_accept=False),
                   netns=receivers.hosts.b, wait_for=("error",), timeout_s=40)
    assert "refused" in _failed(run, "refused")


def test_no_face(receivers: Receivers) -> None:
    # Chromium's own fake camera: a moving test pattern, no face in it
    run = run_page(f"{receivers.page}?autostart=1", receivers.args(fake_video=None), netns=receivers.hosts.b,
                   wait_for=("looking for a face", "live", "error"), timeout_s=40)
    assert run.state == "looking for a face" and run.warning == "noface", (run.state, run.error)
    assert run.stats["framing_scans"] >= 1 and run.stats["frames_captured"] == 0


FLOOD = """
import asyncio, sys, time
import aiohttp
from bench.attacks import offer_sdp

async def main(url, token, seconds):
    sdps = [await offer_sdp() for _ in range(4)]
    async with aiohttp.ClientSession() as http:
        end, i = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            async with http.post(url, json={"sdp": sdps[i % 4], "type": "offer"},
                                 headers={"Authorization": "Bearer " + token}) as resp:
                print(resp.status, flush=True)
            i += 1
            await asyncio.sleep(0.25)

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


def test_a_busy_receiver_is_offered_again(receivers: Receivers, browser_weights: Path, camera: Path) -> None:
    """A peer with the token keeps a one-slot receiver busy with answered offers that never connect (4 a
    second, as in #31's probe); the page is refused (503) at first, offers again and gets the call."""
    import subprocess
    import sys

    r, port = receivers, OTHER_PORT + 1
    addr = r.hosts.addr_a
    recv = start_receiver(["--host", addr, "--port", str(port), "--weights", str(browser_weights), "--token", TOKEN,
                           "--max-calls", "1", "--playout", "immediate", "--eager-render", "--threads", "1",
                           "--cors-origin", r.page.split("/send")[0]],
                          netns=r.hosts.a, log_path=r.tmp / "receiver_busy.log")
    flood = r.hosts.popen("b", [sys.executable, "-c", FLOOD, f"http://{addr}:{port}/offer", TOKEN, "300"], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: flood.stdout.readline().strip() == "200", 30, "the flood to take the slot")
        # Whether the page's first offer finds the slot held depends on timing: an unconnected flood offer
        # gives way after ~3-4 s (receiver.server), and an offer that arrives in such a gap is answered at
        # once (busy_offers 0: a slower machine did this once). Nor is the page sure to win the slot when it
        # gives way: the flood offers every 0.25 s, and once (a quiet fresh-clone run) it won every time for
        # the page's 15 s of offers, which ended in "busy". So the page calls until it was refused at least once
        # and then got in; a call that ends otherwise than live or busy fails the test.
        got_in = None
        for _ in range(4):
            run = run_page(f"{r.page}?token={TOKEN}&receiver=http://{addr}:{port}&autostart=1&framing=centre"
                           "&frames=10", r.args(fake_video=camera), netns=r.hosts.b,
                           wait_for=("live", "ended", "error"), timeout_s=60)
            assert run.state in ("live", "ended") or run.error_kind == "busy", (run.state, run.error_kind,
                                                                                 run.error, run.console[-10:])
            if run.state in ("live", "ended") and run.stats["busy_offers"] >= 1:
                got_in = run
                break
    finally:
        flood.kill()
        recv.terminate()
        stop(recv)
    assert got_in is not None, (run.state, run.error_kind, run.stats)  # refused as busy, offered again, got in
