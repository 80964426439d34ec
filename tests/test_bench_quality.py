"""bench.quality end to end on a tiny random model and two synthetic clips."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bench import common, quality
from models.data import load_clips, load_frames
from models.fomm import FommConfig, MotionModel
from models.fomm.io import save_motion_model

T = 12
SIZE = 64


def make_clips(root: Path, n: int = 2, frames: int = T, size: int = SIZE) -> Path:
    """Textured background with a bright blob moving across it, as lossless PNG stacks."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in range(n):
        bg = (rng.random((size, size, 3)) * 120).astype(np.uint8)
        bg = cv2.GaussianBlur(bg, (5, 5), 0)
        out = []
        for t in range(frames):
            f = bg.copy()
            cx, cy = 16 + 3 * t + 4 * c, 28 + (t % 4)
            cv2.circle(f, (cx, cy), 9, (230, 200 - 20 * c, 160), -1)
            cv2.circle(f, (cx + 3, cy - 2), 2, (20, 20, 20), -1)
            out.append(f)
        name = f"clip{c}.png"
        cv2.imwrite(str(root / name), np.concatenate(out, axis=1))
        rows.append({"path": name, "kind": "face", "format": "png_stack", "group": f"g{c}", "fps": "30"})
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def make_model(path: Path) -> Path:
    import torch

    torch.manual_seed(0)
    save_motion_model(path, MotionModel(FommConfig.tiny(SIZE)))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("bench_quality")
    return tmp, make_clips(tmp / "data"), make_model(tmp / "m.pt")


def test_metrics_of_identical_and_different_images() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((32, 32, 3)).astype(np.float32)
    assert common.ssim(a, a) == pytest.approx(1.0)
    assert common.psnr(a, a) == common.PSNR_CAP_DB
    assert common.l1(a, a) == 0.0
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), 0, 1)
    assert common.ssim(a, b) < 0.99
    assert common.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(b, a, data_range=1.0))


def test_moving_l1_only_counts_moving_pixels() -> None:
    src = np.zeros((8, 8, 3), np.float32)
    drv = src.copy()
    drv[:2] = 1.0  # 16 moving pixels
    pred = drv.copy()
    pred[5:] = 0.5  # error only on still pixels: must not show in l1_moving
    m = common.frame_metrics(pred[None], drv[None], src)
    assert m["moving_pixels"] == 16
    assert m["l1_moving"] == 0.0
    assert m["l1"] > 0
    pred[:2] = 0.0  # now all moving pixels are wrong by 1
    assert common.frame_metrics(pred[None], drv[None], src)["l1_moving"] == pytest.approx(1.0)


def test_relative_keypoints_identity_and_scale() -> None:
    rng = np.random.default_rng(2)
    kp_d = np.concatenate([rng.uniform(-0.5, 0.5, (5, 20)), np.tile(np.eye(2).reshape(1, 4), (5, 10))
                           + 0.1 * rng.standard_normal((5, 40))], axis=1).astype(np.float32)
    # source == first driving frame: relative motion reproduces the driving keypoints
    out, scale = quality.relative_keypoints(kp_d[0], kp_d)
    assert scale == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(out, kp_d, atol=1e-5)
    # a source twice as spread out moves twice as far; Jacobians follow J_d J_d0^-1 J_s
    kp_s = kp_d[0].copy()
    kp_s[:20] *= 2.0
    out, scale = quality.relative_keypoints(kp_s, kp_d)
    assert scale == pytest.approx(2.0, rel=1e-4)
    np.testing.assert_allclose(out[:, :20], np.clip(kp_s[:20] + 2.0 * (kp_d[:, :20] - kp_d[0, :20]), -1, 1), atol=1e-4)
    j = kp_d[:, 20:].reshape(5, 10, 2, 2)
    expect = j[3] @ np.linalg.inv(j[0]) @ j[0]
    np.testing.assert_allclose(out[3, 20:].reshape(10, 2, 2), expect, atol=1e-4)


