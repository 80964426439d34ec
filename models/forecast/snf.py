"""GRU-SNF: GRU-NF sampled with Metropolis steps between the coupling blocks (arXiv 2512.04282).

No retraining: the trained GRU-NF (``models.forecast.grunf``) and a trained GRU point forecaster
(``models.forecast.gru``) are combined at inference. Sampling one frame inverts the flow from
z ~ N(0, T²I) block by block, as GRU-NF does; after the k-th of the K inverse blocks (the
couplings, then the conditional affine layer) the intermediate value u is moved by
``mcmc_steps`` Metropolis steps (Gaussian proposals of ``step_size``) under an energy that
moves from the base distribution towards the GRU's point forecast:

  E_k(u) = (1 - λ_k) · |u|² / 2 + λ_k · |g_k(u) - ŷ|² / (2 σ²),   λ_k = k / K

where g_k finishes the inversion (u -> the normalised change of the next frame) and ŷ is the GRU's
forecast of that change from this sample's own previous frame. The samples keep the flow's shape
and diversity near the start of the inversion and are pulled towards the point forecast at its
end: a stochastic normalising flow (Wu, Köhler & Noé 2020) whose target is the GRU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.forecast.base import Forecaster, NeuralForecaster, check_history, check_steps


@dataclass
class SNFConfig:
    mcmc_steps: int = 2  # Metropolis steps after each inverse block (the paper's setting)
    step_size: float = 0.35  # proposal standard deviation, in the flow's units
    sigma: float = 1.0  # width of the GRU target energy, in normalised-change units


class SNFForecaster(Forecaster):
    """GRU-NF's sampler with Metropolis corrections towards a GRU point forecast."""

    name = "grusnf"
    stochastic = True

    def __init__(self, grunf: NeuralForecaster, gru: NeuralForecaster, cfg: SNFConfig | None = None) -> None:
        self.grunf, self.gru = grunf, gru
        self.cfg = cfg or SNFConfig()
        self.accepted = 0  # Metropolis proposals accepted / made (a sampler that never moves is no SNF)
        self.proposed = 0

    def _blocks(self) -> list:
        """Inverse blocks in sampling order: couplings K..1, then the conditional affine layer."""
        flow = self.grunf.net.flow
        return [*reversed(flow.couplings), flow.base]

    def _finish(self, u: torch.Tensor, c: torch.Tensor, k: int) -> torch.Tensor:
        for f in self._blocks()[k + 1:]:
            u = f.inverse(u, c)
        return u

    def _energy(self, u: torch.Tensor, c: torch.Tensor, k: int, lam: float, target: torch.Tensor) -> torch.Tensor:
        y = self._finish(u, c, k)
        return (1.0 - lam) * 0.5 * (u * u).sum(-1) + lam * ((y - target) ** 2).sum(-1) / (2 * self.cfg.sigma ** 2)

    def _sample_change(self, z: torch.Tensor, c: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        blocks = self._blocks()
        u = z
        for k, f in enumerate(blocks):
            u = f.inverse(u, c)
            lam = (k + 1) / len(blocks)
            e = self._energy(u, c, k, lam, target)
            for _ in range(self.cfg.mcmc_steps):
                prop = u + self.cfg.step_size * torch.randn_like(u)
                e_prop = self._energy(prop, c, k, lam, target)
                accept = torch.rand_like(e).log() < (e - e_prop)
                u = torch.where(accept[:, None], prop, u)
                e = torch.where(accept, e_prop, e)
                self.accepted += int(accept.sum())
                self.proposed += accept.numel()
        return u

    def forecast_batch(self, history: torch.Tensor, steps: int, samples: int = 1) -> torch.Tensor:
        check_history(history)
        check_steps(steps, samples)
        net = self.grunf.net
        with torch.no_grad():
            history = history.float()
            b = history.shape[0]
            out, h = net.gru(net.inp(net.norm.seq_features(history)))
            top = out[:, -1].repeat_interleave(samples, 0)
            h = h.repeat_interleave(samples, 1)
            path = history.repeat_interleave(samples, 0)  # each sample's own history, for the GRU's target
            x_prev = path[:, -1]
            preds = []
            for _ in range(steps):
                point = self.gru.net.rollout(path[:, -32:], 1, 1)[:, 0, 0]
                target = net.norm.raw_to_delta(point - x_prev)
                z = torch.randn_like(x_prev) * net.cfg.temperature
                x = x_prev + net.norm.delta_to_raw(self._sample_change(z, top, target))
                preds.append(x)
                o, h = net.gru(net.inp(net.norm.features(x, x_prev))[:, None], h)
                top, x_prev = o[:, 0], x
                path = torch.cat([path, x[:, None]], 1)
            return torch.stack(preds, 1).reshape(b, samples, steps, -1)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None
