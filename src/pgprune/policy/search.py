"""A Gaussian search policy over the feature policy's parameters (`--policy search`).

The feature policy (policy/features.py) samples every unit by its own Bernoulli draw. Started from
a good mask, what it learns is the per-layer widths (bench/RESULTS.md: obs's own units at PG's
widths score as PG's mask), yet each draw moves a layer's width by only a few units while flipping
which of its boundary units are kept: the loss difference between two masks is mostly that unit
noise, not the widths. This policy perturbs the parameters instead of the units:

    theta = (w, a) of the feature policy; a step draws K/2 antithetic pairs theta +- sigma * eps,
    eps ~ N(0, I), and evaluates each one's hard mask (top units by score, exactly on the budget).
    dE[L]/dtheta ~ mean over pairs of (L(theta + sigma eps) - L(theta - sigma eps)) / (2 sigma) * eps

This is REINFORCE for the Gaussian N(theta, sigma^2 I) with the antithetic baseline (the estimator
of evolution strategies); Adam then steps theta as in the feature policy. Every sampled mask meets
the budget exactly and is deterministic given its parameters, so a pair's loss difference is what
its two allocations (and rankings) do, on the same batch. The hard mask is the one at theta.
"""

from __future__ import annotations

import torch

from pgprune.budget import hard_mask
from pgprune.errors import ConfigError
from pgprune.masks import Masks
from pgprune.policy.features import FeaturePolicy


class SearchPolicy(FeaturePolicy):
    """Masks drawn as the hard masks of Gaussian-perturbed feature-policy parameters (module text)."""

    sigma: float = 0.05  # the search's standard deviation (--sigma), in units of the standardised scores

    def _theta(self) -> torch.Tensor:
        return torch.cat([self.weights.reshape(-1), self.offsets])

    def _mask_at(self, theta: torch.Tensor) -> Masks:
        nw = self.weights.numel()
        z = self.scores_at(theta[:nw].reshape(self.weights.shape), theta[nw:])
        return hard_mask(self.layout.split(z), self.costs, self.sparsity, multiple=self.width_multiple)

    def hard_mask(self) -> Masks:
        return self._mask_at(self._theta())

    def sample(self, k: int, generator: torch.Generator, antithetic: bool = False) -> torch.Tensor:
        """K hard masks [K, N] at theta + sigma eps and theta - sigma eps for K/2 draws of eps."""
        if k % 2:
            raise ConfigError(f"the search policy draws antithetic pairs: K must be even (got K={k})")
        eps = torch.randn(k // 2, self.num_params, generator=generator, dtype=torch.float64)
        if not self.learn_offsets:
            eps[:, self.weights.numel():] = 0.0
        theta = self._theta()
        rows = []
        for e in eps:
            for sign in (1.0, -1.0):
                rows.append(self.layout.merge(self._mask_at(theta + sign * self.sigma * e).tensors).float())
        self._eps = eps
        return torch.stack(rows)

    @property
    def last_directions(self) -> torch.Tensor:
        """[K/2, num_params]: the directions eps of the last `sample` (row i made masks 2i and 2i + 1)."""
        return self._eps

    def gather_draws(self, world) -> None:
        """Every rank's directions, rank-major like the gathered losses, so all ranks take one step."""
        self._eps = world.all_gather(self._eps).reshape(-1, self._eps.shape[-1]).cpu()

    def learn(self, m: torch.Tensor, s: torch.Tensor, losses: torch.Tensor, estimator, baseline, lr: float) -> float:
        """The antithetic Gaussian estimate of dE[L]/dtheta (module text), then one Adam step."""
        d = losses[0::2].double() - losses[1::2].double()
        g = (d[:, None] * self._eps).mean(0) / (2.0 * self.sigma)
        self._adam_step(g, lr)
        mean = float(losses.mean())
        baseline.push(mean)  # no baseline is used; kept for the log and checkpoints
        return mean

    def describe(self) -> dict:
        return {**super().describe(), "policy": "search", "sigma": self.sigma}
