"""GRU + conditional RealNVP normalising flow (TempFlow-style GRU-NF).

A GRU encodes the frames seen so far into h; a conditional flow maps the next frame's
normalised change y (60 values) to a standard Gaussian z:

  z = f_K ∘ ... ∘ f_1 ∘ a(y; h),   log p(y | h) = log N(z; 0, I) + Σ log|det ∂f/∂y|

``a`` is an element-wise conditional affine layer (so the flow starts as a
conditional Gaussian and the couplings only add what a Gaussian cannot express);
each ``f_k`` is an affine coupling layer (RealNVP) with alternating masks (even/odd
dims, then first/second half, and their complements), whose scale/shift nets see the
kept half and h. Training is exact maximum likelihood with teacher forcing (the GRU
reads the true frames), as in the paper. Sampling draws z ~ N(0, I·T²) (T =
``temperature``, 1 = the learned distribution) and inverts the flow; the sampled frame
is fed back into the GRU (free rollout), one independent path per sample.

The flow runs on *normalised changes* (change since the previous frame divided by
the per-dimension training-split constant) so its inputs are O(1) whatever the
detector's scale; raw keypoints would put the Jacobian and coordinate dims at very
different scales and make the log-determinants badly conditioned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.forecast.base import KP_DIM, Normalizer


@dataclass
class GRUNFConfig:
    hidden: int = 128  # GRU state = flow condition
    layers: int = 1
    dropout: float = 0.1
    absolute: bool = False  # also feed the standardised absolute position (see base.Normalizer)
    flow_blocks: int = 6  # affine coupling layers
    flow_hidden: int = 128  # width of each coupling's scale/shift net
    scale_limit: float = 2.0  # |log scale| per coupling is bounded (tanh) for stability
    temperature: float = 1.0  # sampling temperature (1 = the trained distribution)


def coupling_masks(dim: int, n: int) -> list[torch.Tensor]:
    """Alternating masks (1 = kept/conditioning half): even/odd, odd/even, first/second
    half, second/first half, repeated. Mixing the two patterns lets every dimension
    condition every other within a few layers (x/y of one keypoint are adjacent, its
    Jacobian is in the second half)."""
    idx = torch.arange(dim)
    pats = [(idx % 2 == 0), (idx % 2 == 1), (idx < dim // 2), (idx >= dim // 2)]
    return [pats[i % 4].float() for i in range(n)]


class AffineCoupling(nn.Module):
    def __init__(self, dim: int, cond: int, hidden: int, mask: torch.Tensor, scale_limit: float) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.scale_limit = scale_limit
        self.net = nn.Sequential(nn.Linear(dim + cond, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 2 * dim))
        nn.init.zeros_(self.net[-1].weight)  # identity at init
        nn.init.zeros_(self.net[-1].bias)

    def _st(self, kept: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.net(torch.cat([kept, c], -1)).chunk(2, -1)
        free = 1.0 - self.mask
        return self.scale_limit * torch.tanh(s / self.scale_limit) * free, t * free

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self._st(x * self.mask, c)
        return x * torch.exp(s) + t, s.sum(-1)

    def inverse(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s, t = self._st(z * self.mask, c)  # kept dims are unchanged by forward, so this is exact
        return (z - t) * torch.exp(-s)


class CondAffine(nn.Module):
    """z = (y - m(h)) · exp(-s(h)): a conditional Gaussian as the flow's first layer."""

    def __init__(self, dim: int, cond: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cond, hidden), nn.GELU(), nn.Linear(hidden, 2 * dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _ms(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, s = self.net(c).chunk(2, -1)
        return m, s.clamp(-7.0, 5.0)

    def forward(self, y: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, s = self._ms(c)
        return (y - m) * torch.exp(-s), -s.sum(-1)

    def inverse(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        m, s = self._ms(c)
        return z * torch.exp(s) + m


class ConditionalFlow(nn.Module):
    def __init__(self, dim: int, cond: int, blocks: int, hidden: int, scale_limit: float) -> None:
        super().__init__()
        self.dim = dim
        self.base = CondAffine(dim, cond, hidden)
        self.couplings = nn.ModuleList(
            AffineCoupling(dim, cond, hidden, m, scale_limit) for m in coupling_masks(dim, blocks))

    def forward(self, y: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y -> (z, log|det dz/dy|)."""
        z, logdet = self.base(y, c)
        for f in self.couplings:
            z, ld = f(z, c)
            logdet = logdet + ld
        return z, logdet

    def inverse(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for f in reversed(self.couplings):
            z = f.inverse(z, c)
        return self.base.inverse(z, c)

    def log_prob(self, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        z, logdet = self(y, c)
        return -0.5 * (z * z).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi) + logdet


class GRUNFNet(nn.Module):
    def __init__(self, cfg: GRUNFConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = Normalizer(KP_DIM, cfg.absolute)
        self.inp = nn.Sequential(nn.Linear(self.norm.feat_dim, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout))
        self.gru = nn.GRU(cfg.hidden, cfg.hidden, num_layers=cfg.layers, batch_first=True)
        self.flow = ConditionalFlow(KP_DIM, cfg.hidden, cfg.flow_blocks, cfg.flow_hidden, cfg.scale_limit)

    def rollout(self, history: torch.Tensor, steps: int, samples: int = 1) -> torch.Tensor:
        b = history.shape[0]
        out, h = self.gru(self.inp(self.norm.seq_features(history)))
        # the context is deterministic: encode once, then branch into independent samples
        top = out[:, -1].repeat_interleave(samples, 0)
        h = h.repeat_interleave(samples, 1)
        x_prev = history[:, -1].repeat_interleave(samples, 0)
        preds = []
        for _ in range(steps):
            z = torch.randn_like(x_prev) * self.cfg.temperature
            x = x_prev + self.norm.delta_to_raw(self.flow.inverse(z, top))
            preds.append(x)
            o, h = self.gru(self.inp(self.norm.features(x, x_prev))[:, None], h)
            top, x_prev = o[:, 0], x
        return torch.stack(preds, 1).reshape(b, samples, steps, -1)

    def loss(self, window: torch.Tensor, n_obs: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Exact negative log-likelihood (nats per dimension, normalised-change space) of
        every frame after the first given the frames before it."""
        feats = self.norm.seq_features(window)
        out, _ = self.gru(self.inp(feats))
        y = feats[:, 1:, :KP_DIM]
        c = out[:, :-1]
        lp = self.flow.log_prob(y.reshape(-1, KP_DIM), c.reshape(-1, c.shape[-1]))
        nll = -lp.mean() / KP_DIM
        return nll, {"nll": nll.item()}
