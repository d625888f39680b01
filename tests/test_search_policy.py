"""The Gaussian search policy (policy/search.py): start, exact-budget draws, its estimate, loop (resume:
test_feature_policy.py)."""

import pytest
import torch

from pgprune.config import PGSettings, RunSettings
from pgprune.errors import ConfigError
from pgprune.masks import UnitCosts
from pgprune.metrics.pipeline import run_metric
from pgprune.models.adapter import get_adapter
from pgprune.models.synthetic import synthetic_model
from pgprune.policy.estimators import BaselineState
from pgprune.policy.loop import run_policy_gradient
from pgprune.policy.probabilities import UnitLayout
from pgprune.policy.search import SearchPolicy

KINDS = ("channel", "head")


def _policy(sparsity=0.3, sigma=0.1, **sizes):
    model = synthetic_model("llama", seed=0, intermediate_size=64, **sizes)
    adapter = get_adapter(model)
    costs = UnitCosts.from_adapter(adapter)
    calib = torch.randint(0, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    r = run_metric(model, calib, "wanda-sp", sparsity, KINDS, "uniform", progress=False)
    layout = UnitLayout.build(costs, KINDS)
    policy = SearchPolicy.from_metric(r, adapter, layout, costs, scale=8.0)
    policy.sigma = sigma
    return model, costs, layout, r, policy


def _widths(masks, kind="channel"):
    return masks[kind].sum(-1)


def test_starts_at_the_metric_mask_and_every_draw_meets_the_budget():
    _, costs, layout, r, policy = _policy()
    start = policy.hard_mask()
    assert all(torch.equal(start[k], r.allocation.masks[k]) for k in KINDS)
    m = policy.sample(6, torch.Generator().manual_seed(1))
    assert m.shape == (6, layout.size) and bool((m[:, ~layout.present] == 0).all())
    for row in m:
        # each draw is a hard mask: the closest reachable prefix to the budget, as the start
        gap = abs(layout.masks(row).sparsity(costs) - policy.sparsity)
        assert gap <= abs(start.sparsity(costs) - policy.sparsity) + 0.02
    # draws move the widths, and the two masks of a pair differ (theta + sigma eps, theta - sigma eps)
    assert any(not torch.equal(_widths(layout.masks(row)), _widths(start)) for row in m)
    assert all(not torch.equal(m[j], m[j + 1]) for j in range(0, 6, 2))


def test_the_estimate_is_the_antithetic_difference_along_the_draw():
    """learn() steps theta by Adam on mean_j (L+ - L-) / (2 sigma) eps_j: on Adam's first step every
    parameter moves by lr against the sign of that estimate, which is written out here by hand."""
    _, _, layout, _, policy = _policy(sigma=0.2)
    gen = torch.Generator().manual_seed(4)
    m = policy.sample(4, gen)
    eps = torch.randn(2, policy.num_params, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    losses = torch.tensor([3.0, 1.0, 2.0, 2.5])
    expected = ((2.0 * eps[0] + (-0.5) * eps[1]) / 2) / (2 * 0.2)
    theta = torch.cat([policy.weights.reshape(-1), policy.offsets])
    policy.learn(m, policy.probs(), losses, None, BaselineState(), lr=0.01)
    after = torch.cat([policy.weights.reshape(-1), policy.offsets])
    assert torch.allclose(after, theta - 0.01 * torch.sign(expected), atol=1e-6)


def test_learns_which_layer_to_widen():
    """A loss that charges each removed channel of layer 0 ten times the others: the search must give
    layer 0 more channels than the start, and its hard mask must cost less."""
    model, costs, layout, r, policy = _policy(sparsity=0.4)
    weight = torch.tensor([10.0] + [1.0] * (costs.num_layers - 1))

    def loss(model, batch, masks, costs=None):
        return ((1 - masks["channel"].float()).sum(-1) * weight).sum(-1)

    config = PGSettings(policy="search", steps=100, k=2, batch_size=1, lr=0.05, eval_every=1000)
    res = run_policy_gradient(model, torch.zeros(2, 4, dtype=torch.long), policy, config, loss_fn=loss,
                              progress=False)
    start = r.allocation.masks
    assert int(_widths(res.masks)[0]) > int(_widths(start)[0])
    cost = lambda m: float(((1 - m["channel"].float()).sum(-1) * weight).sum())  # noqa: E731
    assert cost(res.masks) < cost(start)


def test_bad_search_settings_are_refused():
    with pytest.raises(ConfigError, match="even --k"):
        RunSettings.from_recipe("features", {"pg.policy": "search", "pg.k": 3}).validate()
    with pytest.raises(ConfigError, match="positive --sigma"):
        RunSettings.from_recipe("features", {"pg.policy": "search", "pg.sigma": 0.0}).validate()
    with pytest.raises(ConfigError, match="features policy"):
        RunSettings.from_recipe("features", {"pg.policy": "search", "pg.floor": 0.05}).validate()
    for ignored in ({"pg.estimator": "loo"}, {"pg.baseline": "ema"}, {"pg.control_variate": True}):
        with pytest.raises(ConfigError, match="its own estimator"):
            RunSettings.from_recipe("features", {"pg.policy": "search", **ignored}).validate()
    *_, policy = _policy()
    with pytest.raises(ConfigError, match="antithetic pairs"):
        policy.sample(3, torch.Generator().manual_seed(0))

