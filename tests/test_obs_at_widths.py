"""bench/obs_at_widths.py's sensitivity-weighted widths: the budget is met and a layer whose loss
weight is larger keeps more of its units."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import obs_at_widths  # noqa: E402
from pgprune.masks import Masks  # noqa: E402
from structure_helpers import costs_of, make_model  # noqa: E402


def test_sensitivity_counts_meet_the_budget_and_follow_the_weights():
    costs = costs_of(make_model("llama"))
    L = costs.num_layers
    g = torch.Generator().manual_seed(0)
    # increasing errors along each layer's (greedy) order, the same in every layer
    raw = {k: torch.rand(costs.units_per_layer(k), generator=g, dtype=torch.float64).cumsum(0).expand(L, -1).clone()
           for k in ("channel", "head")}
    flat = {k: torch.ones(L, dtype=torch.float64) for k in raw}
    counts = obs_at_widths.sensitivity_counts(raw, flat, costs, 0.5)
    for k in raw:  # equal weights and errors: every layer removes the same number (one more where ties cut)
        assert int(counts[k].max() - counts[k].min()) <= 1
    weights = {k: torch.linspace(1.0, 8.0, L, dtype=torch.float64) for k in raw}
    counts = obs_at_widths.sensitivity_counts(raw, weights, costs, 0.5)
    masks = Masks({k: torch.arange(costs.units_per_layer(k)) >= counts[k][:, None] for k in raw})
    assert abs(masks.sparsity(costs) - 0.5) < 0.05
    assert counts["channel"][0] > counts["channel"][-1]  # the least sensitive layer gives up the most
    assert torch.all(counts["channel"][:-1] >= counts["channel"][1:])
