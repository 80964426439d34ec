"""Baselines every learned forecaster must beat: repeat the last frame, and constant
velocity extrapolated from the last few frames."""

from __future__ import annotations

import torch

from models.forecast.base import Forecaster, check_history, check_steps


class LastForecaster(Forecaster):
    """Hold the last observed keypoints (what a receiver does when it has nothing better)."""

    name = "last"
    stochastic = False

    def forecast_batch(self, history: torch.Tensor, steps: int, samples: int = 1) -> torch.Tensor:
        check_history(history)
        check_steps(steps, samples)
        last = history[:, -1].float()
        return last[:, None, None, :].expand(-1, samples, steps, -1).clone()


class LinearForecaster(Forecaster):
    """Constant-velocity extrapolation from the last observed frame.

    The velocity is the least-squares slope over the last ``window`` frames rather than
    the last difference alone: detector keypoints jitter frame to frame, and a
    two-point slope amplifies that jitter over a long horizon. Exact on linear motion
    for any window. With a single observed frame it repeats that frame.
    """

    name = "linear"
    stochastic = False

    def __init__(self, window: int = 4) -> None:
        if window < 2:
            raise ValueError("window must be >= 2")
        self.window = window

    def forecast_batch(self, history: torch.Tensor, steps: int, samples: int = 1) -> torch.Tensor:
        check_history(history)
        check_steps(steps, samples)
        h = history.float()
        w = min(self.window, h.shape[1])
        last = h[:, -1]
        if w < 2:
            vel = torch.zeros_like(last)
        else:
            seg = h[:, -w:]
            t = torch.arange(w, dtype=h.dtype, device=h.device)
            t = t - t.mean()
            vel = (seg * t[None, :, None]).sum(1) / (t * t).sum()
        k = torch.arange(1, steps + 1, dtype=h.dtype, device=h.device)
        out = last[:, None, :] + k[None, :, None] * vel[:, None, :]
        return out[:, None].expand(-1, samples, -1, -1).clone()


class DampedForecaster(LinearForecaster):
    """Velocity extrapolation that fades: step k moves by v·(d + d² + ... + d^k).

    Between repeat-last (d = 0) and constant velocity (d = 1): a face's motion reverses within a
    few frames (a nod, a word), so a full-velocity guess overshoots where a damped one does not.
    """

    name = "damped"

    def __init__(self, window: int = 4, damping: float = 0.7) -> None:
        super().__init__(window)
        if not 0.0 <= damping <= 1.0:
            raise ValueError("damping must be in [0, 1]")
        self.damping = damping

    def forecast_batch(self, history: torch.Tensor, steps: int, samples: int = 1) -> torch.Tensor:
        lin = super().forecast_batch(history, steps, 1)[:, 0]  # last + k·v
        last = history.float()[:, -1]
        k = torch.arange(1, steps + 1, dtype=lin.dtype, device=lin.device)
        gain = torch.cumsum(self.damping ** k, 0)  # d + ... + d^k, instead of k
        out = last[:, None] + (lin - last[:, None]) * (gain / k)[None, :, None]
        return out[:, None].expand(-1, samples, -1, -1).clone()
