"""bench.closed_loop: predictors run in the loop on the decoded history, both ends agreeing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import closed_loop
from models.forecast import load_forecaster
from shared.kpcodec import PredictiveConfig


def _wobbly(n: int = 90) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(n)[:, None]
    xy = 0.05 * np.sin(t / 20 + rng.uniform(0, 6, 20)) + 0.001 * rng.standard_normal((n, 20))
    jac = np.tile([1.0, 0.0, 0.0, 1.0], 10) + 0.05 * np.sin(t / 11 + rng.uniform(0, 6, 40))
    return np.concatenate([xy, jac], axis=1).astype(np.float32)


def test_a_learned_forecaster_in_the_loop_decodes_bit_exact_on_this_machine() -> None:
    cfg = PredictiveConfig(tolerance=0.008, max_gap=8, skip_rule="mean")
    pred = closed_loop.learned_predictor(load_forecaster("gru"), cfg, samples=1)
    kp = _wobbly()
    coded, decoded, wire = closed_loop.encode_clip(kp, cfg, pred, history_len=12)
    assert 0 < len(coded) < len(kp) and coded[-1].seq == len(kp) - 1  # skips, and ends on the true frame
    assert wire > 95 * len(coded)  # every message pays its transport bytes
    got = closed_loop.decode_clip(coded, len(kp), cfg, pred, history_len=12)
    np.testing.assert_allclose(got, decoded, atol=1e-6)
    # skipped frames are within the tolerance on average (the mean rule), coded ones on the grid
    assert np.abs(decoded[:, :20] - kp[:, :20]).mean() < cfg.tolerance


def test_run_compares_predictors_at_equal_tolerance_and_equal_error(tmp_path: Path) -> None:
    res = closed_loop.run("assets", "all", ["last", "linear", "gru"], [0.006, 0.008, 0.012], max_gap=8,
                          history_len=12, samples=1, max_frames=90, forecast_dir=None,
                          weights="models/weights/fomm_face64.pt", cache_dir=str(tmp_path / "kp"))
    rows = {(r["predictor"], r["tolerance"]): r for r in res["rows"]}
    assert len(rows) == 9 and res["clips"] == 1
    for r in rows.values():
        assert r["decoder_mismatch_frames"] == 0
        assert 0 < r["sent_share"] <= 1 and r["kbps_wire"] > 0
    assert all(rows[("last", t)]["bits_vs_last"] == pytest.approx(1.0) for t in (0.006, 0.008, 0.012))
    # a looser tolerance sends fewer frames
    for p in ("last", "linear", "gru"):
        assert rows[(p, 0.012)]["sent_share"] < rows[(p, 0.006)]["sent_share"]
    assert res["equal_error"]["last"]["bits_vs_last"] == pytest.approx(1.0)
    assert set(res["cheapest_at"]) == {"0.006", "0.008", "0.012"}
    table = closed_loop.table(res)
    assert "bits vs last" in table and "equal keypoint error" in table
    out = tmp_path / "r.json"
    closed_loop.write_json(out, res)
    assert json.loads(out.read_text())["rows"][0]["predictor"] == "last"
