"""dlib landmarks, the landmark cache and the anchor targets of training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import read_clip
from models.fomm.anchors import LandmarkSupervision, assign_anchors, weighted_l1
from models.landmarks import (
    ANCHOR_GROUPS,
    MIRROR,
    AnchorTemplates,
    FaceLandmarks,
    LandmarkCache,
    anchor_targets,
    clip_landmarks,
    main,
    mirror,
    region_mask,
    to_unit,
)


@pytest.fixture(scope="module")
def fl() -> FaceLandmarks:
    return FaceLandmarks(descriptors=True)


@pytest.fixture(scope="module")
def clip(demo_clip: Path) -> np.ndarray:
    return read_clip(demo_clip, max_frames=12)


def test_face_found_with_68_points_inside_the_box(fl: FaceLandmarks, clip: np.ndarray) -> None:
    box = fl.detect(clip[0])
    assert box is not None
    lm = fl.shape(clip[0], box)
    assert lm.shape == (68, 2)
    left, top, right, bottom = box
    eyes = lm[36:48]
    assert (eyes[:, 0] > left).all() and (eyes[:, 0] < right).all() and (eyes[:, 1] > top).all()
    assert lm[36:42, 0].mean() < lm[42:48, 0].mean()  # image-left eye first
    assert lm[30, 1] < lm[57, 1]  # nose tip above the lower lip
    d = fl.descriptor(clip[0], box)
    assert d.shape == (128,) and np.isfinite(d).all()


def test_no_face_in_a_blank_frame(fl: FaceLandmarks) -> None:
    assert fl.detect(np.full((256, 256, 3), 128, np.uint8)) is None
    lm, valid = clip_landmarks(np.full((4, 256, 256, 3), 128, np.uint8), fl)
    assert not valid.any()


def test_clip_landmarks_track_between_detections(fl: FaceLandmarks, clip: np.ndarray) -> None:
    lm, valid = clip_landmarks(clip, fl, stride=5)
    assert valid.all()
    every = np.stack([fl.shape(f, fl.detect(f)) for f in clip])
    assert np.abs(lm - every).mean() < 2.0  # px at 256: reusing a box 4 frames old is close


def test_cache_round_trip(tmp_path: Path, demo_clip: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "c.mp4").write_bytes(demo_clip.read_bytes())
    out = tmp_path / "lm.npz"
    main(["--data", str(data), "--out", str(out), "--workers", "1", "--stride", "10"])
    got = LandmarkCache(out).get(data / "c.mp4", data)
    assert got is not None
    lm, valid = got
    assert lm.shape[1:] == (68, 2) and valid.mean() > 0.9


def test_mirror_is_an_involution_and_swaps_eyes() -> None:
    assert (MIRROR[MIRROR] == np.arange(68)).all()
    lm = torch.rand(3, 68, 2) * 2 - 1
    assert torch.allclose(mirror(mirror(lm)), lm)
    m = mirror(lm)
    # the image-left eye of the flipped face is the image-right eye of the original, mirrored
    assert torch.allclose(m[:, 36:42].mean(1)[:, 0], -lm[:, 42:48].mean(1)[:, 0])
    assert torch.allclose(m[:, 36:42].mean(1)[:, 1], lm[:, 42:48].mean(1)[:, 1])


def test_anchor_jacobian_recovers_an_affine_change() -> None:
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.uniform(-0.5, 0.5, (1, 68, 2)).astype(np.float32))
    templates = AnchorTemplates.fit(base)
    a = torch.tensor([[1.2, 0.1], [-0.05, 0.4]])  # an eye closing: vertical scale 0.4
    moved = base @ a.T + torch.tensor([0.1, -0.2])
    centre, jac = anchor_targets(moved, templates)
    assert jac.shape == (1, len(ANCHOR_GROUPS), 2, 2)
    assert torch.allclose(jac[0], a.expand(len(ANCHOR_GROUPS), 2, 2), atol=1e-4)
    for g, idx in enumerate(ANCHOR_GROUPS.values()):
        assert torch.allclose(centre[0, g], moved[0, idx].mean(0), atol=1e-6)


def test_region_mask_covers_eyes_and_mouth_not_corners(fl: FaceLandmarks, clip: np.ndarray) -> None:
    lm = torch.from_numpy(to_unit(fl.shape(clip[0], fl.detect(clip[0]))))[None]
    m = region_mask(lm, 64)[0, 0]
    px = ((lm[0] + 1) * 63 / 2).round().long()
    for i in (36, 45, 62):
        assert m[px[i, 1], px[i, 0]] > 0.5
    assert m[0, 0] < 1e-3 and m[63, 63] < 1e-3


def test_supervision_losses_zero_at_the_targets_and_skip_frames_without_a_face() -> None:
    rng = np.random.default_rng(1)
    lm = rng.uniform(60, 200, (2, 5, 68, 2)).astype(np.float32)
    valid = np.array([[True] * 5, [True, False, True, True, True]])
    sup = LandmarkSupervision(list(lm), list(valid), anchor_kp=[3, 1, 0, 7])
    draws = [(0, 1, 2, False), (1, 0, 4, True), (1, 1, 2, False)]  # last: source frame has no face
    kp = {}
    for which in (1, 2):
        value = torch.zeros(3, 10, 2)
        jac = torch.eye(2).repeat(3, 10, 1, 1)
        for b, d in enumerate(draws):
            u = torch.from_numpy(to_unit(lm[d[0], d[which]]))[None]
            u = mirror(u) if d[3] else u
            c, j = anchor_targets(u, sup.templates)
            value[b, sup.anchor_kp], jac[b, sup.anchor_kp] = c[0], j[0]
        kp[which] = {"value": value, "jacobian": jac}
    kp[1]["value"][2] += 5.0  # wrong, but on a frame without landmarks: ignored
    out = sup.losses(kp[1], kp[2], draws, 32)
    assert out.value.item() < 1e-5 and out.jacobian.item() < 1e-5
    kp[2]["value"][0, 3] += 0.5
    assert sup.losses(kp[1], kp[2], draws, 32).value.item() > 1e-3
    assert out.region.shape == (3, 1, 32, 32) and out.region[0].max() > 0.5


def test_assign_anchors_picks_the_nearest_keypoints() -> None:
    rng = np.random.default_rng(2)
    lm = torch.from_numpy(to_unit(rng.uniform(60, 200, (8, 68, 2)).astype(np.float32)))
    templates = AnchorTemplates.fit(lm)
    centre, _ = anchor_targets(lm, templates)
    kp = torch.rand(8, 10, 2) * 0.1 + 5  # far away ...
    want = [6, 2, 9, 4]
    for g, k in enumerate(want):
        kp[:, k] = centre[:, g] + 0.01  # ... except these
    assert assign_anchors(kp, lm, templates) == want


def test_weighted_l1_only_counts_the_region() -> None:
    pred, target = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :4] = 1
    pred[..., 4:, 4:] = 1.0  # error outside the mask only
    assert weighted_l1(pred, target, mask).item() == 0
    pred[..., :4, :4] = 0.5
    assert abs(weighted_l1(pred, target, mask).item() - 0.5) < 1e-6
