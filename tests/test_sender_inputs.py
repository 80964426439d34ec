"""Sender conveniences: --list-cameras and --source-image (arrives byte-identical in a real call)."""

from __future__ import annotations

import glob
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.harness import ROOT, free_port
from tests.procs import env, run_sender, sender_main, start_receiver, stop

pytestmark = pytest.mark.call  # real receiver and sender processes


def test_list_cameras_says_clearly_when_there_are_none() -> None:
    res = subprocess.run([sys.executable, "-m", "sender", "--list-cameras"], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    if glob.glob("/dev/video*"):
        assert "camera " in res.stdout or "no cameras found" in res.stdout
    else:
        assert res.stdout.strip() == "no cameras found (probed indices 0-9); use --video PATH to stream a file"


def test_source_image_arrives_byte_identical(tmp_path: Path, tiny_weights: Path, demo_clip: Path) -> None:
    # a PNG (not what the sender would make from a frame) of another size than the model's
    img = np.zeros((90, 120, 3), np.uint8)
    img[:, :60] = (0, 200, 255)
    img[30:60] = 255
    picture = tmp_path / "face.png"
    cv2.imwrite(str(picture), img)
    port = free_port()
    recv = start_receiver(["--port", str(port), "--weights", str(tiny_weights), "--stats-dir", str(tmp_path),
                           "--stop-after-calls", "1"], log_path=tmp_path / "receiver.log")
    try:
        res = run_sender(["--receiver", f"http://127.0.0.1:{port}", "--video", str(demo_clip), "--weights",
                          str(tiny_weights), "--max-frames", "20", "--source-image", str(picture),
                          "--stats-json", str(tmp_path / "sender.json")])
        assert res.returncode == 0, res.stderr[-2000:]
    finally:
        assert stop(recv) == 0, (tmp_path / "receiver.log").read_text()[-2000:]
    got = json.loads((tmp_path / "call_1.json").read_text())
    sent = json.loads((tmp_path / "sender.json").read_text())
    want = hashlib.sha256(picture.read_bytes()).hexdigest()
    assert got["source_sha256"] == sent["source_sha256"] == want
    assert got["source_image_bytes"] == picture.stat().st_size and got["source_images"] == 1
    assert got["frames_rendered"] > 0


def test_source_image_that_is_not_a_picture_is_a_clear_error(tmp_path: Path, tiny_weights: Path,
                                                             demo_clip: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not a picture")
    rc, err = sender_main(["--receiver", "http://127.0.0.1:9", "--video", str(demo_clip), "--weights",
                           str(tiny_weights), "--source-image", str(bad)])
    assert rc == 2
    assert "not a picture OpenCV can decode" in err
    # a missing file is refused by the same check, on the same way out (exit 2 and the message, as above)
    from sender.capture import CaptureError
    from sender.inputs import read_source_image

    with pytest.raises(CaptureError, match="source image not found"):
        read_source_image(tmp_path / "missing.jpg")


def test_source_image_a_receiver_would_refuse_is_a_clear_error(tmp_path: Path) -> None:
    from sender.capture import CaptureError
    from sender.inputs import read_source_image

    big = tmp_path / "big.jpg"  # decodes fine here, but over the receivers' pixel limit
    cv2.imwrite(str(big), np.zeros((2100, 2100, 3), np.uint8))
    bmp = tmp_path / "pic.bmp"  # a format receivers do not decode
    cv2.imwrite(str(bmp), np.zeros((20, 20, 3), np.uint8))
    for path in (big, bmp):
        with pytest.raises(CaptureError, match="a receiver accepts"):
            read_source_image(path)
    ok = tmp_path / "ok.png"
    cv2.imwrite(str(ok), np.zeros((20, 30, 3), np.uint8))
    assert read_source_image(ok) == ok.read_bytes()


def test_a_file_resynced_after_a_hold_plays_on_in_real_time(demo_clip: Path) -> None:
    import asyncio
    import time

    from sender.capture import CaptureConfig, FrameSource

    src = FrameSource(CaptureConfig(None, str(demo_clip), 30.0, 64, False, 6, False))

    async def main() -> list[float]:
        times = []
        async for f in src.frames():
            times.append(time.monotonic())
            if f.seq == 0:
                await asyncio.sleep(0.3)  # the sender waits for the receiver
                src.resync()
        return times

    t = asyncio.run(main())
    src.close()
    # after the hold the frames keep their period instead of bursting to catch up with the clock: without the
    # resync the 5 frames after the hold are all overdue and come within a few ms. Measured as the span of
    # the 5, not each gap: on a loaded machine a decode stalled right after the hold delays one frame and
    # the next ones catch up with the period (a loaded suite saw gaps of 0.5, 0.6, 9 and 34 ms: 44 ms)
    assert len(t) == 6 and t[-1] - t[1] > 0.25 * 4 / 30, np.diff(t)
