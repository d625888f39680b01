"""Projection of the keep-probabilities back onto the parameter budget after every step.

    s <- clamp(s - v * c, 0, 1),   v found by bisection so that the expected kept fraction of
                                   the prunable parameters equals the keep ratio.

`c` is each unit's parameter cost (mode "cost", the default: channels, heads, blocks and layers
share one budget, and the shift is the Euclidean projection onto the cost-weighted budget), or 1
for every unit (mode "uniform": the paper's plain shift). With `per_kind=True` every unit kind keeps
the keep ratio of its own parameters (the paper's per-kind budgets). The expectation includes nesting
(a head counts only if its layer is kept), see metrics.init.expected_keep_ratio.
"""

from __future__ import annotations

import torch

from pgprune.errors import ConfigError
from pgprune.masks import UnitCosts
from pgprune.metrics.init import expected_keep_ratio
from pgprune.policy.probabilities import UnitLayout

PROJECTIONS = ("cost", "uniform")


def project(s: torch.Tensor, layout: UnitLayout, costs: UnitCosts, keep: float, mode: str = "cost",
            per_kind: bool = False, iters: int = 100, floor: float = 0.0) -> torch.Tensor:
    """Project `s` [N] onto {expected keep ratio == keep}; returns a new float32 vector.
    `floor` > 0 keeps every unit within [floor, 1 - floor] (exploration: no unit freezes)."""
    if mode not in PROJECTIONS:
        raise ConfigError(f"projection must be one of {', '.join(PROJECTIONS)}, got {mode!r}")
    if not 0.0 <= floor < 0.5:
        raise ConfigError(f"the probability floor must be in [0, 0.5), got {floor}")
    lo, hi = floor, 1.0 - floor
    s64 = s.double()
    scale = layout.cost / layout.cost[layout.present].max() if mode == "cost" else layout.present.double()
    if per_kind:
        # Each kind keeps `keep` of its own units' parameters (cost-weighted mean of s).
        out, scales, unit_cost = layout.split(s64.clone()), layout.split(scale), layout.split(layout.cost)
        for kind in layout.kinds:
            c = unit_cost[kind]
            f = lambda v, k=kind, c=c: float(((out[k] - v * scales[k]).clamp(lo, hi) * c).sum() / c.sum())  # noqa: E731
            v = _bisect(f, keep, f"the {kind} units", iters)
            out[kind] = (out[kind] - v * scales[kind]).clamp(lo, hi)
        return (layout.merge(out) * layout.present).float()

    def f(v: float) -> float:
        return float(expected_keep_ratio(layout.split((s64 - v * scale).clamp(lo, hi) * layout.present), costs))

    v = _bisect(f, keep, "+".join(layout.kinds) + " units", iters)
    return ((s64 - v * scale).clamp(lo, hi) * layout.present).float()


def _bisect(f, keep: float, what: str, iters: int = 100) -> float:
    """v with f(v) == keep for f decreasing in v (f(-inf) = all kept, f(+inf) = none kept)."""
    lo, hi = -1.0, 1.0
    while f(lo) < keep:
        lo *= 2
        if lo < -1e6:
            raise ConfigError(f"keep ratio {keep:.4f} is above what {what} can reach even when all are kept "
                              f"({f(lo):.4f}); lower the budget or prune other unit kinds")
    while f(hi) > keep:
        hi *= 2
        if hi > 1e6:
            raise ConfigError(f"keep ratio {keep:.4f} is below what {what} can reach even when all are "
                              f"removed ({f(hi):.4f}): the rest of the model is larger than the budget")
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) > keep:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
