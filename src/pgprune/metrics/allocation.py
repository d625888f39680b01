"""From scores to a `Masks` that meets a sparsity budget.

Both allocations reduce to one rule: put the prunable units in a removal order, then remove the
prefix of that order whose true sparsity (`Masks.sparsity`, DESIGN.md's definition, nesting
included) is closest to the target. Sparsity only grows along a prefix, so the closest prefix is
found by bisection and lands within half a unit of the target whenever the target is reachable.

- `global`: the order is ascending standardised score across all layers and kinds (one
  threshold, cost-aware because the prefix is measured in parameters, not in units).
- `uniform`: every layer gives up the same fraction of each kind. The order removes, in turn,
  the least important unit of each layer (level by level; within a level, layers in a spread-out
  order starting from the last layer, so that a partial level is not bunched at one end of the
  model and spares the sensitive first layers); each layer's count is floor or ceil of
  the fraction times its width. With both `head` and `channel`, the number of heads is set first
  (the same fraction of head parameters as of channel parameters, rounded to whole heads) and
  the channels absorb the rounding, so that a model with 3 KV heads per layer still meets the
  budget instead of rounding every layer's head budget to zero. Counts depend only on the widths
  and costs, so they are known before any score is computed (pruned propagation needs that).
  Block kinds (`attn`, `mlp`, `layer`) have one unit per layer: there is no per-layer fraction,
  and `uniform` ranks them like `global`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pgprune.errors import ConfigError
from pgprune.masks import BLOCK_KINDS, UNIT_KINDS, Masks, UnitCosts

ALLOCATIONS = ("uniform", "global")
FINE_KINDS = ("channel", "head")
_NEVER = torch.iinfo(torch.long).max  # position of units that do not exist


def present_units(costs: UnitCosts, kind: str) -> torch.Tensor:
    """[L, units] True where a unit of `kind` exists (its block and layer included)."""
    U = costs.units_per_layer(kind)
    if kind in ("head", "channel"):
        width = costs.num_kv_heads if kind == "head" else costs.intermediate
        return torch.arange(U)[None, :] < width[:, None]
    attn, mlp = costs.num_kv_heads > 0, costs.intermediate > 0
    return {"attn": attn, "mlp": mlp, "layer": attn | mlp}[kind][:, None].clone()


def check_sparsity(sparsity: float) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ConfigError(f"sparsity must be in [0, 1) (the fraction of prunable parameters to remove), "
                          f"got {sparsity!r}")
    return s


def _check_scores(scores: dict[str, torch.Tensor], costs: UnitCosts) -> None:
    for kind, t in scores.items():
        if kind not in UNIT_KINDS:
            raise ConfigError(f"unknown unit kind {kind!r} in scores")
        want = (costs.num_layers, costs.units_per_layer(kind))
        if tuple(t.shape) != want:
            raise ConfigError(f"scores[{kind!r}] has shape {tuple(t.shape)}, the model needs {want}")


# --- prefix of an order ------------------------------------------------------------------------------
def masks_from_positions(positions: dict[str, torch.Tensor], n: int) -> Masks:
    """The mask that removes the first n units of an order (`positions[kind]`: [L, units] long)."""
    return Masks({k: p >= n for k, p in positions.items()})


def _sparsity_at(positions, n, costs) -> float:
    return masks_from_positions(positions, n).sparsity(costs)


@dataclass
class Prefix:
    n: int  # units removed
    sparsity: float  # their true sparsity
    n_max: int
    max_sparsity: float


def closest_prefix(positions: dict[str, torch.Tensor], costs: UnitCosts, target: float, *,
                   tolerance: float | None = None, what: str = "these units") -> Prefix:
    """The prefix of the order whose sparsity is closest to `target` (ties: the shorter one).

    Raises ConfigError when the target cannot be met: beyond what removing every unit gives,
    further than `tolerance` (default: the largest single unit) from any prefix, or rounding to
    removing nothing at all."""
    n_max = int(sum(int((p != _NEVER).sum()) for p in positions.values()))
    s_max = _sparsity_at(positions, n_max, costs)
    if target == 0.0:
        return Prefix(0, 0.0, n_max, s_max)
    unit = max_unit_fraction(costs, tuple(positions))
    tol = unit if tolerance is None else float(tolerance)
    if n_max == 0 or target > s_max + tol:
        raise ConfigError(f"sparsity {target:g} cannot be reached by removing {what}: removing all of them "
                          f"gives {s_max:.4f}. Lower the sparsity or add unit kinds (e.g. --units channel,head).")
    lo, hi = 0, n_max  # invariant: s(lo) <= target, and s(hi) > target unless hi == n_max
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _sparsity_at(positions, mid, costs) <= target:
            lo = mid
        else:
            hi = mid - 1
    s_lo = _sparsity_at(positions, lo, costs)
    best, s_best = lo, s_lo
    if lo < n_max:
        s_hi = _sparsity_at(positions, lo + 1, costs)
        if abs(s_hi - target) < abs(s_lo - target):
            best, s_best = lo + 1, s_hi
    if best == 0:
        s_one = _sparsity_at(positions, 1, costs)
        raise ConfigError(f"sparsity {target:g} rounds to removing nothing with {what}: the smallest step "
                          f"is one unit = sparsity {s_one:.4f}. Ask for at least that, or use finer units.")
    if abs(s_best - target) > tol:
        s_next = _sparsity_at(positions, min(lo + 1, n_max), costs)
        raise ConfigError(f"sparsity {target:g} cannot be met within {tol:.4g} with {what}: the nearest "
                          f"reachable sparsities are {s_lo:.4f} and {s_next:.4f}. Ask for one of them "
                          "or use finer units.")
    return Prefix(best, s_best, n_max, s_max)


def max_unit_fraction(costs: UnitCosts, kinds) -> float:
    """The largest single unit of `kinds`, as a fraction of the prunable parameters."""
    biggest = 0
    for k in kinds:
        c = costs.unit_cost(k)[present_units(costs, k)]
        if c.numel():
            biggest = max(biggest, int(c.max()))
    return biggest / max(costs.prunable_params, 1)


# --- orders ---------------------------------------------------------------------------------------------
def _finite_or_never(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    bad = present & ~torch.isfinite(scores)
    if bad.any():
        raise ConfigError("scores contain NaN or infinite values for existing units; check the "
                          "calibration data (all-constant inputs?) or the model weights")
    return present


def global_positions(keys: dict[str, torch.Tensor], costs: UnitCosts) -> dict[str, torch.Tensor]:
    """Ascending key over all layers and kinds; ties in (kind, layer, unit) order."""
    flat_keys, owners = [], []
    for kind in UNIT_KINDS:
        if kind not in keys:
            continue
        pres = _finite_or_never(keys[kind], present_units(costs, kind))
        idx = pres.flatten().nonzero().squeeze(1)
        flat_keys.append(keys[kind].flatten()[idx].double())
        owners += [(kind, idx)]
    positions = {k: torch.full(keys[k].shape, _NEVER, dtype=torch.long) for k in keys}
    if not flat_keys:
        return positions
    allk = torch.cat(flat_keys)
    order = torch.sort(allk, stable=True).indices  # stable: ties keep (kind, layer, unit) order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    start = 0
    for kind, idx in owners:
        positions[kind].view(-1)[idx] = rank[start:start + idx.numel()]
        start += idx.numel()
    return positions


def spread_order(n: int) -> torch.Tensor:
    """A permutation of range(n) whose every prefix is spread over the range (bit reversal),
    starting from the last layer: first layers are usually the most sensitive to pruning."""
    if n <= 1:
        return torch.arange(n)
    bits = (n - 1).bit_length()
    rev = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(1 << bits)]
    return torch.tensor([n - 1 - r for r in rev if r < n], dtype=torch.long)


def _level_sequence(width: torch.Tensor) -> torch.Tensor:
    """Layers of the increments that each remove one more unit of a kind: [sum(width)] layer
    indices ordered by (level + 0.5) / width (the fraction removed so far), ties in spread order."""
    layers = spread_order(width.numel())
    w = width[layers]
    rows = torch.repeat_interleave(layers, w)
    if rows.numel() == 0:
        return rows
    starts = torch.repeat_interleave(torch.cumsum(w, 0) - w, w)
    level = torch.arange(rows.numel()) - starts
    key = (level.double() + 0.5) / width[rows].double()
    return rows[torch.sort(key, stable=True).indices]


@dataclass
class UniformPlan:
    """Units each layer removes under a uniform allocation (before choosing which)."""

    counts: dict[str, torch.Tensor]  # kind -> [L] long
    sparsity: float
    target: float


def _uniform_sequence(costs: UnitCosts, kinds: tuple[str, ...], target: float) -> list[tuple[str, int]]:
    seqs = {}
    for kind in kinds:
        width = costs.num_kv_heads if kind == "head" else costs.intermediate
        seqs[kind] = [(kind, int(l)) for l in _level_sequence(width.long())]
    if len(kinds) == 1:
        return seqs[kinds[0]]
    # Same fraction of head and channel parameters; whole heads first, channels absorb rounding.
    head_total = float((costs.num_kv_heads * costs.head_cost).sum())
    chan_total = float((costs.intermediate * costs.channel_cost).sum())
    frac = min(1.0, target * costs.prunable_params / max(head_total + chan_total, 1.0))
    n_heads = int(round(frac * int(costs.num_kv_heads.sum())))
    return seqs["head"][:n_heads] + seqs["channel"] + seqs["head"][n_heads:]


def _positions_from_sequence(seq: list[tuple[str, int]], costs: UnitCosts, kinds) -> dict[str, torch.Tensor]:
    """Increment j removes the (count+1)-th unit of (kind, layer); returned per kind as
    [L, units] positions of the slot with that in-layer rank (slot r = r-th least important)."""
    positions = {k: torch.full((costs.num_layers, costs.units_per_layer(k)), _NEVER, dtype=torch.long)
                 for k in kinds}
    seen = {k: [0] * costs.num_layers for k in kinds}
    for j, (kind, layer) in enumerate(seq):
        positions[kind][layer, seen[kind][layer]] = j
        seen[kind][layer] += 1
    return positions


def uniform_plan(costs: UnitCosts, kinds, sparsity: float, *, tolerance: float | None = None) -> UniformPlan:
    """Per-layer counts of a uniform allocation; they depend on widths and costs only."""
    kinds = tuple(k for k in FINE_KINDS[::-1] if k in kinds)  # canonical: channel, head
    if not kinds:
        raise ConfigError("uniform_plan needs unit kinds channel and/or head")
    target = check_sparsity(sparsity)
    seq = _uniform_sequence(costs, kinds, target)
    slots = _positions_from_sequence(seq, costs, kinds)
    pre = closest_prefix(slots, costs, target, tolerance=tolerance, what=f"{'+'.join(kinds)} units uniformly")
    counts = {k: (slots[k] < pre.n).sum(1) for k in kinds}
    return UniformPlan(counts=counts, sparsity=pre.sparsity, target=target)


def lowest_in_layer(scores: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """[width] keep-mask removing the `count` lowest scores (ties: lower index removed first)."""
    order = torch.sort(scores[:width].double(), stable=True).indices
    keep = torch.ones(width, dtype=torch.bool)
    keep[order[:count]] = False
    return keep


# --- the result ---------------------------------------------------------------------------------------
@dataclass
class Allocation:
    masks: Masks  # unit-level keep masks, [L, units] per kind
    allocation: str
    target_sparsity: float
    sparsity: float  # true sparsity of `masks` (DESIGN.md)
    keys: dict[str, torch.Tensor]  # the scores that ranked the units (NaN: unit absent)
    removed: dict[str, int] = field(default_factory=dict)  # units removed per kind (effective)

    def summary(self, costs: UnitCosts) -> dict:
        out = self.masks.summary(costs)
        out.update(allocation=self.allocation, target_sparsity=self.target_sparsity,
                   removed_units=self.removed)
        return out


def _removed_counts(masks: Masks, costs: UnitCosts) -> dict[str, int]:
    eff = masks.effective(costs)
    out = {}
    for kind in masks.kinds:
        pres = present_units(costs, kind)
        kept = eff[kind] if eff[kind].dim() == 2 else eff[kind][:, None]
        out[kind] = int((pres & ~kept).sum())
    return out


def allocate(scores, costs: UnitCosts, sparsity: float, allocation: str = "uniform", *,
             tolerance: float | None = None) -> Allocation:
    """A `Masks` meeting `sparsity` (fraction of prunable parameters) from per-unit scores.

    `scores`: a `Scores` (from compute_scores) or a plain {kind: [L, units]} dict of raw scores
    (higher = more important; standardised per kind for `global`)."""
    from pgprune.metrics.scores import Scores, standardize_per_kind

    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    target = check_sparsity(sparsity)
    if isinstance(scores, Scores):
        raw, std = scores.raw, scores.standardized
    else:
        raw = {k: v.double() for k, v in scores.items()}
        std = {k: standardize_per_kind(v) for k, v in raw.items()}
    if not raw:
        raise ConfigError("no scores given: choose at least one unit kind")
    _check_scores(raw, costs)
    kinds = tuple(k for k in UNIT_KINDS if k in raw)
    fine = [k for k in kinds if k in FINE_KINDS]
    blocks = [k for k in kinds if k in BLOCK_KINDS]
    what = "+".join(kinds) + " units"

    if allocation == "uniform" and fine and blocks:
        raise ConfigError(f"a uniform allocation cannot mix per-layer units ({', '.join(fine)}) with whole "
                          f"blocks ({', '.join(blocks)}); use allocation='global' or fewer unit kinds")
    if allocation == "uniform" and fine:
        plan = uniform_plan(costs, fine, target, tolerance=tolerance)
        masks = uniform_masks(raw, costs, plan)
        keys = std
    else:
        keys = std
        positions = global_positions(keys, costs)
        pre = closest_prefix(positions, costs, target, tolerance=tolerance, what=what)
        masks = masks_from_positions(positions, pre.n)
    return Allocation(masks=masks, allocation=allocation, target_sparsity=target,
                      sparsity=float(masks.sparsity(costs)), keys=keys,
                      removed=_removed_counts(masks, costs))


def uniform_masks(raw: dict[str, torch.Tensor], costs: UnitCosts, plan: UniformPlan) -> Masks:
    """Each layer removes its plan's count of lowest-scoring units of each kind."""
    out = {}
    for kind, counts in plan.counts.items():
        width = costs.num_kv_heads if kind == "head" else costs.intermediate
        t = torch.zeros(costs.num_layers, costs.units_per_layer(kind), dtype=torch.bool)
        for i in range(costs.num_layers):
            w = int(width[i])
            _finite_or_never(raw[kind][i, :w], torch.ones(w, dtype=torch.bool))
            t[i, :w] = lowest_in_layer(raw[kind][i], int(counts[i]), w)
        out[kind] = t
    return Masks(out)
