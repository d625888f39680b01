"""The low-dimensional feature policy (policy/features.py): start, updates, budget, loop, resume."""

import pytest
import torch

from pgprune.errors import ConfigError
from pgprune.masks import UnitCosts
from pgprune.budget import expected_keep_ratio, hard_mask
from pgprune.metrics.pipeline import run_metric
from pgprune.models.adapter import get_adapter
from pgprune.models.synthetic import synthetic_model
from pgprune.policy.features import FeaturePolicy, log_features
from pgprune.config import PGSettings, RunSettings
from pgprune.policy.loop import run_policy_gradient
from pgprune.policy.probabilities import UnitLayout
from pgprune.policy.search import SearchPolicy

CASES = [(("channel", "head"), "wanda-sp", "uniform"), (("channel", "head"), "flap", "global"),
         (("layer",), "block-influence", "global"), (("channel", "head", "layer"), "wanda-sp", "global"),
         (("channel", "head", "layer"), "wanda-sp", "uniform"), (("channel", "head", "layer"), "flap", "uniform")]


def _policy(kinds, method, allocation, sparsity=0.3, scale=4.0, policy_class=FeaturePolicy, **sizes):
    model = synthetic_model("llama", seed=0, **sizes)
    adapter = get_adapter(model)
    costs = UnitCosts.from_adapter(adapter)
    calib = torch.randint(0, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    r = run_metric(model, calib, method, sparsity, kinds, allocation, progress=False)
    layout = UnitLayout.build(costs, kinds)
    return model, costs, layout, r, policy_class.from_metric(r, adapter, layout, costs, scale=scale)


@pytest.mark.parametrize("kinds,method,allocation", CASES)
def test_starts_at_the_metric_mask_on_the_budget(kinds, method, allocation):
    _, costs, layout, r, policy = _policy(kinds, method, allocation)
    s = policy.probs()
    assert float(expected_keep_ratio(layout.split(s.double()), costs)) == pytest.approx(1 - r.allocation.sparsity, abs=1e-6)
    got = hard_mask(layout.split(s.double()), costs, r.allocation.sparsity)
    assert all(torch.equal(got[k], r.allocation.masks[k]) for k in kinds)
    assert bool((s[~layout.present] == 0).all())
    fine = [k for k in kinds if k in ("channel", "head")]
    assert policy.feature_names[0] == method and (len(policy.feature_names) == 3 if fine else True)
    # parameters: feature weights per kind + one offset per (kind, layer): far fewer than units
    assert policy.num_params == len(kinds) * len(policy.feature_names) + len(kinds) * costs.num_layers


@pytest.mark.parametrize("sparsity,layers", [(0.3, 6), (0.4, 6), (0.5, 8)])
def test_mixed_kinds_start_at_the_metric_mask_in_effect(sparsity, layers):
    # with whole layers in the budget, a removed layer's heads / channels cost nothing more, so the
    # policy's top-k may list a few more of them as removed than the metric did: same model either way
    _, costs, layout, r, policy = _policy(("channel", "head", "layer"), "wanda-sp", "global",
                                          sparsity=sparsity, num_hidden_layers=layers)
    got = hard_mask(layout.split(policy.probs().double()), costs, r.allocation.sparsity)
    want = r.allocation.masks
    assert got.sparsity(costs) == pytest.approx(want.sparsity(costs), abs=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(got.effective(costs).values(), want.effective(costs).values()))
    assert not bool((~want["layer"]).all()) and bool((~want["layer"]).any())  # some layers, not all, removed


def test_features_are_orthonormal_per_kind_with_the_init_metric_first():
    _, costs, layout, r, policy = _policy(("channel", "head"), "wanda-sp", "uniform")
    init_feature = layout.merge(log_features({k: r.scores.raw[k] for k in layout.kinds}, costs))
    assert torch.allclose(policy.features[:, 0], init_feature * layout.present)
    for ki in range(len(layout.kinds)):
        x = policy.features[(policy.kind_of == ki) & layout.present]
        gram = x.T @ x / (x.shape[0] - 1)
        assert torch.allclose(gram, torch.eye(x.shape[1], dtype=gram.dtype), atol=1e-6)


def test_log_features_are_standardised_and_finite_with_dead_units():
    model = synthetic_model("llama", seed=0)
    costs = UnitCosts.from_adapter(get_adapter(model))
    raw = torch.rand(costs.num_layers, costs.units_per_layer("channel"), dtype=torch.float64) + 0.1
    raw[0, 0] = 0.0  # a dead channel
    f = log_features({"channel": raw}, costs)["channel"]
    assert torch.isfinite(f).all()
    assert float(f.mean()) == pytest.approx(0.0, abs=1e-9) and float(f.std()) == pytest.approx(1.0, abs=1e-2)
    assert f[0, 0] == f.min()  # order kept


def test_one_update_is_an_adam_step_along_the_autograd_gradient():
    """The pulled-back gradient equals autograd's d/dtheta of sum_i g_i * s_i(theta) (shift held), and
    Adam's first step moves every parameter by lr against its sign."""
    _, costs, layout, _, policy = _policy(("channel", "head"), "wanda-sp", "uniform")
    g_s = torch.randn(layout.size, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * layout.present
    w = policy.weights.clone().requires_grad_(True)
    a = policy.offsets.clone().requires_grad_(True)
    z = (policy.features * w[policy.kind_of]).sum(-1) + a[policy.group]
    s = torch.sigmoid(policy.scale * z + policy.shift) * layout.present
    (g_s * s).sum().backward()
    before_w, before_a = policy.weights.clone(), policy.offsets.clone()
    policy.update(g_s, lr=0.01)
    expected_w = before_w - 0.01 * torch.sign(w.grad)
    expected_a = before_a - 0.01 * torch.sign(a.grad)
    assert torch.allclose(policy.weights, expected_w, atol=1e-6) and torch.allclose(policy.offsets, expected_a, atol=1e-6)
    # the shift restored the budget
    assert float(expected_keep_ratio(layout.split(policy.probs().double()), costs)) == pytest.approx(policy.keep, abs=1e-6)


def _feature_loss(target):
    """Removing unit i costs target[i] (flat): the best policy ranks units by `target`."""
    def loss_fn(model, batch, masks, costs=None):
        m = torch.cat([masks[k].float().reshape(masks[k].shape[0], -1) for k in ("channel", "head")], -1)
        return ((1 - m) * target).sum(-1)
    return loss_fn


def test_learns_to_rank_by_the_feature_that_lowers_the_loss():
    """Start from wanda-sp's order, with a loss that charges each removed unit exp(its magnitude
    feature): the policy must move weight onto magnitude (correlated ~0.4 with wanda-sp here; flap is
    ~0.99, too close to tell apart) and its hard mask must lose less than the start's."""
    model, costs, layout, r, policy = _policy(("channel", "head"), "wanda-sp", "uniform", intermediate_size=64)
    mag = policy.feature_names.index("magnitude")
    target = torch.exp(policy.features[:, mag]) * layout.present  # removing high-magnitude units hurts
    loss = _feature_loss(target.float())
    start = policy.weights.clone()
    config = PGSettings(steps=150, k=2, batch_size=1, lr=0.05, estimator="loo", eval_every=1000)
    calib = torch.zeros(2, 4, dtype=torch.long)
    res = run_policy_gradient(model, calib, policy, config, loss_fn=loss, progress=False)
    assert (policy.weights[:, mag] > start[:, mag] + 0.2).all()  # channels and heads moved onto magnitude
    flat = lambda m: torch.cat([m[k].float().reshape(1, -1) for k in layout.kinds], -1)  # noqa: E731
    before = float(((1 - flat(r.allocation.masks)) * target).sum())
    after = float(((1 - flat(res.masks)) * target).sum())
    assert after < before
    assert abs(res.masks.sparsity(costs) - r.allocation.sparsity) < 0.02


def test_fixed_widths_hold_the_offsets_and_learn_the_ranking():
    """--offsets fixed: the same update moves the feature weights but no per-layer offset."""
    _, costs, layout, _, policy = _policy(("channel", "head"), "wanda-sp", "uniform")
    policy.learn_offsets = False
    g_s = torch.randn(layout.size, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * layout.present
    before_w, before_a = policy.weights.clone(), policy.offsets.clone()
    for _ in range(3):
        policy.update(g_s, lr=0.05)
    assert torch.equal(policy.offsets, before_a) and not torch.allclose(policy.weights, before_w)
    assert policy.describe()["offsets"] == "fixed"
    assert float(expected_keep_ratio(layout.split(policy.probs().double()), costs)) == pytest.approx(policy.keep, abs=1e-6)


def test_learns_which_layers_to_remove():
    """Layers have no features: each layer's logit is its own offset (a per-unit policy in logit
    space). With a loss that charges removing layer j the amount j, the removed set gets cheaper."""
    model, costs, layout, r, policy = _policy(("layer",), "block-influence", "global", num_hidden_layers=8)
    price = torch.arange(costs.num_layers, dtype=torch.float32)

    def loss(model, batch, masks, costs=None):
        return ((1 - masks["layer"].float().reshape(masks["layer"].shape[0], -1)) * price).sum(-1)

    config = PGSettings(steps=200, k=2, batch_size=1, lr=0.05, estimator="loo", eval_every=1000)
    res = run_policy_gradient(model, torch.zeros(2, 4, dtype=torch.long), policy, config, loss_fn=loss,
                              progress=False)
    cost = lambda m: float(((1 - m["layer"].float().reshape(-1)) * price).sum())  # noqa: E731
    assert cost(res.masks) < cost(r.allocation.masks)
    assert res.masks.sparsity(costs) == pytest.approx(r.allocation.sparsity, abs=1e-9)


@pytest.mark.parametrize("name", ["features", "search"])
def test_resume_restores_the_policy_and_its_optimiser(tmp_path, name):
    policy_class = SearchPolicy if name == "search" else FeaturePolicy
    model, costs, layout, r, _ = _policy(("channel", "head"), "wanda-sp", "uniform", policy_class=policy_class)
    calib = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    config = PGSettings(policy=name, steps=6, k=2, batch_size=4, lr=0.1, estimator="loo", eval_every=3)

    def fresh():
        return _policy(("channel", "head"), "wanda-sp", "uniform", policy_class=policy_class)[-1]

    full = run_policy_gradient(model, calib, fresh(), config, out_dir=tmp_path / "a", progress=False)
    run_policy_gradient(model, calib, fresh(), config, out_dir=tmp_path / "b", progress=False, stop_after=3)
    resumed = run_policy_gradient(model, calib, fresh(), config, out_dir=tmp_path / "b", progress=False,
                                  resume=True)
    assert torch.equal(full.probs, resumed.probs) and full.history == resumed.history
    assert not torch.equal(full.probs, fresh().probs())  # it did move


def test_bad_feature_policy_settings_are_refused():
    with pytest.raises(ConfigError, match="policy must be"):
        RunSettings.from_recipe("features", {"pg.policy": "neural"}).validate()
    for extra in ({"pg.per_kind_budget": True}, {"pg.floor": 0.05}):
        with pytest.raises(ConfigError, match="features policy"):
            RunSettings.from_recipe("features", extra).validate()
    with pytest.raises(ConfigError, match="--policy features"):
        RunSettings.from_recipe("features", {"pg.policy": "units", "pg.offsets": "fixed"}).validate()
