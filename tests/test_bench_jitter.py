"""bench.jitter: motion or jitter, end to end on a tiny synthetic folder, and its measures alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bench import jitter
from models.fomm.config import FommConfig
from models.fomm.io import save_motion_model
from models.fomm.model import MotionModel
from tests.test_forecast_bench import write_clips


def test_sent_fraction_tells_a_still_track_from_a_noisy_one() -> None:
    still = np.zeros((100, 60), np.float32)
    still[:, 20:] = np.tile([1.0, 0.0, 0.0, 1.0], 10)  # identity Jacobians
    # a still face: the first frame, then one every max_gap + 1 frames (the receiver stays fresh)
    assert jitter.sent_fraction(still) <= 0.15
    noisy = still + np.random.default_rng(0).normal(0, 0.01, still.shape).astype(np.float32)
    assert jitter.sent_fraction(noisy) > 0.9  # every frame off by 0.01 > the 0.004 tolerance
    assert jitter.jitter_ratio(noisy) > 1.2  # white noise: |d2| / |d1| near 1.41
    ramp = still.copy()
    ramp[:, :20] += np.linspace(0, 0.5, 100, dtype=np.float32)[:, None]
    assert jitter.jitter_ratio(ramp) < 0.1  # smooth motion


def test_perturbations_keep_the_frame_shape() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    for kind in ("jpeg", "noise", "both"):
        out = jitter.perturb(frame, kind, rng)
        assert out.shape == frame.shape and out.dtype == np.uint8 and not np.array_equal(out, frame)


def test_bench_end_to_end(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_clips(data, n=2, frames=24)
    torch.manual_seed(0)
    weights = tmp_path / "fomm.pt"
    save_motion_model(weights, MotionModel(FommConfig.tiny(64)).eval())
    out, png = tmp_path / "j.json", tmp_path / "j.png"
    rc = jitter.main(["--data", str(data), "--weights", str(weights), "--still-frames", "2", "--perturbations", "3",
                      "--json", str(out), "--png", str(png)])
    assert rc == 0
    res = json.loads(out.read_text())
    s = res["summary"]
    assert res["clips"] == 2 and res["frames"] == 48
    assert s["still_coord"] >= 0 and s["shift_coord"] >= 0 and s["change_coord"] >= 0
    raw, smooth = s["smoothing"]["0"], s["smoothing"]["3"]
    assert raw["moved"] == 0 and smooth["moved"] > 0
    for row in s["smoothing"].values():
        assert 0 < row["sent_last"] <= 1 and 0 < row["sent_linear"] <= 1
    assert png.stat().st_size > 5000 and "sent (repeat-last)" in capsys.readouterr().out
