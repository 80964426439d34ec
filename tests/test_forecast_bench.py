"""bench.forecast end to end on a tiny synthetic folder with a tiny motion model."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from bench import forecast as bench
from models.fomm.config import FommConfig
from models.fomm.io import save_motion_model
from models.fomm.model import MotionModel
from models.forecast.dataset import extract_series, make_windows, split_clips
from models.forecast.train import TrainConfig, train

torch.set_num_threads(1)


def write_clips(root, n: int = 3, frames: int = 30, size: int = 64) -> None:
    """PNG-stack clips of a bright disc drifting and bobbing on a textured background."""
    rng = np.random.default_rng(0)
    for c in range(n):
        bg = (rng.uniform(0, 255, size=(size, size, 3))).astype(np.uint8)
        tiles = []
        for t in range(frames):
            img = bg.copy()
            cx = int(20 + 20 * t / frames + 3 * c)
            cy = int(32 + 8 * np.sin(0.4 * t + c))
            cv2.circle(img, (cx, cy), 10, (255, 220, 40), -1)
            tiles.append(img)
        cv2.imwrite(str(root / f"clip{c}.png"), np.concatenate(tiles, axis=1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    data.mkdir()
    write_clips(data)
    torch.manual_seed(0)
    weights = root / "fomm.pt"
    save_motion_model(weights, MotionModel(FommConfig.tiny()).eval())
    _, clips = split_clips(data, None, "all")
    series = extract_series(weights, clips, data, root / "cache")
    kp = [s.kp for s in series]
    wdir = root / "w"
    for name in ("gru", "vrnn", "grunf"):
        cfg = TrainConfig(model=name, tiny=True, steps=3, batch=4, n_obs=6, min_obs=4, n_fut=4,
                          out=str(wdir / f"forecast_{name}.pt"), run_dir=str(root / f"run_{name}"))
        train(cfg, kp, kp, progress=False)
    return data, weights, wdir, root


def test_extraction_is_cached_and_windows_cover_clips(setup) -> None:
    data, weights, _, root = setup
    _, clips = split_clips(data, None, "all")
    files = list((root / "cache").rglob("*.npz"))
    assert len(files) == 3
    s = extract_series(weights, clips, data, root / "cache")
    assert [x.kp.shape for x in s] == [(30, 60)] * 3
    w, idx = make_windows(s, 6, 6, 6)
    assert w.shape == (12, 12, 60) and idx[:4] == [(0, 0), (0, 6), (0, 12), (0, 18)]
    np.testing.assert_array_equal(w[1], s[0].kp[6:18])


def test_bench_end_to_end(setup, tmp_path, capsys) -> None:
    data, weights, wdir, root = setup
    out, png = tmp_path / "f.json", tmp_path / "f.png"
    rc = bench.main(["--data", str(data), "--json", str(out), "--png", str(png), "--horizons", "6-6,4-8",
                     "--samples", "6", "--weights", str(weights), "--forecast-dir", str(wdir),
                     "--render-subset", "2", "--kinds", "", "--cache-dir", str(root / "cache"),
                     "--time-reps", "2"])
    assert rc == 0 and png.stat().st_size > 0
    res = json.loads(out.read_text())
    assert res["split"] == "all" and not res["skipped"]  # no manifest: the whole folder
    assert set(res["horizons"]) == {"6-6", "4-8"}
    for key, per in res["horizons"].items():
        assert set(per) == {"last", "linear", "damped", "gru", "vrnn", "grunf", "grusnf"}
        m = int(key.split("-")[1])
        for r in per.values():
            assert len(r["mae_per_step"]) == m
            assert r["kp_mae"] == pytest.approx(np.mean(r["mae_per_step"]), rel=1e-5)
            assert r["kp_mae"] <= r["kp_mae_per_sample"] + 1e-7  # Jensen: mean of samples never worse
            assert r["kp_mae_best_of_n"] <= r["kp_mae_per_sample"] + 1e-7
            assert r["ms_per_step"] > 0 and 0 <= r["pixel_mae"] <= 1
            if r["stochastic"]:
                assert r["samples"] == 6 and r["apd"] > 0
            else:
                assert r["apd"] == 0 and r["kp_mae_best_of_n"] == pytest.approx(r["kp_mae"], rel=1e-5)
        rend = res["render"][key]
        assert rend["n_windows"] == 2 and 0 <= rend["gt_kp"] <= 1
    assert "horizon 6-6" in capsys.readouterr().out


def test_missing_weights_are_reported_not_hidden(setup, tmp_path) -> None:
    data, weights, _, root = setup
    res = bench.run(str(data), [(6, 6)], samples=2, weights=str(weights), forecast_dir=str(tmp_path),
                    render_subset_n=0, cache_dir=str(root / "cache"), time_reps=1)
    assert set(res["skipped"]) == {"gru", "vrnn", "grunf", "grusnf"}  # GRU-SNF is built from two of them
    assert set(res["horizons"]["6-6"]) == {"last", "linear", "damped"}


def test_val_split_with_manifest_uses_only_val_groups(setup, tmp_path) -> None:
    _, weights, _, root = setup
    data = tmp_path / "d"
    data.mkdir()
    write_clips(data, n=4, frames=14)
    rows = ["path,kind,format,height,width,n_frames,fps,group"]
    rows += [f"clip{c}.png,face,png_stack,64,64,14,30,g{c}" for c in range(4)]
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    train_c, val_c = split_clips(data, ["face"])
    assert val_c and train_c and not {c.group for c in train_c} & {c.group for c in val_c}
    res = bench.run(str(data), [(6, 6)], samples=2, weights=str(weights), models=["last"], render_subset_n=0,
                    kinds=["face"], cache_dir=str(root / "cache"), time_reps=1)
    assert res["split"] == "val" and res["groups"] == sorted(c.group for c in val_c)
