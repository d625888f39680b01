"""Bernoulli keep-probabilities over the prunable units, kept as one flat vector.

The policy-gradient loop works on a flat vector `s` [N] (every unit of every chosen kind); the
`UnitLayout` converts between it and the per-kind `[L, units]` tensors that `Masks`, the budget
and the metric initialisers use. Units that do not exist (padding in layers narrower than the
widest) stay at probability 0 and are never sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgprune.masks import Masks, UnitCosts
from pgprune.metrics.allocation import present_units


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
