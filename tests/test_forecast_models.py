"""Forecaster interface, causality, baselines, the flow's maths, checkpoints, and learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointError
from models.forecast import NAMES, NeuralForecaster, build_net, load_forecaster, save_forecaster
from models.forecast.base import norm_stats
from models.forecast.baselines import DampedForecaster, LastForecaster, LinearForecaster
from models.forecast.grunf import ConditionalFlow
from models.forecast.snf import SNFConfig, SNFForecaster
from models.forecast.train import TINY, TrainConfig, train

torch.set_num_threads(1)
LEARNED = ("gru", "vrnn", "grunf")


def sine_series(n: int = 8, length: int = 80, seed: int = 0) -> list[np.ndarray]:
    """60-dim series driven by 3 slow sines (random frequency/phase per series) through one
    fixed mixing matrix, like keypoints that all follow a few head-pose angles. Low rank
    on purpose: a tiny network (hidden 16 < 60) can learn it in a few steps."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(123).normal(0, 0.1, size=(3, 60))
    t = np.arange(length)[:, None]
    out = []
    for _ in range(n):
        freq, phase = rng.uniform(0.08, 0.15, size=3), rng.uniform(0, 2 * np.pi, size=3)
        out.append((np.sin(freq * t + phase) @ mix).astype(np.float32))
    return out


def tiny_forecaster(name: str, series: list[np.ndarray] | None = None) -> NeuralForecaster:
    torch.manual_seed(0)
    net = build_net(name, TINY[name])
    net.norm.set_stats(norm_stats(series or sine_series(2)))
    return NeuralForecaster(name, net, name != "gru", net.cfg)


def tiny_snf(sigma: float = 1.0) -> SNFForecaster:
    return SNFForecaster(tiny_forecaster("grunf"), tiny_forecaster("gru"), SNFConfig(sigma=sigma))


def all_forecasters() -> list:
    return [LastForecaster(), LinearForecaster(), DampedForecaster(), *(tiny_forecaster(n) for n in LEARNED),
            tiny_snf()]


@pytest.mark.parametrize("f", all_forecasters(), ids=lambda f: f.name)
def test_shapes_and_interface(f) -> None:
    hist = sine_series(1, 12)[0]
    out = f.forecast(hist, steps=5, samples=3)
    assert out.shape == (3, 5, 60) and out.dtype == np.float32 and np.isfinite(out).all()
    b = f.forecast_batch(torch.from_numpy(np.stack([hist, hist + 0.1])), 4, 2)
    assert tuple(b.shape) == (2, 2, 4, 60)
    assert f.forecast(hist[:1], 2).shape == (1, 2, 60)  # a single observed frame is allowed
    with pytest.raises(ValueError):
        f.forecast(hist[:, :59], 2)
    with pytest.raises(ValueError):
        f.forecast(hist, 0)
    if not f.stochastic:
        assert np.array_equal(out[0], out[2])


@pytest.mark.parametrize("name", LEARNED)
def test_stochastic_models_give_distinct_samples(name: str) -> None:
    f = tiny_forecaster(name)
    # untrained decoders start at zero output; perturb so samples can differ
    with torch.no_grad():
        for p in f.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = f.forecast(sine_series(1, 12)[0], 4, 3)
    spread = np.abs(out[0] - out[1]).mean()
    assert (spread > 0) == f.stochastic


@pytest.mark.parametrize("f", all_forecasters(), ids=lambda f: f.name)
def test_rollout_does_not_see_future(f) -> None:
    if hasattr(f, "net"):
        with torch.no_grad():
            for p in f.net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    win = torch.from_numpy(sine_series(2, 20)[0])[None]
    changed = win.clone()
    changed[:, 8:] += 5.0  # a wildly different future
    torch.manual_seed(1)
    a = f.forecast_batch(win[:, :8], 12, 2)
    torch.manual_seed(1)
    b = f.forecast_batch(changed[:, :8], 12, 2)
    assert torch.equal(a, b)
    # and the history does matter (guards against a test that passes vacuously)
    torch.manual_seed(1)
    c = f.forecast_batch(win[:, :8] + 0.3, 12, 2)
    assert not torch.allclose(a, c)


