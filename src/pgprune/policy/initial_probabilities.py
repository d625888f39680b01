"""Initial keep-probabilities for the policy-gradient method, from a metric allocation.

Contract (DESIGN.md, "Lessons already measured"): the hard mask read off the initial
probabilities is the metric method's own mask. Two things make that hold:

1. Order: every unit the allocation keeps gets a higher probability than every unit it removes.
   Within each group the order of the allocation's scores is kept (rank-preserving), but a
   uniform allocation keeps some units that score below removed units of other layers, so the
   two groups are pulled apart in logit space by just enough (plus `gap`) to separate them.
2. Budget: the probabilities are calibrated to the allocation's *true* sparsity (which may be
   off the requested one by up to half a unit), and `hard_mask` reads them off with the same
   closest-prefix rule the allocations use. Reading off at that sparsity removes exactly the
   allocation's units, whatever rule breaks ties inside the groups.

The budget is an expectation: under independent Bernoulli(p) sampling of every unit, the
expected kept fraction of the prunable parameters (`expected_keep_ratio`, nesting included:
a head counts only if its attention block and layer are kept) equals 1 - sparsity. For a single
kind this is the cost-weighted mean of p plus the share of parameters no unit owns (norms).

Methods: `sigmoid` (standardised scores times `scale` through a sigmoid, shifted to meet the
budget; DESIGN.md's reference recipe plus the separation above) and `constant` (every kept
unit at one value, every removed unit at a slightly lower one: a flat start that still reads
off the metric mask; `eps=0` gives a truly flat start whose hard mask is arbitrary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgprune.errors import ConfigError
from pgprune.masks import Masks, UnitCosts
from pgprune.budget import present_units, solve_shift
from pgprune.metrics.allocation import Allocation

INIT_METHODS = ("sigmoid", "constant")  # init_probabilities; per_layer_probabilities is the reference code's


@dataclass
class InitProbabilities:
    probs: dict[str, torch.Tensor]  # kind -> [L, units] float32 in (0, 1); 0 where no unit exists
    logits: dict[str, torch.Tensor]  # kind -> [L, units] float64 (the same, before the sigmoid)
    sparsity: float  # the budget the probabilities are calibrated to (the allocation's true sparsity)
    masks: Masks  # the allocation's mask == hard_mask(probs, costs, sparsity)
    method: str

    @property
    def keep_ratio(self) -> float:
        return 1.0 - self.sparsity


def init_probabilities(allocation: Allocation, costs: UnitCosts, method: str = "sigmoid", *,
                       scale: float = 1.0, gap: float = 0.1, eps: float = 0.01) -> InitProbabilities:
    """Keep-probabilities whose hard mask (`hard_mask(probs, costs, result.sparsity)`) is the
    allocation's mask and whose expected kept fraction is 1 - result.sparsity.

    sigmoid: logit = scale * standardised score, groups separated by `gap`, plus a common shift.
    constant: logit = +eps for kept units, -eps for removed ones, plus a common shift."""
    if method not in INIT_METHODS:
        raise ConfigError(f"init method must be one of {', '.join(INIT_METHODS)}, got {method!r}")
    if scale <= 0 or gap < 0 or eps < 0:
        raise ConfigError("init needs scale > 0, gap >= 0 and eps >= 0")
    kinds = allocation.masks.kinds
    present = {k: present_units(costs, k) for k in kinds}
    kept = {k: allocation.masks[k] & present[k] for k in kinds}
    removed = {k: ~allocation.masks[k] & present[k] for k in kinds}

    if method == "constant":
        z = {k: torch.where(kept[k], eps, -eps).double() for k in kinds}
    else:
        z = {k: scale * torch.nan_to_num(allocation.keys[k].double(), nan=0.0) for k in kinds}
        hi_removed = max([float(z[k][removed[k]].max()) for k in kinds if removed[k].any()], default=None)
        lo_kept = min([float(z[k][kept[k]].min()) for k in kinds if kept[k].any()], default=None)
        if hi_removed is not None and lo_kept is not None:
            delta = max(0.0, hi_removed - lo_kept + gap)
            z = {k: z[k] + torch.where(kept[k], delta / 2, -delta / 2) for k in kinds}
    keep = 1.0 - allocation.sparsity
    b = solve_shift(z, costs, keep)
    logits = {k: torch.where(present[k], z[k] + b, torch.tensor(float("-inf"), dtype=torch.float64))
              for k in kinds}
    probs = {k: torch.sigmoid(v).float() for k, v in logits.items()}
    _check_separated(probs, kept, removed, method, eps)
    return InitProbabilities(probs=probs, logits=logits, sparsity=allocation.sparsity,
                             masks=allocation.masks, method=method)


def _check_separated(probs, kept, removed, method, eps) -> None:
    if method == "constant" and eps == 0:
        return
    hi_removed = max([float(probs[k][removed[k]].max()) for k in probs if removed[k].any()], default=-1.0)
    lo_kept = min([float(probs[k][kept[k]].min()) for k in probs if kept[k].any()], default=2.0)
    if not hi_removed < lo_kept:
        raise ConfigError("the initial probabilities saturate in float32 so that kept and removed units "
                          "tie; use a smaller scale (or a larger eps for constant)")




def per_layer_probabilities(raw: dict[str, torch.Tensor], costs: UnitCosts, keep: float) -> dict[str, torch.Tensor]:
    """The reference code's start (its `sigmap`, `--init-mapping per-layer`): in every layer and kind,
    the scores standardised over that layer's units, through a sigmoid, shifted additively so that
    the layer's mean probability is `keep`, clamped to [0, 1]. Each layer keeps `keep` of its units
    in expectation, and its hard mask is not the metric's mask (DESIGN.md's lesson does not hold)."""
    out = {}
    for kind, scores in raw.items():
        present = present_units(costs, kind)
        probs = torch.zeros(scores.shape, dtype=torch.float64)
        for i in range(costs.num_layers):
            x = scores[i][present[i]].double()
            if x.numel() == 0:
                continue
            z = (x - x.mean()) / (x.std() + 1e-8) if x.numel() > 1 else torch.zeros_like(x)
            p = torch.sigmoid(z)
            probs[i, present[i]] = (p + (keep - p.mean())).clamp(0.0, 1.0)
        out[kind] = probs.float()
    return out
