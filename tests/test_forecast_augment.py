"""Keypoint-window augmentation, the zero-initialised residual start, and best-on-validation selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.forecast import build_net, load_forecaster
from models.forecast.augment import (
    AugmentConfig,
    add_input_noise,
    flip_horizontal,
    resample_speed,
    reverse_time,
    translate,
)
from models.forecast.base import NeuralForecaster, norm_stats
from models.forecast.baselines import LastForecaster
from models.forecast.dataset import WindowSampler
from models.forecast.train import TrainConfig, train, val_metrics

torch.set_num_threads(1)


def rot(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def random_kp(rng: np.random.Generator, shape: tuple[int, ...] = ()) -> np.ndarray:
    xy = rng.uniform(-0.8, 0.8, size=(*shape, 20))
    jac = np.eye(2).reshape(4) + rng.normal(0, 0.2, size=(*shape, 10, 4))
    return np.concatenate([xy, jac.reshape(*shape, 40)], -1).astype(np.float32)


def test_flip_twice_is_identity_and_negates_only_x() -> None:
    w = random_kp(np.random.default_rng(0), (3, 7))
    f = flip_horizontal(w)
    np.testing.assert_array_equal(flip_horizontal(f), w)
    np.testing.assert_array_equal(f[..., 0:20:2], -w[..., 0:20:2])
    np.testing.assert_array_equal(f[..., 1:20:2], w[..., 1:20:2])
    assert not np.array_equal(f, w)


def test_flip_of_jacobian_is_the_mirrored_affine() -> None:
    # a keypoint whose neighbourhood rotates by +theta rotates by -theta in the mirror
    theta = 0.3
    kp = np.zeros(60, np.float32)
    kp[0], kp[1] = 0.25, -0.1
    for k in range(10):
        kp[20 + 4 * k:24 + 4 * k] = rot(theta).reshape(4)
    f = flip_horizontal(kp)
    assert f[0] == pytest.approx(-0.25) and f[1] == pytest.approx(-0.1)
    for k in range(10):
        np.testing.assert_allclose(f[20 + 4 * k:24 + 4 * k].reshape(2, 2), rot(-theta), atol=1e-6)
    # any J: mapping a mirrored offset with the flipped J = mirroring the mapped offset
    F = np.diag([-1.0, 1.0])
    rng = np.random.default_rng(1)
    w = random_kp(rng)
    fw = flip_horizontal(w)
    for k in range(10):
        j, fj = w[20 + 4 * k:24 + 4 * k].reshape(2, 2), fw[20 + 4 * k:24 + 4 * k].reshape(2, 2)
        u = rng.normal(size=2)
        np.testing.assert_allclose(fj @ (F @ u), F @ (j @ u), atol=1e-6)


def test_reverse_translate_and_speed() -> None:
    rng = np.random.default_rng(2)
    w = random_kp(rng, (9,))
    np.testing.assert_array_equal(reverse_time(reverse_time(w)), w)
    np.testing.assert_array_equal(reverse_time(w)[0], w[-1])
    t = translate(w, np.array([0.05, -0.02]))
    np.testing.assert_allclose(t[:, 0:20:2], np.clip(w[:, 0:20:2] + 0.05, -1, 1), atol=1e-6)
    np.testing.assert_allclose(t[:, 1:20:2], np.clip(w[:, 1:20:2] - 0.02, -1, 1), atol=1e-6)
    np.testing.assert_array_equal(t[:, 20:], w[:, 20:])  # Jacobians do not move
    assert np.abs(translate(w, np.array([5.0, 5.0]))[:, :20]).max() <= 1.0
    np.testing.assert_allclose(resample_speed(w, 2, 1.0, 5), w[2:7])
    np.testing.assert_allclose(resample_speed(w, 0, 2.0, 5), w[0:9:2])
    np.testing.assert_allclose(resample_speed(w, 0, 0.5, 3), [w[0], (w[0] + w[1]) / 2, w[1]], atol=1e-6)


def test_noise_touches_only_observed_frames_and_sampler_shapes() -> None:
    rng = np.random.default_rng(3)
    win = random_kp(rng, (4, 10))
    noisy = add_input_noise(win, 6, np.full(60, 0.01, np.float32), 0.5, rng)
    np.testing.assert_array_equal(noisy[:, 6:], win[:, 6:])
    assert not np.array_equal(noisy[:, :6], win[:, :6])
    series = [random_kp(rng, (n,)) for n in (30, 40, 12)]
    s = WindowSampler(series, 12, seed=0, augment=AugmentConfig(speed_p=1.0))
    out = s.sample(16)
    assert out.shape == (16, 12, 60) and np.isfinite(out).all()


@pytest.mark.parametrize("name", ["gru", "vrnn", "grunf"])
def test_zero_init_residual_model_is_repeat_last(name: str) -> None:
    """Full-size untrained nets: the output layer is zero, so the predicted change is zero."""
    rng = np.random.default_rng(4)
    series = [np.cumsum(rng.normal(0, 0.01, size=(40, 60)), 0).astype(np.float32) for _ in range(3)]
    torch.manual_seed(0)
    net = build_net(name, {"temperature": 0.0} if name == "grunf" else None)  # grunf: its mean path
    net.norm.set_stats(norm_stats(series))
    f = NeuralForecaster(name, net, name != "gru")
    hist = torch.from_numpy(np.stack([s[:12] for s in series]))
    got = f.forecast_batch(hist, 12, 3)
    want = LastForecaster().forecast_batch(hist, 12, 3)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_best_on_validation_is_shipped(tmp_path) -> None:
    """On a random walk nothing beats repeat-last on average; with selection the shipped model's
    validation MAE is never worse than the step-0 (repeat-last) model's, and the file holds it."""
    rng = np.random.default_rng(5)
    walk = [np.cumsum(rng.normal(0, 0.02, size=(60, 60)), 0).astype(np.float32) for _ in range(8)]
    cfg = TrainConfig(model="gru", tiny=True, steps=30, batch=16, lr=3e-2, n_obs=8, min_obs=8, n_fut=6,
                      val_every=10, out=str(tmp_path / "forecast_gru.pt"), run_dir=str(tmp_path / "run"))
    s = train(cfg, walk[:5], walk[5:], progress=False)
    assert s["final"]["val_mae"] <= s["final"]["last_mae"] + 1e-9
    assert (tmp_path / "run" / "final.pt").exists()
    f = load_forecaster("gru", path=tmp_path / "forecast_gru.pt")
    assert f.meta["selected_step"] == s["selected_step"] and f.meta["val_mae_optimistic"]
    from models.forecast.dataset import make_windows
    vw, _ = make_windows(walk[5:], 8, 6, 6)
    assert val_metrics(f.forecast_batch, torch.from_numpy(vw), 8, 1) == pytest.approx(s["final"]["val_mae"], rel=1e-5)


def test_vrnn_kl_weight_reaches_one_within_a_short_budget() -> None:
    """A time-limited run may do far fewer than kl_anneal_steps steps; the KL weight must still
    reach its final value (the trainer reports the budget fraction used)."""
    net = build_net("vrnn", {"kl_anneal_steps": 1000, "kl_anneal_frac": 0.3})
    net.train_step.fill_(100)
    net.budget_frac = 0.0
    assert net.kl_beta() == pytest.approx(0.1)
    net.budget_frac = 0.15
    assert net.kl_beta() == pytest.approx(0.5)
    net.budget_frac = 0.3
    assert net.kl_beta() == pytest.approx(1.0)
    net.train_step.fill_(5000)
    net.budget_frac = 0.0
    assert net.kl_beta() == pytest.approx(1.0)
