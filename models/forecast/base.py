"""Common interface of keypoint forecasters, and the normalisation the neural ones share.

Every forecaster maps an observed history of keypoint vectors to ``steps`` future
vectors, ``samples`` times. Rollouts are free: after the history ends, a model only
ever sees its own predictions (never ground truth), exactly as on a live call.

Normalisation works live because it uses only the past plus fixed constants:
networks see and predict the *change* from the previous frame (so "stand still" is the
zero output), divided by per-dimension constants (the standard deviation of one-frame
changes on the training split); optionally (``absolute``) also the position
standardised with training-split constants. No statistic of the future (or of the clip being forecast)
is ever used. The constants live in the model as buffers, so they travel in its
checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.kpvector import KP_DIM

log = logging.getLogger(__name__)



class Forecaster:
    """Base class: subclasses implement :meth:`forecast_batch`."""

    name: str = "base"
    stochastic: bool = False

    def forecast_batch(self, history: torch.Tensor, steps: int, samples: int = 1) -> torch.Tensor:
        """history (B, N, 60) float tensor -> (B, samples, steps, 60)."""
        raise NotImplementedError

    def forecast(self, history: np.ndarray, steps: int, samples: int = 1) -> np.ndarray:
        """history (N, 60) float32 -> (samples, steps, 60) float32."""
        history = np.asarray(history, dtype=np.float32)
        if history.ndim != 2 or history.shape[1] != KP_DIM or history.shape[0] < 1:
            raise ValueError(f"history must be (N>=1, {KP_DIM}), got {history.shape}")
        check_steps(steps, samples)
        with torch.no_grad():
            out = self.forecast_batch(torch.from_numpy(history)[None], steps, samples)
        return out[0].cpu().numpy().astype(np.float32)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} stochastic={self.stochastic}>"


def check_steps(steps: int, samples: int) -> None:
    if int(steps) < 1 or int(samples) < 1:
        raise ValueError(f"steps and samples must be >= 1, got steps={steps}, samples={samples}")


def check_history(history: torch.Tensor) -> None:
    if history.ndim != 3 or history.shape[-1] != KP_DIM or history.shape[1] < 1:
        raise ValueError(f"history must be (B, N>=1, {KP_DIM}), got {tuple(history.shape)}")


class Normalizer(nn.Module):
    """Fixed constants from the training split (buffers, saved with the model)."""

    def __init__(self, dim: int = KP_DIM, absolute: bool = False) -> None:
        super().__init__()
        self.absolute = absolute
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("sigma", torch.ones(dim))
        self.register_buffer("dscale", torch.ones(dim))

    def set_stats(self, stats: dict[str, np.ndarray]) -> None:
        for k in ("mu", "sigma", "dscale"):
            getattr(self, k).copy_(torch.as_tensor(np.asarray(stats[k]), dtype=torch.float32))

    @property
    def feat_dim(self) -> int:
        return (2 if self.absolute else 1) * self.mu.shape[0]

    def features(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        """One step's network input: normalised change since the previous frame, and with
        ``absolute`` the standardised position too. Off by default: with few source
        videos the position identifies the clip, and models memorised it (train loss
        fell while validation on unseen videos got worse, on real and on synthetic data)."""
        d = (x - x_prev) / self.dscale
        return torch.cat([d, (x - self.mu) / self.sigma], dim=-1) if self.absolute else d

    def seq_features(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, T, 60) -> (B, T, 120); the first frame's change is taken as zero
        (its predecessor is unknown, as at the start of a live call)."""
        prev = torch.cat([seq[:, :1], seq[:, :-1]], dim=1)
        return self.features(seq, prev)

    def delta_to_raw(self, d: torch.Tensor) -> torch.Tensor:
        return d * self.dscale

    def raw_to_delta(self, d: torch.Tensor) -> torch.Tensor:
        return d / self.dscale


def norm_stats(series: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-dimension constants from training series (list of (T, 60))."""
    allx = np.concatenate([s for s in series if len(s)], axis=0).astype(np.float64)
    diffs = np.concatenate([np.diff(s, axis=0) for s in series if len(s) > 1], axis=0).astype(np.float64)
    # floors keep a dimension that never moves on the training split from dividing by ~0
    return {
        "mu": allx.mean(0).astype(np.float32),
        "sigma": np.maximum(allx.std(0), 1e-3).astype(np.float32),
        "dscale": np.maximum(diffs.std(0), 1e-4).astype(np.float32),
    }


def position_l1(pred: torch.Tensor, target: torch.Tensor, norm: Normalizer) -> torch.Tensor:
    """Training loss on rollouts: raw-unit L1 (the evaluation metric) divided by one
    global constant so its size does not depend on the detector's scale."""
    return (pred - target).abs().mean() / norm.dscale.mean()


class NeuralForecaster(Forecaster):
    """Wraps a network with ``rollout(history, steps, samples)``; eval mode, no grad."""

    def __init__(self, name: str, net: nn.Module, stochastic: bool, config: Any = None,
                 meta: dict[str, Any] | None = None) -> None:
        self.name = name
        self.net = net.eval()
        self.stochastic = stochastic
        self.config = config
        self.meta = dict(meta or {})

    def forecast_batch(self, history: torch.Tensor, steps: int, samples: int = 1) -> torch.Tensor:
        check_history(history)
        check_steps(steps, samples)
        with torch.no_grad():
            return self.net.rollout(history.float(), int(steps), int(samples))
