"""Eye and mouth openings (models.expression): labels, patches, the regressor and its training loop."""

from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointError
from models.expression import load_regressor, save_regressor
from models.expression.openings import (
    EYE_LEFT,
    EYE_PATCH,
    EYE_RIGHT,
    MOUTH_PATCH,
    centres_from_keypoints,
    cut_patches,
    openings,
)
from models.expression.regressor import OpeningNet
from models.expression.train import Patches, TrainConfig, per_clip_corr, train


def face(eye_gap: float = 4.0, mouth_gap: float = 10.0) -> np.ndarray:
    """68 landmarks: eyes centred at (100, 100) and (150, 100) (inter-ocular 50 px), mouth at (125, 160)."""
    lm = np.zeros((68, 2), np.float32)
    for idx, cx in ((EYE_LEFT, 100.0), (EYE_RIGHT, 150.0)):
        xs = cx + np.array([-10, -4, 4, 10, 4, -4], np.float32)
        ys = 100 + np.array([0, -eye_gap / 2, -eye_gap / 2, 0, eye_gap / 2, eye_gap / 2], np.float32)
        lm[idx] = np.stack([xs, ys], 1)
    lm[48:60] = [125, 160]
    lm[60], lm[64] = (110, 160), (140, 160)
    for top, bottom, x in ((61, 67, 118), (62, 66, 125), (63, 65, 132)):
        lm[top], lm[bottom] = (x, 160 - mouth_gap / 2), (x, 160 + mouth_gap / 2)
    return lm


def test_openings_are_gaps_over_the_inter_ocular_distance() -> None:
    o = openings(face(eye_gap=4.0, mouth_gap=10.0))
    assert o == pytest.approx([4 / 50, 4 / 50, 10 / 50, 30 / 50], abs=1e-6)
    assert openings(np.stack([face(), face(eye_gap=0.0)])).shape == (2, 4)
    assert openings(face(eye_gap=0.0))[0] == 0.0  # a closed eye


def test_patches_are_centred_aligned_and_the_right_eye_mirrored() -> None:
    frame = np.zeros((256, 256, 3), np.uint8)
    frame[98:103, 93:98] = 255  # a mark left of the image-left eye's centre (100, 100)
    frame[98:103, 153:158] = 255  # a mark right of the image-right eye's centre (150, 100): mirrored to the left
    centres = np.array([[100, 100], [150, 100], [125, 160]], np.float32)
    eyes, mouth = cut_patches(frame, centres)
    assert eyes.shape == (2, EYE_PATCH, EYE_PATCH, 3) and mouth.shape == (MOUTH_PATCH[1], MOUTH_PATCH[0], 3)
    for e in eyes:  # both marks land in the same place: left of centre
        ys, xs = np.nonzero(e[..., 0] > 128)
        assert xs.mean() < EYE_PATCH / 2 - 2 and abs(ys.mean() - (EYE_PATCH / 2 - 0.5)) < 1.5
    # a head rolled by 30 degrees gives the same patches (aligned to the eye line)
    import cv2

    rot = cv2.getRotationMatrix2D((128.0, 128.0), 30.0, 1.0)
    rolled = cv2.warpAffine(frame, rot, (256, 256))
    rc = (rot[:, :2] @ centres.T).T + rot[:, 2]
    eyes_r, _ = cut_patches(rolled, rc)
    assert np.abs(eyes_r.astype(int) - eyes.astype(int)).mean() < 12


def test_keypoint_centres_are_pixels_of_the_anchored_keypoints() -> None:
    kp = np.zeros(60, np.float32)
    kp[2 * 9:2 * 9 + 2] = (-0.5, -0.25)  # anchored eye_left = keypoint 9
    kp[2 * 4:2 * 4 + 2] = (0.5, -0.25)
    kp[2 * 5:2 * 5 + 2] = (0.0, 0.5)
    c = centres_from_keypoints(kp, [9, 4, 5, 0], 256)
    assert c == pytest.approx(np.array([[63.5, 95.5], [191.5, 95.5], [127.5, 191.5]]))


