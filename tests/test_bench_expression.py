"""bench.expression: the landmark yardstick's definitions and a real run on the bundled clip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import expression


def _face(mouth_gap: float, eye_gap: float, iod: float = 50.0) -> np.ndarray:
    lm = np.zeros((68, 2), np.float32)
    lm[36:42] = [100, 100]
    lm[42:48] = [100 + iod, 100]
    for a, b in expression.EYE_PAIRS:
        lm[a] = [lm[a, 0], 100 - eye_gap / 2]
        lm[b] = [lm[b, 0], 100 + eye_gap / 2]
    for a, b in expression.MOUTH_PAIRS:
        lm[a] = [120, 160 - mouth_gap / 2]
        lm[b] = [120, 160 + mouth_gap / 2]
    return lm


def test_openings_are_relative_to_the_eye_distance() -> None:
    lm = _face(mouth_gap=20, eye_gap=5)
    assert expression.mouth_opening(lm) == pytest.approx(20 / 50, rel=0.02)
    assert expression.eye_opening(lm) == pytest.approx(5 / 50, rel=0.02)
    big = lm * 2  # the same face twice as large: same openings
    assert expression.mouth_opening(big) == pytest.approx(expression.mouth_opening(lm))


def test_pearson_is_zero_for_a_constant_side() -> None:
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert expression.pearson(a, np.full(4, 2.0)) == 0.0
    assert expression.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert expression.pearson(a, -a) == pytest.approx(-1.0)
    assert expression.pearson(a[:1], a[:1]) == 0.0


def test_run_on_the_bundled_clip(tiny_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "e.json"
    png = tmp_path / "e.png"
    expression.main(["--data", "assets", "--split", "all", "--weights", str(tiny_weights), "--labels", "tiny",
                     "--stride", "15", "--aed-every", "3", "--max-frames", "90", "--crf", "40",
                     "--json", str(out), "--png", str(png)])
    res = json.loads(out.read_text())
    s = res["summary"]
    assert set(s) == {"tiny", "static source", "libx264 CRF 40"}
    assert res["frames_scored"] + res["no_face"] == 5 and res["frames_scored"] >= 4
    # the static source never opens or closes anything: correlation 0 by definition
    assert s["static source"]["mouth_corr"] == 0 and s["static source"]["eye_corr"] == 0
    # H.264 at CRF 40 follows the face far better than a still image
    assert s["libx264 CRF 40"]["akd"] < s["static source"]["akd"]
    assert s["libx264 CRF 40"]["kbps"] > 1
    assert s["static source"]["l1_vs_static"] == pytest.approx(1.0)
    for row in s.values():
        assert row["aed"] is not None and row["aed"] >= 0
    assert png.stat().st_size > 10_000
    assert "AKD px@256" in capsys.readouterr().out


def test_streams_deliver_what_the_receiver_decodes_and_rates_interpolate() -> None:
    rng = np.random.default_rng(1)
    t = np.arange(60)[:, None]
    kp = np.concatenate([0.05 * np.sin(t / 15 + rng.uniform(0, 6, 20)),
                         np.tile([1.0, 0.0, 0.0, 1.0], 10) + 0.02 * np.sin(t / 9 + rng.uniform(0, 6, 40))],
                        axis=1).astype(np.float32)
    q8, q8_bytes, q8_msgs = expression.delivered(kp, "q8")
    pred, pred_bytes, pred_msgs = expression.delivered(kp, "pred")
    assert q8.shape == pred.shape == kp.shape and q8_msgs == 60
    assert np.abs(q8 - kp)[:, :20].max() < 1e-4  # Q8: coordinates near exact, Jacobians on a log scale
    assert (np.abs(q8 - kp)[:, 20:] / np.maximum(np.abs(kp[:, 20:]), 0.5)).max() < 0.03
    assert pred_msgs < q8_msgs and pred_bytes < q8_bytes  # the predictive stream skips frames
    assert np.abs(pred[:, :20] - kp[:, :20]).mean() < 0.008  # within twice the default tolerance on average
    with pytest.raises(ValueError, match="unknown stream"):
        expression.delivered(kp, "f32")
    curve = [(10.0, 0.5), (20.0, 0.7), (40.0, 0.9)]
    assert expression.kbps_at(curve, 0.7) == pytest.approx(20.0)
    assert 10.0 < expression.kbps_at(curve, 0.6) < 20.0
    assert expression.kbps_at(curve, 0.95) is None and expression.kbps_at(curve[:1], 0.5) is None


def test_streams_with_the_region_stage_show_what_a_call_shows(tmp_path: Path) -> None:
    """``--streams pred --refine-regions``: the delivered keypoints rendered, then redrawn by the region stage."""
    out = tmp_path / "e.json"
    expression.main(["--data", "assets", "--split", "all", "--weights", "models/weights/fomm_face256.pt",
                     "--labels", "m", "--stride", "20", "--aed-every", "5", "--max-frames", "41", "--crf", "40",
                     "--streams", "pred", "--refine-regions", "--json", str(out)])
    s = json.loads(out.read_text())["summary"]
    assert {"m", "m + regions", "m pred", "m pred + regions"} <= set(s)
    assert s["m pred"]["kbps"] > 0
    # the stage redraws the eyes and the mouth of the streamed frames: their pixels change, a little
    assert s["m pred + regions"]["l1"] != s["m pred"]["l1"]
    assert abs(s["m pred + regions"]["l1"] - s["m pred"]["l1"]) < 0.01