def test_linear_exact_on_linear_motion_and_last_repeats() -> None:
    rng = np.random.default_rng(0)
    x0, v = rng.normal(size=60).astype(np.float32), rng.normal(size=60).astype(np.float32) * 0.01
    seq = x0 + np.arange(20, dtype=np.float32)[:, None] * v
    pred = LinearForecaster().forecast(seq[:10], 10)[0]
    np.testing.assert_allclose(pred, seq[10:], atol=1e-5)
    np.testing.assert_allclose(LastForecaster().forecast(seq[:10], 3)[0], np.repeat(seq[9:10], 3, 0))
    # on accelerating motion the linear baseline must be wrong (the test can fail)
    quad = x0 + (np.arange(20, dtype=np.float32)[:, None] ** 2) * v
    assert np.abs(LinearForecaster().forecast(quad[:10], 10)[0] - quad[10:]).max() > 1e-3


def test_flow_inverse_and_logdet() -> None:
    torch.manual_seed(0)
    flow = ConditionalFlow(dim=6, cond=4, blocks=4, hidden=16, scale_limit=2.0).double()
    with torch.no_grad():  # zero-initialised last layers would make the flow the identity
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, c = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    z, logdet = flow(x, c)
    assert not torch.allclose(z, x)
    torch.testing.assert_close(flow.inverse(z, c), x, atol=1e-9, rtol=1e-9)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda v, i=i: flow(v[None], c[i:i + 1])[0][0], x[i])
        assert float(logdet[i].detach()) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-8)
    # log_prob integrates the change of variables consistently with a Gaussian base
    lp = flow.log_prob(x, c)
    ref = -0.5 * (z * z).sum(-1) - 3 * np.log(2 * np.pi) + logdet
    torch.testing.assert_close(lp, ref)


def test_checkpoint_roundtrip_and_errors(tmp_path) -> None:
    f = tiny_forecaster("vrnn")
    path = tmp_path / "forecast_vrnn.pt"
    save_forecaster(path, "vrnn", f.net, {"detector_sha1": "x"})
    g = load_forecaster("vrnn", tmp_path)
    assert g.stochastic and g.meta["detector_sha1"] == "x"
    for a, b in zip(f.net.state_dict().values(), g.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="not found"):
        load_forecaster("gru", tmp_path)
    (tmp_path / "forecast_gru.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError):
        load_forecaster("gru", tmp_path)
    # a VRNN file presented as a GRU-NF: kind mismatch
    (tmp_path / "forecast_grunf.pt").write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="vrnn"):
        load_forecaster("grunf", tmp_path)
    # same kind, other shapes
    big = build_net("vrnn", {**TINY["vrnn"].__dict__, "hidden": 24})
    save_forecaster(tmp_path / "forecast_vrnn.pt", "vrnn", big)
    g2 = load_forecaster("vrnn", tmp_path)  # config travels with the file, so this loads...
    assert g2.net.cfg.hidden == 24
    blob = torch.load(tmp_path / "forecast_vrnn.pt", weights_only=True)
    blob["config"]["hidden"] = 16  # ...but a config that disagrees with the weights does not
    torch.save(blob, tmp_path / "forecast_vrnn.pt")
    with pytest.raises(CheckpointError, match="shape"):
        load_forecaster("vrnn", tmp_path)
    with pytest.raises(ValueError, match="unknown forecaster"):
        load_forecaster("transformer")
    assert set(NAMES) == {"last", "linear", "damped", "gru", "vrnn", "grunf", "grusnf"}


