"""Face framing at the sender: the training clips' square on a webcam-like frame, held while the
face stays put, moved (with a new source image) when it leaves, held when no face is seen."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.data import center_square, read_clip
from models.landmarks import FaceLandmarks
from sender.framing import (
    Framer,
    FramingConfig,
    FramingDecision,
    centre_square,
    crop_square,
    dlib_detector,
    face_square,
)
from tests.procs import run_sender, start_receiver, stop

pytestmark = pytest.mark.call  # a real call (receiver and sender processes)

W, H = 640, 480
PASTE = int(0.45 * H)  # the talking head fills 45 % of the frame's height, as a webcam user sitting back
LEFT = (0.30 * W, 0.42 * H)  # left of centre
RIGHT = (0.72 * W, 0.50 * H)  # where the person moves to


@pytest.fixture(scope="module")
def fl() -> FaceLandmarks:
    return FaceLandmarks()


@pytest.fixture(scope="module")
def clip(demo_clip: Path) -> np.ndarray:
    return read_clip(demo_clip, max_frames=60)


def _background() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return np.stack([60 + 80 * xx / W, 90 + 40 * yy / H, 120 + 0 * xx], -1).astype(np.uint8)


def paste(face: np.ndarray, centre: tuple[float, float], bg: np.ndarray | None = None) -> np.ndarray:
    """One 640x480 webcam-like frame with ``face`` (a square clip frame) pasted at ``centre``."""
    out = (_background() if bg is None else bg).copy()
    p = cv2.resize(face, (PASTE, PASTE), interpolation=cv2.INTER_AREA)
    x0, y0 = int(centre[0] - PASTE / 2), int(centre[1] - PASTE / 2)
    out[y0:y0 + PASTE, x0:x0 + PASTE] = p
    return out


def _width_ratio(fl: FaceLandmarks, images: list[np.ndarray]) -> float:
    """Mean dlib face-box width / image width over the images (every one must have a face)."""
    boxes = [fl.detect(im) for im in images]
    assert all(b is not None for b in boxes), f"{sum(b is None for b in boxes)} of {len(boxes)} without a face"
    return float(np.mean([(b[2] - b[0]) / im.shape[1] for b, im in zip(boxes, images, strict=True)]))


def _inline(**kw: object) -> Framer:
    return Framer(FramingConfig(threaded=False, **kw))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- geometry and decisions (no dlib)


def test_face_square_follows_the_training_recipe() -> None:
    face = (300, 200, 400, 320)  # 100 wide, 120 high, centre (350, 260)
    x0, y0, side = face_square(face, (H, W))
    assert side == 190  # 1.9 x the width
    assert (x0 + side / 2, y0 + side / 2) == pytest.approx((350, 260 - 12), abs=1)  # moved up by 10 % of the height
    # near an edge the square slides inside the frame instead of leaving it
    assert face_square((0, 0, 100, 100), (H, W))[:2] == (0, 0)
    x0, y0, side = face_square((560, 380, 640, 480), (H, W))
    assert x0 + side == W and y0 + side == H
    # a face too big for 1.9x is given the largest square the frame has
    assert face_square((100, 50, 400, 400), (H, W))[2] == H
    assert centre_square((H, W)) == (80, 0, 480)


def test_centre_mode_is_the_old_centre_crop(clip: np.ndarray) -> None:
    frame = paste(clip[0], LEFT)
    image, generation = _inline(mode="centre").crop(frame)
    assert np.array_equal(image, center_square(frame, 256)) and generation == 0


def _box(cx: float, cy: float, w: float = 120.0) -> tuple[int, int, int, int]:
    return int(cx - w / 2), int(cy - w * 0.55), int(cx + w / 2), int(cy + w * 0.55)


def test_decision_holds_on_jitter_and_moves_when_the_face_leaves_the_margin() -> None:
    d = FramingDecision(FramingConfig(), (H, W))
    assert d.update(_box(200, 200)) is not None  # the first face frames
    first = d.square
    rng = np.random.default_rng(0)
    for _ in range(100):  # talking-head jitter: a few pixels, a few percent of size
        jitter = rng.uniform(-8, 8, 2)
        assert d.update(_box(200 + jitter[0], 200 + jitter[1], 120 * rng.uniform(0.95, 1.05))) is None
    assert d.square == first
    assert d.update(_box(450, 250)) is None  # one stray box is not enough
    assert d.update(_box(200, 200)) is None and d.square == first
    assert d.update(_box(450, 250)) is None
    moved = d.update(_box(450, 250))  # the second in a row re-frames
    assert moved is not None and moved != first
    assert moved[0] + moved[2] / 2 == pytest.approx(450, abs=2)
    # leaning in (the face grows by more than 1.3x) re-frames too, to a bigger square
    d.update(_box(450, 250, 170))
    grown = d.update(_box(450, 250, 170))
    assert grown is not None and grown[2] > moved[2] * 1.3


def test_no_reframe_when_the_square_would_not_change() -> None:
    """A pre-cropped clip (face wider than 1/1.9 of the frame): every square is the whole frame, so a
    moving face must not cost a new source image."""
    d = FramingDecision(FramingConfig(), (256, 256))
    assert d.update(_box(128, 128, 150)) == (0, 0, 256)
    for _ in range(3):
        assert d.update(_box(60, 128, 150)) is None
    assert d.square == (0, 0, 256)


def test_decision_without_a_face_holds_the_square_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    d = FramingDecision(FramingConfig(), (H, W))
    d.update(_box(200, 200))
    square = d.square
    with caplog.at_level(logging.WARNING, logger="sender.framing"):
        for _ in range(20):
            assert d.update(None) is None
    assert d.square == square and d.no_face == 20 and d.face_lost
    assert sum("no face" in r.getMessage() for r in caplog.records) == 1
    assert d.update(_box(205, 200)) is None and not d.face_lost  # back, inside the margin: same square


def test_detection_never_holds_up_a_frame(clip: np.ndarray) -> None:
    """A detection that takes forever: every frame is still cropped (with the square in force)."""
    release, calls = threading.Event(), []

    def slow_detector(frame: np.ndarray) -> tuple[int, int, int, int]:
        calls.append(frame.shape)
        assert release.wait(30), "the test never released the detector"
        return _box(0.72 * W, 0.5 * H, 110)

    framer = Framer(FramingConfig(detect_every=1), detector=slow_detector)
    try:
        frame = paste(clip[0], LEFT)
        for _ in range(20):
            image, generation = framer.crop(frame)  # would block here if crop waited for the detector
            assert generation == 0 and image.shape == (256, 256, 3)
        assert len(calls) == 1  # one detection at a time: the others were skipped, not queued
        release.set()
        framer.wait_idle()
        _, generation = framer.crop(frame)
        assert generation == 1  # the decision reached the next frame: a new source image is due
        assert framer.square == face_square(_box(0.72 * W, 0.5 * H, 110), (H, W))
    finally:
        release.set()
        framer.close()


# --------------------------------------------------------------------------- real detection on a pasted clip


def test_sender_detector_gives_the_training_framing_box(fl: FaceLandmarks, clip: np.ndarray) -> None:
    # the sender builds dlib's detector without the landmark predictor; its box must be FaceLandmarks'
    detect = dlib_detector()
    frames = [paste(f, LEFT) for f in clip[::10]] + [_background()]
    boxes = [detect(f) for f in frames]
    assert boxes == [fl.detect(f) for f in frames]
    assert all(b is not None for b in boxes[:-1]) and boxes[-1] is None


def test_framed_crop_has_the_training_clips_face_size(fl: FaceLandmarks, clip: np.ndarray) -> None:
    frames = [paste(f, LEFT) for f in clip]
    own = _width_ratio(fl, list(clip[::6]))
    framer = _inline()
    framer.prime(frames[0])
    framed = [framer.crop(f)[0] for f in frames]
    ratio_framed = _width_ratio(fl, framed[::6])
    ratio_centre = _width_ratio(fl, [center_square(f, 256) for f in frames[::6]])
    print(f"face width / crop width: clip {own:.3f}, framed {ratio_framed:.3f}, centre crop {ratio_centre:.3f}")
    # dlib's boxes come in image-pyramid steps ~1.2x apart, so one measurement is only good to ~0.1
    assert abs(ratio_framed - own) < 0.1 and ratio_framed > 0.45
    assert ratio_centre < 0.35  # what the sender sent before: the face a quarter of the picture
    assert framer.generation == 0 and framer.stats()["framing_no_face"] == 0


def test_reframes_when_the_face_moves_away_not_on_jitter(fl: FaceLandmarks, clip: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    still = [paste(f, (LEFT[0] + rng.uniform(-5, 5), LEFT[1] + rng.uniform(-5, 5))) for f in clip[:30]]
    moved = [paste(f, RIGHT) for f in clip[30:60]]
    framer = _inline(detect_every=2)
    framer.prime(still[0])
    first = framer.square
    gens = [framer.crop(f)[1] for f in still]
    assert set(gens) == {0} and framer.square == first
    out = [framer.crop(f) for f in moved]
    assert out[-1][1] == 1 and framer.stats()["framing_reframes"] == 1  # exactly one re-frame
    assert framer.square[0] > W / 2 - framer.square[2] / 2  # the square went right, with the face
    after = [im for im, g in out if g == 1]
    assert len(after) >= 20  # detection every 2 frames, confirmed by a second: re-framed within ~6 frames
    assert _width_ratio(fl, after[::5]) == pytest.approx(_width_ratio(fl, list(clip[30:60:5])), abs=0.1)


def test_no_face_keeps_the_last_square(clip: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    framer = _inline(detect_every=1)
    framer.prime(paste(clip[0], LEFT))
    square = framer.square
    empty = _background()
    with caplog.at_level(logging.WARNING, logger="sender.framing"):
        outs = [framer.crop(empty) for _ in range(6)]
    assert framer.square == square and {g for _, g in outs} == {0}
    assert np.array_equal(outs[0][0], crop_square(empty, square, 256))
    st = framer.stats()
    assert st["framing_no_face"] == 6 and st["framing_face_lost"] is True
    assert sum("no face" in r.getMessage() for r in caplog.records) == 1


# --------------------------------------------------------------------------- a real call


def _write_clip(path: Path, frames: list[np.ndarray], fps: float) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (W, H))
    assert writer.isOpened()
    for f in frames:
        writer.write(np.ascontiguousarray(f[..., ::-1]))
    writer.release()


def test_sender_call_with_face_framing(tmp_path: Path, tiny_weights: Path, clip: np.ndarray, free_port: int) -> None:
    """The real sender on a webcam-like clip whose person moves half-way: framed, re-framed once, a
    second source image sent and received, and (nearly) every frame rendered."""
    frames_n, fps = 60, 15
    frames = [paste(f, LEFT) for f in clip[:30]] + [paste(f, RIGHT) for f in clip[30:60]]
    webcam = tmp_path / "webcam.mp4"
    _write_clip(webcam, frames, fps)
    recv = start_receiver(["--port", str(free_port), "--weights", str(tiny_weights), "--playout", "immediate",
                           "--stats-dir", str(tmp_path), "--stop-after-calls", "1"], log_path=tmp_path / "receiver.log")
    try:
        res = run_sender(["--receiver", f"http://127.0.0.1:{free_port}", "--video", str(webcam), "--weights",
                          str(tiny_weights), "--max-frames", str(frames_n), "--fps", str(fps), "--framing", "face",
                          "--stats-json", str(tmp_path / "sender.json")])
        assert res.returncode == 0, res.stderr[-2000:]
    finally:
        assert stop(recv) == 0, (tmp_path / "receiver.log").read_text()[-2000:]
    sent = json.loads((tmp_path / "sender.json").read_text())
    got = json.loads((tmp_path / "call_1.json").read_text())
    assert sent["framing"] == "face" and sent["framing_no_face"] == 0
    assert sent["framing_reframes"] == 1
    assert sent["source_images_sent"] == 2 == got["source_images"]  # the start, and one for the new square
    assert got["source_sha256"] == sent["source_sha256"]
    x0, _, side = sent["framing_square"]
    assert x0 + side / 2 > W / 2  # the final square is on the right, where the person went
    assert 0.40 < sent["framing_face_width_ratio"] < 0.65  # 1/1.9 = 0.53 unless clamped
    # a skipped frame predicted as the picture already shown is shown again without a render (the
    # immediate playout drops what a busy CPU could not render in time: a margin, not delivery)
    shown = got["frames_rendered"] + got["frames_repeated"]
    assert shown >= 0.75 * frames_n and shown + got["frames_dropped"] <= got["frames_received"], got
