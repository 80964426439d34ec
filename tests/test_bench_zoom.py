"""bench.zoom: the eyes and the mouth located on real frames and enlarged under each side of the demo's video."""

from pathlib import Path

import numpy as np
import pytest

from bench.zoom import ZoomConfig, ZoomTracker, crop, region_boxes, side_by_side_zoomed, zoom_panel
from models.data import center_square, read_clip


@pytest.fixture(scope="module")
def frames(demo_clip: Path) -> np.ndarray:
    return np.stack([center_square(f, 256) for f in read_clip(demo_clip, max_frames=20)])


def test_boxes_sit_on_the_eyes_and_mouth_of_the_landmarks() -> None:
    lm = np.zeros((68, 2))
    lm[36:42] = [[90, 100], [95, 97], [100, 97], [105, 100], [100, 103], [95, 103]]
    lm[42:48] = lm[36:42] + [60, 0]
    lm[48:68] = np.stack([np.linspace(100, 160, 20), 170 + 5 * np.sin(np.linspace(0, 6, 20))], 1)
    b = region_boxes(lm, ZoomConfig(eye_margin=2.0, eye_aspect=2.0))
    assert np.allclose(b[0], [82.5, 92.5, 112.5, 107.5])  # 15 px wide eye -> 30 x 15 box, centred
    assert np.allclose(b[1], b[0] + [60, 0, 60, 0])
    assert b[2][0] < 100 and b[2][2] > 160 and b[2][1] < 165 and b[2][3] > 175


def test_crop_takes_the_box_and_is_black_outside_the_image() -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:32, 16:48] = 200
    inside = crop(img, np.array([16, 16, 48, 32]), (64, 32))
    assert inside.shape == (32, 64, 3) and inside[4:-4, 4:-4].min() > 190
    assert crop(np.full_like(img, 255), np.array([-64, -64, -32, -32]), (8, 8)).max() == 0


def test_tracker_follows_the_demo_face_and_the_panel_shows_the_same_crops_of_both_frames(frames: np.ndarray) -> None:
    tracker = ZoomTracker(ZoomConfig(redetect=1000))  # one detection, then tracked
    boxes = [tracker.boxes(f) for f in frames]
    assert all(b is not None for b in boxes)
    b = boxes[-1]
    from models.landmarks import FaceLandmarks

    fl = FaceLandmarks()  # afresh on the last frame, 19 frames after the detection
    fresh = region_boxes(fl.shape(frames[-1], fl.detect(frames[-1])))
    width = fresh[:, 2] - fresh[:, 0]
    centre = lambda x: (x[:, :2] + x[:, 2:]) / 2  # noqa: E731
    assert np.all(np.abs(centre(b) - centre(fresh)) < 0.25 * width[:, None])  # on the eyes and the mouth
    assert np.all(np.abs(b[:, 2] - b[:, 0] - width) < 0.25 * width)
    assert b[0][0] < b[1][0] and max(b[0][3], b[1][3]) < b[2][1] + 10  # eyes left to right, above the mouth
    assert np.all((b >= 0) & (b <= 256))
    out = side_by_side_zoomed(frames[-1], frames[-1], b)
    assert out.shape[1] == 512 and out.shape[0] > 256 + 200
    assert np.array_equal(out[:, :256], out[:, 256:])  # same frame, same boxes: the same crops
    dark = side_by_side_zoomed(frames[-1], np.zeros_like(frames[-1]), b)
    assert dark[256:, 256:].max() == 0 and dark[256:, :256].mean() > 30  # the crops come from each side's frame
    assert zoom_panel(frames[0], None)[256:].max() == 0  # no face yet: a black strip
    with pytest.raises(ValueError, match="differ in shape"):
        side_by_side_zoomed(frames[0], frames[0][:128], b)