@pytest.mark.parametrize("name", LEARNED)
def test_tiny_models_learn_sines(name: str, tmp_path) -> None:
    train_s, val_s = sine_series(12, 60, seed=1), sine_series(3, 60, seed=2)
    # no augmentation: this checks that the model + trainer can learn at all in 60 steps; flipped,
    # reversed and re-timed windows are a harder task than one the tiny nets can master that fast
    cfg = TrainConfig(model=name, tiny=True, steps=60, minutes=5, batch=32, lr=1e-2, n_obs=8, min_obs=8,
                      n_fut=6, val_every=1000, val_samples=4, out=str(tmp_path / f"forecast_{name}.pt"),
                      run_dir=str(tmp_path / "run"), augment=None)
    s = train(cfg, train_s, val_s, progress=False)
    f = s["final"]
    # smooth sines: a trained model must clearly beat holding the last frame
    assert f["val_mae"] < 0.8 * f["last_mae"], f
    rows = (tmp_path / "run" / "val.jsonl").read_text().splitlines()
    assert rows and (tmp_path / "run" / "val.png").exists()
    g = load_forecaster(name, tmp_path)
    assert g.forecast(val_s[0][:8], 6, 2).shape == (2, 6, 60)
    # resume continues from the saved step
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 65, "resume": True})
    assert train(cfg2, train_s, val_s, progress=False)["steps"] == 65


def test_snf_pulls_samples_towards_the_gru_point_forecast() -> None:
    """GRU-SNF's Metropolis steps move GRU-NF's samples towards the GRU's forecast (in mean squared
    distance over many samples) and they do move: proposals accepted, but not all."""
    hist = sine_series(1, 16, seed=3)[0]
    point = tiny_forecaster("gru").forecast(hist, 1)[0, 0]
    torch.manual_seed(1)
    plain = tiny_forecaster("grunf").forecast(hist, 1, samples=512)[:, 0]
    snf = SNFForecaster(tiny_forecaster("grunf"), tiny_forecaster("gru"),
                        SNFConfig(sigma=0.5, mcmc_steps=20, step_size=0.1))
    torch.manual_seed(1)
    pulled = snf.forecast(hist, 1, samples=512)[:, 0]
    d_plain = ((plain - point) ** 2).mean()
    d_pulled = ((pulled - point) ** 2).mean()
    assert d_pulled < 0.9 * d_plain, (d_pulled, d_plain)
    assert 0.05 < snf.acceptance < 0.95
    assert pulled.std(0).mean() > 0.3 * plain.std(0).mean()  # still a distribution, not the point forecast


def test_grusnf_loads_from_the_two_checkpoints(tmp_path) -> None:
    for name in ("gru", "grunf"):
        f = tiny_forecaster(name)
        save_forecaster(tmp_path / f"forecast_{name}.pt", name, f.net)
    f = load_forecaster("grusnf", tmp_path)
    assert isinstance(f, SNFForecaster) and f.stochastic
    assert f.forecast(sine_series(1, 12)[0], 3, samples=2).shape == (2, 3, 60)
    with pytest.raises(ValueError):
        build_net("grusnf")


def test_damped_velocity_lies_between_repeat_last_and_constant_velocity() -> None:
    hist = np.stack([np.full(60, 0.01 * t, np.float32) for t in range(8)])  # steady motion
    last = LastForecaster().forecast(hist, 6)[0]
    lin = LinearForecaster().forecast(hist, 6)[0]
    damped = DampedForecaster(damping=0.7).forecast(hist, 6)[0]
    assert np.allclose(DampedForecaster(damping=1.0).forecast(hist, 6)[0], lin, atol=1e-6)
    assert np.allclose(DampedForecaster(damping=0.0).forecast(hist, 6)[0], last, atol=1e-6)
    assert (damped[:, 0] > last[:, 0]).all() and (damped[:, 0] < lin[:, 0]).all()
    step = np.diff(damped[:, 0])
    assert (np.diff(step) < 0).all()  # each step moves less than the one before
    with pytest.raises(ValueError):
        DampedForecaster(damping=1.5)
