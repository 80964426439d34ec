"""Variational RNN forecaster (Chung et al. 2015).

Per step t, with GRU state h (summary of frames < t):
  prior     p(z_t | h)            = N(mu_p(h), sigma_p(h))
  posterior q(z_t | x_t, h)       = N(mu_q(phi_x(x_t), h), sigma_q(...))
  decoder   x̂_t = dec(phi_z(z_t), h)   (the normalised change since frame t-1)
  recurrence h <- GRU([phi_x(x_t), phi_z(z_t)], h)

Loss = ELBO over the whole window (teacher-forced, posterior samples; Gaussian
decoder with unit variance in normalised units -> 0.5·SE) with a linearly annealed
KL weight, **plus** a free-rollout term: from the context, the future is generated
with prior samples and fed back, exactly as at inference, and its raw-unit L1 against
the truth is added (``rollout_weight``). The seed paper's code instead feeds ground
truth into the GRU during the predicted steps; we never do, so without this term
the model would be trained on inputs it never sees at test time (exposure bias).
Set ``rollout_weight=0`` for the plain ELBO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.forecast.base import KP_DIM, Normalizer, position_l1


@dataclass
class VRNNConfig:
    # sizes cut from 160/128/16 to limit overfitting to the ~50 training source videos
    hidden: int = 96  # GRU state
    mlp: int = 64  # width of feature / prior / posterior / decoder nets
    z_dim: int = 8
    kl_weight: float = 1.0  # final weight of the KL term (true ELBO at 1)
    kl_anneal_steps: int = 1000  # KL weight ramps 0 -> kl_weight over these training steps...
    kl_anneal_frac: float = 0.3  # ...or over this fraction of the trainer's budget, whichever is shorter
    rollout_weight: float = 1.0
    dropout: float = 0.3
    absolute: bool = False  # also feed the standardised absolute position (see base.Normalizer)


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, o))


class VRNNNet(nn.Module):
    def __init__(self, cfg: VRNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = Normalizer(KP_DIM, cfg.absolute)
        m, hd, z = cfg.mlp, cfg.hidden, cfg.z_dim
        self.phi_x = nn.Sequential(nn.Linear(self.norm.feat_dim, m), nn.GELU(), nn.Dropout(cfg.dropout),
                                   nn.Linear(m, m), nn.GELU())
        self.phi_z = nn.Sequential(nn.Linear(z, m), nn.GELU())
        self.prior = _mlp(hd, m, 2 * z)
        self.post = _mlp(m + hd, m, 2 * z)
        self.dec = _mlp(m + hd, m, KP_DIM)
        self.cell = nn.GRUCell(2 * m, hd)
        nn.init.zeros_(self.dec[-1].weight)
        nn.init.zeros_(self.dec[-1].bias)
        # the KL anneal is driven by the trainer through this buffer (saved, so resumes keep it)
        self.register_buffer("train_step", torch.zeros((), dtype=torch.long))
        # fraction of the training budget used so far (set by the trainer, not saved): a
        # time-limited run on a slow machine may do fewer than kl_anneal_steps steps and
        # would otherwise end (and ship) with beta < 1, a prior that never had to match
        # the posterior, so free rollouts (prior samples) would not be what was trained
        self.budget_frac = 0.0

    @staticmethod
    def _gauss(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = p.chunk(2, -1)
        return mu, logvar.clamp(-8.0, 6.0)

    def _step_observed(self, feat: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Consume one observed frame; returns (new h, KL, decoded change)."""
        px = self.phi_x(feat)
        mu_p, lv_p = self._gauss(self.prior(h))
        mu_q, lv_q = self._gauss(self.post(torch.cat([px, h], -1)))
        zt = mu_q + torch.randn_like(mu_q) * torch.exp(0.5 * lv_q)
        pz = self.phi_z(zt)
        dec = self.dec(torch.cat([pz, h], -1))
        kl = 0.5 * (lv_p - lv_q + (torch.exp(lv_q) + (mu_q - mu_p) ** 2) / torch.exp(lv_p) - 1.0).sum(-1)
        return self.cell(torch.cat([px, pz], -1), h), kl, dec

    def _encode(self, history: torch.Tensor) -> torch.Tensor:
        feats = self.norm.seq_features(history)
        h = history.new_zeros(history.shape[0], self.cfg.hidden)
        for t in range(history.shape[1]):
            h, _, _ = self._step_observed(feats[:, t], h)
        return h

    def _generate(self, h: torch.Tensor, x_prev: torch.Tensor, steps: int) -> torch.Tensor:
        preds = []
        for _ in range(steps):
            mu_p, lv_p = self._gauss(self.prior(h))
            zt = mu_p + torch.randn_like(mu_p) * torch.exp(0.5 * lv_p)
            pz = self.phi_z(zt)
            x = x_prev + self.norm.delta_to_raw(self.dec(torch.cat([pz, h], -1)))
            preds.append(x)
            h = self.cell(torch.cat([self.phi_x(self.norm.features(x, x_prev)), pz], -1), h)
            x_prev = x
        return torch.stack(preds, 1)

    def rollout(self, history: torch.Tensor, steps: int, samples: int = 1) -> torch.Tensor:
        b = history.shape[0]
        # each sample gets its own posterior path through the context and its own future
        hist = history.repeat_interleave(samples, 0)
        h = self._encode(hist)
        pred = self._generate(h, hist[:, -1], steps)
        return pred.reshape(b, samples, steps, -1)

    def kl_beta(self) -> float:
        ramp = int(self.train_step) / max(1, self.cfg.kl_anneal_steps)
        if self.cfg.kl_anneal_frac > 0:
            ramp = max(ramp, self.budget_frac / self.cfg.kl_anneal_frac)
        return self.cfg.kl_weight * min(1.0, ramp)

    def loss(self, window: torch.Tensor, n_obs: int) -> tuple[torch.Tensor, dict[str, float]]:
        feats = self.norm.seq_features(window)
        target = feats[..., :KP_DIM]  # normalised change of each frame
        h = window.new_zeros(window.shape[0], self.cfg.hidden)
        se, kl, h_ctx = 0.0, 0.0, h
        for t in range(window.shape[1]):
            h_new, kl_t, dec = self._step_observed(feats[:, t], h)
            if t > 0:  # frame 0 has no predecessor, so no change to explain
                se = se + 0.5 * ((dec - target[:, t]) ** 2).sum(-1).mean()
                kl = kl + kl_t.mean()
            h = h_new
            if t == n_obs - 1:
                h_ctx = h
        n = window.shape[1] - 1
        se, kl = se / n, kl / n
        beta = self.kl_beta()
        loss = (se + beta * kl) / KP_DIM
        se_v, kl_v = se.item(), kl.item()
        logs = {"se": se_v / KP_DIM, "kl": kl_v / KP_DIM, "beta": beta}
        if self.cfg.rollout_weight > 0:
            pred = self._generate(h_ctx, window[:, n_obs - 1], window.shape[1] - n_obs)
            roll = position_l1(pred, window[:, n_obs:], self.norm)
            loss = loss + self.cfg.rollout_weight * roll
            logs["roll_l1"] = roll.item()
        logs["nats_per_dim"] = (se_v + kl_v) / KP_DIM + 0.5 * math.log(2 * math.pi)
        return loss, logs
