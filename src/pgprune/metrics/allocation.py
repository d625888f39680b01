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
  Block kinds (`attn`, `mlp`, `layer`) have one unit per layer: there is no per-layer fraction;
  alone, `uniform` ranks them like `global`; beside channel / head units, every block is kept and
  the per-layer kinds meet the budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from pgprune.budget import (_NEVER, check_sparsity, closest_prefix, finite_or_never, global_positions,
                            masks_from_positions, present_units)
from pgprune.errors import ConfigError
from pgprune.masks import BLOCK_KINDS, UNIT_KINDS, Masks, UnitCosts

ALLOCATIONS = ("uniform", "global")
FINE_KINDS = ("channel", "head")


def _check_scores(scores: dict[str, torch.Tensor], costs: UnitCosts) -> None:
    for kind, t in scores.items():
        if kind not in UNIT_KINDS:
            raise ConfigError(f"unknown unit kind {kind!r} in scores")
        want = (costs.num_layers, costs.units_per_layer(kind))
        if tuple(t.shape) != want:
            raise ConfigError(f"scores[{kind!r}] has shape {tuple(t.shape)}, the model needs {want}")


# --- orders ---------------------------------------------------------------------------------------------
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

    if allocation == "uniform" and fine:
        # Mixed with block kinds, the per-layer kinds meet the budget and every block is kept: PG's start
        # keeps every layer (a global order of standardised block and channel scores removes layers the
        # model cannot do without; from this start the feature policy removed none, bench/RESULTS.md).
        plan = uniform_plan(costs, fine, target, tolerance=tolerance)
        masks = uniform_masks(raw, costs, plan)
        masks = Masks({**masks.tensors, **{k: present_units(costs, k) for k in blocks}})
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
            finite_or_never(raw[kind][i, :w], torch.ones(w, dtype=torch.bool))
            t[i, :w] = lowest_in_layer(raw[kind][i], int(counts[i]), w)
        out[kind] = t
    return Masks(out)


# --- whole layers first -----------------------------------------------------------------------------
_FIRST = 1e6  # a layer key below every standardised score (removed first); its negation: never removed


def _layer_params(costs: UnitCosts) -> torch.Tensor:
    """[L] prunable parameters of each whole layer."""
    return (costs.layer_fixed + costs.attn_fixed + costs.mlp_fixed + costs.num_kv_heads * costs.head_cost
            + costs.intermediate * costs.channel_cost).double()


def layer_order(layer_scores: torch.Tensor) -> torch.Tensor:
    """Layer indices, the first to remove (lowest score) first; ties by index."""
    return torch.sort(layer_scores.double(), stable=True).indices


def _within_budget(params: float, target: float, total: float) -> bool:
    return params <= target * total * (1 + 1e-9)


def removable_layers(layer_scores: torch.Tensor, costs: UnitCosts, sparsity: float) -> int:
    """The most layers `layers_first` can remove first at this budget: those of lowest `layer_scores`, while
    their parameters fit in it, and never every layer."""
    target = check_sparsity(sparsity)
    params = _layer_params(costs)[layer_order(layer_scores)]
    total, n = float(params.sum()), 0
    while n < costs.num_layers - 1 and _within_budget(float(params[: n + 1].sum()), target, total):
        n += 1
    return n


def layers_first(scores, layer_scores: torch.Tensor, costs: UnitCosts, sparsity: float, allocation: str,
                 n_layers: int, *, tolerance: float | None = None) -> Allocation:
    """One budget over whole layers, channels and heads: the `n_layers` layers of lowest `layer_scores` [L]
    (block influence) are removed, then the channel / head `scores` (a `Scores` or raw dict) meet the rest of
    the budget by `allocation` over the kept layers: global, one threshold as `allocate`; uniform, the same
    fraction of every kept layer. The layer keys are +-_FIRST: a policy started here keeps that choice."""
    from pgprune.metrics.scores import Scores, standardize_per_kind

    target = check_sparsity(sparsity)
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    raw = scores.raw if isinstance(scores, Scores) else {k: v.double() for k, v in scores.items()}
    std = scores.standardized if isinstance(scores, Scores) else {k: standardize_per_kind(v) for k, v in raw.items()}
    fine = tuple(k for k in FINE_KINDS[::-1] if k in raw)
    if not fine or set(raw) - set(FINE_KINDS):
        raise ConfigError("removing whole layers first needs channel and/or head scores (and no other kinds) for "
                          "the rest of the budget")
    _check_scores(raw, costs)
    L = costs.num_layers
    if not 0 <= n_layers < L:
        raise ConfigError(f"cannot remove {n_layers} of the model's {L} layers first: choose 0 to {L - 1}")
    finite_or_never(layer_scores.double(), torch.ones(L, dtype=torch.bool))
    removed = torch.zeros(L, dtype=torch.bool)
    removed[layer_order(layer_scores)[:n_layers]] = True
    params = _layer_params(costs)
    total, gone = float(params.sum()), float(params[removed].sum())
    if not _within_budget(gone, target, total):
        raise ConfigError(f"removing {n_layers} whole layer(s) alone removes {gone / total:.3f} of the prunable "
                          f"parameters, more than the budget of {target}: remove fewer layers")
    layer_key = torch.where(removed, -_FIRST, _FIRST).double()[:, None]
    keys = {**std, "layer": layer_key}
    if allocation == "global":
        positions = global_positions(keys, costs)
        pre = closest_prefix(positions, costs, target, tolerance=tolerance, what="layer+" + "+".join(fine) + " units")
        masks = masks_from_positions(positions, pre.n)
    else:  # uniform over the kept layers, at the fraction of their parameters that the budget still needs
        kept = ~removed
        sub = dataclasses.replace(costs, num_layers=int(kept.sum()), **{
            name: getattr(costs, name)[kept] for name in ("num_kv_heads", "intermediate", "head_cost", "channel_cost",
                                                          "attn_fixed", "mlp_fixed", "layer_fixed")})
        rest = max(0.0, (target * total - gone) / (total - gone))
        counts = {}
        if rest > 0:
            plan = uniform_plan(sub, fine, rest, tolerance=tolerance)
            for kind, c in plan.counts.items():
                counts[kind] = torch.zeros(L, dtype=torch.long)
                counts[kind][kept] = c
        else:
            counts = {kind: torch.zeros(L, dtype=torch.long) for kind in fine}
        masks = uniform_masks(raw, costs, UniformPlan(counts=counts, sparsity=rest, target=rest))
        masks = Masks({**masks.tensors, "layer": kept[:, None]})
    return Allocation(masks=masks, allocation=allocation, target_sparsity=target,
                      sparsity=float(masks.sparsity(costs)), keys=keys, removed=_removed_counts(masks, costs))
