"""CA-SAM task routing: one small VAE per task on pooled encoder features (method.md 3.2).

An image (tile) is described by the channel mean and standard deviation of its frozen SAM
embedding E (B, 256, h, w) -> f (B, 512). Task t's VAE V_t is fitted on its training tiles
(``training.continual.calibrate_task_vae``), on features standardised with that task's own
mean m_t and std s_t. Its score is the negative evidence lower bound of f, per feature, in
the original feature space (so that the scores of different tasks are comparable)::

    z = (f - m_t) / s_t,   mu = enc(z),   r = dec(mu) - z
    s_t(f) = mean_d [ r^2 / (2 v_t) + log(v_t) / 2 + log s_t ] + KL(N(mu, sigma^2) || N(0, 1)) / d

v_t (per feature) is the decoder's noise variance, the mean squared residual of the task's
training tiles scored by VAEs that did not see them (cross-fitting by image); log s_t is the
Jacobian of the standardisation. Lower is more familiar.

The threshold tau_t is a high quantile of those held-out scores, so ``s_t <= tau_t`` means
"looks like task t's data". Routing takes, among the tasks that accept the tile, the one
whose VAE explains it best (lowest score); when no task accepts it the tile takes the base
path (-1: frozen SAM features into the decoder, no alignment layer). Tasks whose VAE was never
calibrated are not candidates; a model with no calibrated task routes everything to task 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BASE_PATH = -1


def pooled_features(embedding: torch.Tensor) -> torch.Tensor:
    """E (B, C, h, w) -> (B, 2C): per-channel mean and standard deviation, float32."""
    flat = embedding.float().flatten(2)
    return torch.cat([flat.mean(dim=2), flat.std(dim=2, unbiased=False)], dim=1)


class TaskVAE(nn.Module):
    """Gaussian VAE on standardised pooled features.

    Parameters
    ----------
    in_dim : int
        Feature size (2 x 256).
    hidden, latent : int
        MLP width and latent size (method.md: 32-d latent).

    Buffers ``feature_mean``, ``feature_std``, ``noise_log_var`` (in_dim,) and ``threshold``
    (scalar, +inf until calibrated) belong to the task and are saved with the model's
    trainable weights.
    """

    def __init__(self, in_dim: int = 512, hidden: int = 128, latent: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.GELU(), nn.Linear(hidden, in_dim))
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.register_buffer("noise_log_var", torch.zeros(in_dim))
        self.register_buffer("threshold", torch.tensor(math.inf))

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.threshold))

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean) / self.feature_std

    def _terms(self, features: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, in_dim) -> squared residuals (N, in_dim) in standardised units, KL (N,) per dim."""
        z = self.standardise(features)
        mu, logvar = self.encoder(z).chunk(2, dim=1)
        logvar = logvar.clamp(-10.0, 10.0)
        latent = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        residual = (self.decoder(latent) - z) ** 2
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=1) / z.shape[1]
        return residual, kl

    def loss(self, features: torch.Tensor) -> torch.Tensor:
        """Training objective (reparameterised negative ELBO per dim, unit noise), a scalar."""
        residual, kl = self._terms(features, sample=True)
        return (residual.mean(dim=1) + kl).mean()

    @torch.no_grad()
    def residuals(self, features: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, in_dim) squared reconstruction residuals at the posterior mean."""
        return self._terms(features, sample=False)[0]

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N,) deterministic negative ELBO per dim in feature space (lower =
        more familiar; comparable between tasks)."""
        residual, kl = self._terms(features, sample=False)
        log_var = self.noise_log_var
        nll = 0.5 * (residual / log_var.exp() + log_var) + self.feature_std.log()
        return nll.mean(dim=1) + kl

class TaskRouter(nn.Module):
    """One :class:`TaskVAE` per task; :meth:`route` picks a task per image."""

    def __init__(self, num_tasks: int, in_dim: int = 512):
        super().__init__()
        self.vaes = nn.ModuleList(TaskVAE(in_dim) for _ in range(num_tasks))

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, T): each task's score, +inf where the task does not accept the
        tile (score above its threshold, or never calibrated)."""
        columns = []
        for vae in self.vaes:
            if vae.calibrated:
                score = vae.score(features)
                columns.append(torch.where(score <= vae.threshold, score,
                                           torch.full_like(score, math.inf)))
            else:
                columns.append(torch.full((features.shape[0],), math.inf, device=features.device))
        return torch.stack(columns, dim=1)

    @torch.no_grad()
    def route(self, embedding: torch.Tensor) -> torch.Tensor:
        """E (B, C, h, w) -> (B,) long task index, :data:`BASE_PATH` (-1) for none."""
        features = pooled_features(embedding)
        batch = features.shape[0]
        if not any(vae.calibrated for vae in self.vaes):
            return torch.zeros(batch, dtype=torch.long, device=embedding.device)
        # scored in float32, as when the thresholds were calibrated (not under bf16 autocast)
        with torch.autocast(embedding.device.type, enabled=False):
            best, task = self.scores(features).min(dim=1)
        return torch.where(torch.isfinite(best), task, torch.full_like(task, BASE_PATH))