def test_quality_end_to_end(setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    tmp, data, weights = setup
    out_json, out_png, out_mp4 = tmp / "q.json", tmp / "q.png", tmp / "t.mp4"
    quality.main(["--data", str(data), "--weights", str(weights), "--json", str(out_json), "--png", str(out_png),
                  "--split", "all", "--fps-frames", "3", "--transfer-source", str(data / "clip0.png"),
                  "--transfer-driving", str(data / "clip1.png"), "--mp4", str(out_mp4)])
    printed = capsys.readouterr().out
    assert "static source" in printed and "model" in printed
    res = json.loads(out_json.read_text())
    assert res["clips"] == 2 and res["size"] == SIZE and len(res["per_clip"]) == 2
    for k in ("model", "static_source"):
        assert set(res[k]) >= {"l1", "psnr", "ssim", "l1_moving"}
        for m in ("l1", "psnr", "ssim"):  # per-clip mean first, then mean over clips
            assert res[k][m] == pytest.approx(np.mean([c[k][m] for c in res["per_clip"]]))
    assert res["render_fps"] > 0 and res["render_fps_onnx"] > 0
    assert res["wins_vs_static"] == sum(c["model"]["l1"] < c["static_source"]["l1"] for c in res["per_clip"])
    assert out_png.stat().st_size > 0

    # the static row is the source frame scored against exactly the frames the model was scored on
    clips = load_frames(load_clips(data, ["face"]), SIZE)
    assert [c["frames"] for c in res["per_clip"]] == [len(f) - 1 for f in clips]
    for row, frames in zip(res["per_clip"], clips, strict=True):
        f = frames.astype(np.float32) / 255
        ssims = [structural_similarity(f[0], g, channel_axis=-1, data_range=1) for g in f[1:]]
        assert row["static_source"]["ssim"] == pytest.approx(np.mean(ssims), abs=1e-6)
        assert row["static_source"]["l1"] == pytest.approx(np.abs(f[1:] - f[0]).mean(), abs=1e-6)
        diff = np.abs(f[1:] - f[0]).mean(-1)
        assert row["static_source"]["l1_moving"] == pytest.approx(diff[diff > 0.1].mean(), abs=1e-6)
        assert row["model"]["moving_pixels"] == row["static_source"]["moving_pixels"] == int((diff > 0.1).sum())

    # transfer video: driving | rendered, one frame per driving frame
    import av

    with av.open(str(out_mp4)) as c:
        frames = [fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)]
    assert len(frames) == T and frames[0].shape == (SIZE, 2 * SIZE, 3)
    assert res["transfer"]["frames"] == T


def test_sizes_side_by_side(setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    tmp, data, w64 = setup
    torch.manual_seed(0)
    w256 = tmp / "m256.pt"
    save_motion_model(w256, MotionModel(FommConfig.tiny(256)))
    out = tmp / "sizes.json"
    quality.main(["--data", str(data), "--weights", str(w64), str(w256), "--json", str(out), "--split", "all",
                  "--fps-frames", "3"])
    printed = capsys.readouterr().out
    assert "256 static" in printed and "64 model" in printed and "ms dm/gen/ref" in printed
    res = json.loads(out.read_text())
    assert res["sizes"] == [64, 256]
    r64, r256 = res["by_size"]["64"], res["by_size"]["256"]
    assert r256["size"] == 256 and r256["stages_ms"]["refiner"] > 0.05 > r64["stages_ms"]["refiner"]
    for r in (r64, r256):
        st = r["stages_ms"]
        assert st["total"] == pytest.approx(st["dense_motion"] + st["generator"] + st["refiner"])
    # each size is scored against its own static floor, on frames decoded at that size
    assert r256["static_source"]["l1"] != r64["static_source"]["l1"]
    with pytest.raises(SystemExit):
        quality.main(["--data", str(data), "--size", "96"])
