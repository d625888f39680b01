"""Bernoulli keep-probabilities over the prunable units, and the policies that produce them.

The policy-gradient loop works on a flat vector `s` [N] (every unit of every chosen kind); the
`UnitLayout` converts between it and the per-kind `[L, units]` tensors that `Masks`, the budget
and the metric initialisers use. Units that do not exist (padding in layers narrower than the
widest) stay at probability 0 and are never sampled.

A `Policy` owns the probabilities and the budget: the loop asks it for `probs()`, hands it the
estimated gradient with `update(grad, lr)`, reads the hard mask with `hard_mask()`, and saves /
restores it with `state_dict()` / `load_state_dict()`. Three policies implement it: `UnitPolicy`
here (a free probability per unit, projected back onto the budget after every step: the paper's),
`FeaturePolicy` (policy/features.py: a few shared logit parameters) and `SearchPolicy`
(policy/search.py: a Gaussian over the feature policy's parameters, drawing exact-budget masks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from pgprune.masks import Masks, UnitCosts
from pgprune.budget import hard_mask, per_kind_hard_mask, present_units, project, round_widths


@dataclass(frozen=True)
class UnitLayout:
    kinds: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    present: torch.Tensor  # [N] bool
    cost: torch.Tensor  # [N] float64: parameters removed by each unit alone

    @classmethod
    def build(cls, costs: UnitCosts, kinds: tuple[str, ...]) -> "UnitLayout":
        shapes = tuple((costs.num_layers, costs.units_per_layer(k)) for k in kinds)
        present = torch.cat([present_units(costs, k).reshape(-1) for k in kinds])
        cost = torch.cat([costs.unit_cost(k).double().reshape(-1) for k in kinds])
        return cls(kinds, shapes, present, cost * present)

    @property
    def size(self) -> int:
        return int(self.present.numel())

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """[..., N] -> {kind: [..., L, units]}."""
        out, start = {}, 0
        for kind, (L, u) in zip(self.kinds, self.shapes):
            out[kind] = flat[..., start:start + L * u].reshape(*flat.shape[:-1], L, u)
            start += L * u
        return out

    def merge(self, per_kind: dict[str, torch.Tensor]) -> torch.Tensor:
        """{kind: [..., L, units]} -> [..., N]."""
        return torch.cat([per_kind[k].reshape(*per_kind[k].shape[:-2], -1) for k in self.kinds], dim=-1)

    def masks(self, flat_bool: torch.Tensor) -> Masks:
        return Masks(self.split(flat_bool.bool()))


def sample_masks(s: torch.Tensor, k: int, generator: torch.Generator, antithetic: bool = False) -> torch.Tensor:
    """K Bernoulli(s) samples: float [K, N] of 0/1. Independent, or (antithetic, K even) K/2 pairs:
    rows 2j and 2j+1 are [u < s] and [1 - u < s] for one uniform u per pair."""
    if not antithetic:
        return torch.bernoulli(s.expand(k, -1).contiguous(), generator=generator)
    u = torch.rand(k // 2, s.numel(), generator=generator, dtype=torch.float64)
    s64 = s.double()
    return torch.stack([u < s64, 1 - u < s64], 1).reshape(k, -1).float()


def mean_entropy(s: torch.Tensor, present: torch.Tensor) -> float:
    """Mean Bernoulli entropy (nats) over existing units: log 2 = undecided, 0 = decided."""
    p = s[present].double().clamp(1e-12, 1 - 1e-12)
    return float((-(p * p.log() + (1 - p) * (1 - p).log())).mean())


class Policy(ABC):
    """Keep-probabilities under a parameter budget, updated from gradient estimates."""

    layout: UnitLayout
    costs: UnitCosts
    sparsity: float  # the budget: fraction of the prunable parameters removed
    width_multiple: int = 1  # the hard mask's MLP widths are multiples of this (budget.round_widths)

    @abstractmethod
    def probs(self) -> torch.Tensor:
        """[N] float32 keep-probabilities (0 for absent units), meeting the budget in expectation."""

    @abstractmethod
    def update(self, grad: torch.Tensor, lr: float) -> None:
        """One step from an estimate `grad` [N] of dE[L]/ds at the current probabilities."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything `load_state_dict` needs to continue exactly (tensors cloned)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @abstractmethod
    def describe(self) -> dict:
        """JSON-able description for run.json (what it is and what it learned)."""

    def hard_mask(self) -> Masks:
        """The most probable units that fit the budget (the closest reachable prefix)."""
        return hard_mask(self.layout.split(self.probs().double()), self.costs, self.sparsity,
                         multiple=self.width_multiple)

    # A policy that draws its masks some other way (policy/search.py) overrides these three.
    def sample(self, k: int, generator: torch.Generator, antithetic: bool = False) -> torch.Tensor:
        """K masks [K, N] (float 0/1) for one step: Bernoulli(probs()) draws."""
        return sample_masks(self.probs(), k, generator, antithetic=antithetic)

    def learn(self, m: torch.Tensor, s: torch.Tensor, losses: torch.Tensor, estimator, baseline, lr: float) -> float:
        """One step from the K masks `m` drawn at probabilities `s` and their losses; returns the
        baseline for the log. Bernoulli policies: the estimator's dE[L]/ds, then `update`."""
        g, b = estimator(m, s, losses, baseline)
        self.update(g, lr)
        return b

    def gather_draws(self, world) -> None:
        """Distributed runs: after the loop all-gathers the step's masks and losses (rank-major), gather
        whatever else `learn` needs about the draws. Bernoulli draws need nothing beyond the masks."""


class UnitPolicy(Policy):
    """The paper's policy: a free probability per unit, s <- project(s - lr * g) (pgprune.budget.project)."""

    def __init__(self, s0: torch.Tensor, layout: UnitLayout, costs: UnitCosts, sparsity: float, *,
                 projection: str = "cost", per_kind_budget: bool = False, floor: float = 0.0):
        self.layout, self.costs, self.sparsity = layout, costs, float(sparsity)
        self.projection, self.per_kind_budget, self.floor = projection, per_kind_budget, floor
        self.s = self._project(s0.float())

    def _project(self, s: torch.Tensor) -> torch.Tensor:
        return project(s, self.layout, self.costs, 1.0 - self.sparsity, self.projection, self.per_kind_budget,
                       floor=self.floor)

    def probs(self) -> torch.Tensor:
        return self.s

    def update(self, grad: torch.Tensor, lr: float) -> None:
        self.s = self._project(self.s - lr * grad)

    def hard_mask(self) -> Masks:
        if self.projection == "reference":  # the authors' per-kind top-k by unit count
            probs = self.layout.split(self.s.double())
            masks = per_kind_hard_mask(probs, self.costs, self.sparsity)
            if self.width_multiple > 1:
                masks = round_widths(masks, probs, self.costs, self.width_multiple, self.sparsity)[0]
            return masks
        return super().hard_mask()

    def state_dict(self) -> dict:
        return {"probs": self.s.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.s = state["probs"].clone()

    def describe(self) -> dict:
        return {"policy": "units", "units": self.layout.size, "projection": self.projection,
                "per_kind_budget": self.per_kind_budget, "floor": self.floor}