def test_regressor_shapes_label_units_and_checkpoint(tmp_path: Path) -> None:
    net = OpeningNet()
    net.set_label_stats(torch.tensor([0.3, 0.3, 0.1, 0.6]), torch.tensor([0.05, 0.05, 0.1, 0.05]))
    eyes, mouth = torch.rand(3, 2, 3, 32, 32), torch.rand(3, 3, 32, 48)
    net.eval()
    out = net(eyes, mouth)
    assert out.shape == (3, 4) and torch.isfinite(out).all()
    save_regressor(tmp_path / "o.pt", net, {"x": 1})
    again, meta = load_regressor(tmp_path / "o.pt")
    assert meta == {"x": 1} and torch.allclose(again(eyes, mouth), out, atol=1e-6)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_regressor(tmp_path / "bad.pt")


def synthetic(n: int, clips: int, seed: int) -> Patches:
    """Patches whose eyes' brightness is their opening: something a regressor can learn in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.uniform(0, 1, (n, 4)).astype(np.float32)
    eyes = np.broadcast_to((labels[:, :2, None, None, None] * 255).astype(np.uint8), (n, 2, 32, 32, 3)).copy()
    mouth = np.broadcast_to((labels[:, 2, None, None, None] * 255).astype(np.uint8), (n, 32, 48, 3)).copy()
    return Patches(eyes, mouth, labels, labels + rng.normal(0, 0.5, (n, 4)).astype(np.float32),
                   np.arange(n) % clips)


def test_training_learns_and_keeps_the_best_check(tmp_path: Path) -> None:
    cfg = TrainConfig(out=str(tmp_path / "openings.pt"), run_dir=str(tmp_path / "run"), steps=120, batch=32,
                      val_every=40, tiny=True, minutes=5)
    summary = train(cfg, synthetic(256, 4, 0), synthetic(64, 4, 1), {"n": 1})
    best = summary["best"]
    assert best["select"] > 0.8 and best["corr"][0] > 0.8  # eye brightness -> eye opening
    assert summary["baselines"]["jacobian_corr"][0] < best["corr"][0]
    net, meta = load_regressor(cfg.out)
    assert meta["selected"]["step"] == best["step"]
    rows = (tmp_path / "run" / "val.jsonl").read_text().splitlines()
    assert len(rows) == 3  # steps 0, 40, 80
    # resumable: a second run continues from the saved state, not from step 0
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 160, "resume": True})
    assert train(cfg2, synthetic(256, 4, 0), synthetic(64, 4, 1), {"n": 1})["final"]["step"] == 160


def test_per_clip_correlation_is_the_mean_over_clips() -> None:
    t = np.arange(8, dtype=np.float32)[:, None].repeat(4, 1)
    clip = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = t.copy()
    pred[4:] *= -1  # clip 1 moves the other way
    assert per_clip_corr(pred, t, clip) == pytest.approx([0.0] * 4, abs=1e-9)
    assert per_clip_corr(t, t, clip) == pytest.approx([1.0] * 4)


@pytest.mark.parametrize("args,message", [(["--degrade", "1.5"], "--degrade is a share"),
                                          (["--degrade", "nan"], "--degrade is a share"),
                                          (["--width", "0"], "--width must be >= 1")])
def test_training_refuses_bad_options(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from models.expression.train import main

    with pytest.raises(SystemExit) as e:
        main(["--tiny", "--steps", "1", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_degrade_changes_the_share_asked_and_keeps_shapes() -> None:
    from models.expression.train import degrade

    rng = np.random.default_rng(0)
    eyes = (rng.random((8, 2, 32, 32, 3)) * 255).astype(np.uint8)
    assert degrade(eyes, rng, 0.0) is eyes
    out = degrade(eyes, rng, 1.0)
    assert out.shape == eyes.shape and out.dtype == np.uint8
    assert all((out[i] != eyes[i]).any() for i in range(8))  # every sample degraded, both eyes alike
