"""Rate control of the predictive stream (sender.rate), on keypoints the shipped detector finds in
the bundled talking-head clip, played back and forth for a minute."""

from __future__ import annotations

import numpy as np
import pytest

from sender.kpsend import PredictiveSender
from sender.rate import RateConfig, RateController
from shared import kpvector as V
from shared import protocol as P
from shared.kpcodec import DEFAULT_STREAM

FPS = 30.0


@pytest.fixture(scope="module")
def recorded(demo_clip) -> np.ndarray:
    """(1800, 60): a minute of real detector keypoints (the clip forwards, backwards, forwards...)."""
    import torch

    from bench.common import detect_keypoints
    from models.data import center_square, read_clip
    from models.fomm.io import DEFAULT_WEIGHTS, load_motion_model

    torch.set_num_threads(1)
    model, _ = load_motion_model(DEFAULT_WEIGHTS)
    frames = np.stack([center_square(f, 64) for f in read_clip(demo_clip)])
    kp = detect_keypoints(model, frames)
    loop = np.concatenate([kp, kp[::-1]])  # no jump where the clip starts over
    return np.resize(loop, (1800, V.KP_DIM)).astype(np.float32) if len(loop) else kp


def simulate(kp: np.ndarray, target: float, tolerance: float = DEFAULT_STREAM.tolerance) -> dict:
    """Code ``kp`` at 30 fps through a PredictiveSender with rate control; per-second wire rates."""
    rc = RateController(RateConfig(target), tolerance)
    sent: list[tuple[float, int]] = []

    def send(msg: P.CodedKeypoints) -> int:
        n = len(P.encode(msg))
        sent.append((t, n + 95))
        return n

    ps = PredictiveSender(send, DEFAULT_STREAM, ts_base_us=0, rate=rc)
    tols = []
    for i, v in enumerate(kp):
        t = i / FPS
        ps.frame(i, int(t * 1e6), v, t)
        tols.append(ps.encoder.tolerance)
    seconds = int(len(kp) / FPS)
    per_s = np.zeros(seconds)
    for ts, n in sent:
        per_s[min(int(ts), seconds - 1)] += n * 8 / 1000
    return {"kbps": per_s, "tolerance": np.array(tols), "controller": rc, "sender": ps}


@pytest.mark.parametrize("target", [8.0, 15.0])
def test_the_rate_settles_near_the_target_and_stays(recorded: np.ndarray, target: float) -> None:
    r = simulate(recorded, target)
    settled = r["kbps"][20:]  # after 20 s
    assert abs(settled.mean() / target - 1) < 0.2, (settled.mean(), target)
    tol = r["tolerance"][20 * 30:]
    # stable: in the last 40 s the tolerance moves at most once per window (3 s), and stays in a narrow band
    changes = int((np.diff(tol) != 0).sum())
    assert changes <= 14 and tol.max() / tol.min() < 1.6, (changes, tol.min(), tol.max())


def test_tighter_targets_get_larger_tolerances(recorded: np.ndarray) -> None:
    low, high = simulate(recorded, 6.0), simulate(recorded, 20.0)
    assert low["tolerance"][-300:].mean() > 1.5 * high["tolerance"][-300:].mean()
    assert low["kbps"][20:].mean() < high["kbps"][20:].mean()


def test_an_unreachable_target_saturates_and_says_so(recorded: np.ndarray) -> None:
    # max_gap bounds the skipping: one message every 9 frames costs more than 1 kbps
    r = simulate(recorded, 1.0)
    assert r["controller"].saturated and r["tolerance"][-1] == RateConfig(1.0).max_tolerance
    assert r["kbps"][20:].mean() > 1.0


def test_rate_is_measured_over_its_window() -> None:
    rc = RateController(RateConfig(10.0, window_s=2.0, gain=1.0), 0.006)
    assert rc.update(0.0) == 0.006 and rc.rate_kbps(1.0) is None  # no whole window yet
    for i in range(60):  # 30 messages/s of 30 B + 95 B for 2 s = 30 kbps
        rc.sent(i / 30, 30)
    assert rc.rate_kbps(2.0) == pytest.approx(30 * 125 * 8 / 1000, rel=0.05)
    assert rc.update(2.0) == pytest.approx(0.012)  # 3x over: the step is capped at 2x
    assert rc.update(2.5) == pytest.approx(0.012)  # and it waits a window before judging again
    with pytest.raises(ValueError):
        RateConfig(0.0)
