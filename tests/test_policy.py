import itertools
import math
from collections import deque

import pytest
import torch

from pgprune import run_folder
from pgprune.errors import CheckpointError, ConfigError
from pgprune.masks import UnitCosts
from pgprune.budget import expected_keep_ratio, project
from pgprune.models.adapter import get_adapter
from pgprune.models.synthetic import synthetic_model
from pgprune.policy.estimators import (BaselineState, disarm_estimator, get_estimator, kept_control, loo_estimator,
                                       paper_estimator)
from pgprune.config import PGSettings, RunSettings
from pgprune.policy.loop import run_policy_gradient
from pgprune.policy.probabilities import UnitLayout, UnitPolicy, sample_masks


def _setup(kinds=("channel", "head"), **sizes):
    model = synthetic_model("llama", seed=0, **sizes)
    costs = UnitCosts.from_adapter(get_adapter(model))
    return model, costs, UnitLayout.build(costs, kinds)


@pytest.mark.parametrize("mode", ["cost", "uniform"])
@pytest.mark.parametrize("kinds", [("channel",), ("channel", "head"), ("layer",), ("channel", "head", "layer")])
def test_projection_meets_the_budget(mode, kinds):
    _, costs, layout = _setup(kinds)
    s = torch.rand(layout.size, generator=torch.Generator().manual_seed(0))
    for keep in (0.65, 0.8, 0.9):  # reachable by every kind set (MLP alone is ~60 % here)
        p = project(s, layout, costs, keep, mode)
        assert float(expected_keep_ratio(layout.split(p.double()), costs)) == pytest.approx(keep, abs=1e-5)
        assert p.min() >= 0 and p.max() <= 1
        # projecting a feasible point again changes (almost) nothing
        assert torch.allclose(project(p, layout, costs, keep, mode), p, atol=1e-5)


def test_cost_projection_is_a_shift_proportional_to_cost():
    _, costs, layout = _setup(("channel", "head"))
    s = torch.full((layout.size,), 0.5)
    p = project(s, layout, costs, 0.45, "cost")
    delta = (s - p).double()
    ratio = delta / layout.cost
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)  # no clamping at 0.5 +- small


def test_per_kind_budget_holds_each_kind():
    _, costs, layout = _setup(("channel", "head"))
    s = torch.rand(layout.size, generator=torch.Generator().manual_seed(1))
    p = layout.split(project(s, layout, costs, 0.6, "uniform", per_kind=True).double())
    c = layout.split(layout.cost)
    for kind in ("channel", "head"):
        assert float((p[kind] * c[kind]).sum() / c[kind].sum()) == pytest.approx(0.6, abs=1e-5)


def test_probability_floor_keeps_units_off_the_boundaries():
    _, costs, layout = _setup(("channel", "head"))
    s = (torch.rand(layout.size, generator=torch.Generator().manual_seed(2)) > 0.2).float()  # all at 0 or 1
    p = project(s, layout, costs, 0.7, floor=0.05)
    assert float(expected_keep_ratio(layout.split(p.double()), costs)) == pytest.approx(0.7, abs=1e-5)
    present = p[layout.present]
    assert present.min() >= 0.05 - 1e-7 and present.max() <= 0.95 + 1e-7
    assert float(project(s, layout, costs, 0.7)[layout.present].min()) == 0.0  # without a floor units freeze
    with pytest.raises(ConfigError, match="floor"):
        project(s, layout, costs, 0.7, floor=0.5)


def test_unreachable_budget_is_refused():
    _, costs, layout = _setup(("head",))
    with pytest.raises(ConfigError, match="rest of the model"):
        project(torch.full((layout.size,), 0.5), layout, costs, 0.1)


def _mc_gradient(estimator, s, w, k, n=20000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = BaselineState()
    total = torch.zeros_like(s, dtype=torch.float64)
    for _ in range(n):
        m = torch.bernoulli(s.expand(k, -1), generator=gen)
        losses = (m * w).sum(-1)  # E[L] = w . s, so dE/ds = w
        g, _ = estimator(m, s, losses, base)
        total += g.double()
    return total / n


def test_loo_estimator_is_unbiased():
    s = torch.tensor([0.2, 0.5, 0.9])
    w = torch.tensor([1.0, -2.0, 0.5])
    g = _mc_gradient(loo_estimator, s, w, k=4)
    assert torch.allclose(g, w.double(), atol=0.12)


def test_antithetic_pairs_have_bernoulli_marginals_and_differ_only_where_uncertain():
    s = torch.tensor([0.0, 0.03, 0.5, 0.8, 1.0])
    m = sample_masks(s, 20000, torch.Generator().manual_seed(0), antithetic=True)
    assert torch.allclose(m.double().mean(0), s.double(), atol=0.01)
    differ = (m[0::2] != m[1::2]).double().mean(0)  # P(pair differs) = 2 min(s, 1 - s)
    assert torch.allclose(differ, 2 * torch.minimum(s, 1 - s).double(), atol=0.015)


def test_disarm_estimator_is_unbiased_for_a_nonlinear_loss():
    # Reference written plainly: the exact gradient of E[L] by enumerating the 2^3 masks.
    s = torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def loss(m):
        return (m @ w) ** 2 + 3.0 * m[..., 0] * m[..., 2]

    exact = torch.zeros(3, dtype=torch.float64)
    for bits in range(8):
        m = torch.tensor([(bits >> i) & 1 for i in range(3)], dtype=torch.float64)
        p = torch.prod(torch.where(m > 0, s, 1 - s))
        exact += loss(m) * p * (m - s) / (s * (1 - s))  # d/ds_i of p(m) = p(m) (m_i - s_i) / (s_i (1 - s_i))
    m = sample_masks(s, 2 * 50000, torch.Generator().manual_seed(1), antithetic=True).double()
    g, _ = disarm_estimator(m, s, loss(m), BaselineState())
    assert torch.allclose(g.double(), exact, atol=0.06), (g, exact)


def _exact_mean(name, s, loss, baseline_history=(), **kw):
    """E[estimate] over every draw of K=2 masks of 3 units (reference written plainly): 2 independent
    Bernoulli(s) masks, or for disarm one antithetic pair, whose per-unit states (1,1), (1,0), (0,1),
    (0,0) have probabilities max(0, 2s-1), min(s, 1-s), min(s, 1-s), max(0, 1-2s)."""
    if name == "disarm":
        lo = torch.minimum(s, 1 - s)
        states = {(1, 1): (2 * s - 1).clamp_min(0), (1, 0): lo, (0, 1): lo, (0, 0): (1 - 2 * s).clamp_min(0)}
    else:
        states = {(a, b): (s if a else 1 - s) * (s if b else 1 - s) for a in (0, 1) for b in (0, 1)}
    total = torch.zeros(3, dtype=torch.float64)
    for per_unit in itertools.product(states, repeat=3):
        p = torch.prod(torch.stack([states[st][i] for i, st in enumerate(per_unit)]))
        if p == 0:
            continue
        m = torch.tensor(per_unit, dtype=torch.float64).T  # [2, 3]
        baseline = BaselineState(history=deque(baseline_history), **kw)
        control = torch.tensor([3.0, 1.0, 2.0]) if "kept_cov" in kw else None  # a given slope: the control variate
        g, _ = get_estimator(name, 2, control)(m, s, loss(m), baseline)
        total += p * g.double()
    return total


@pytest.mark.parametrize("name", ["paper", "loo", "disarm"])
def test_kept_control_variate_keeps_the_estimators_expectation(name):
    # exact expectations by enumeration, the slope (-4) fixed by earlier steps as in the loop
    s = torch.tensor([0.15, 0.5, 0.7], dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def loss(m):
        return (m @ w) ** 2 + 3.0 * m[..., 0] * m[..., 2]

    history = (1.3, 1.1)  # paper: a baseline that does not depend on the current samples
    plain = _exact_mean(name, s, loss, history)
    controlled = _exact_mean(name, s, loss, history, kept_cov=-4.0, kept_var=1.0)
    assert plain.abs().max() > 0.1
    assert torch.allclose(plain, controlled, atol=1e-6), (plain, controlled)


def test_kept_control_variate_removes_the_noise_of_a_loss_linear_in_the_kept_amount():
    s = torch.tensor([0.2, 0.5, 0.9])
    cost = torch.tensor([3.0, 1.0, 2.0])
    m = sample_masks(s, 2 * 2000, torch.Generator().manual_seed(0))
    losses = 5.0 * (m.double() @ (cost.double() / cost.sum()))  # the loss is the kept fraction x 5
    plain, controlled = [], []
    baseline = BaselineState()
    for k in range(0, m.shape[0], 2):
        plain.append(loo_estimator(m[k:k + 2], s, losses[k:k + 2].float(), BaselineState())[0])
        controlled.append(kept_control("loo", m[k:k + 2], s, losses[k:k + 2].float(), baseline, cost)[0])
    assert baseline.kept_slope() == pytest.approx(5.0, rel=1e-6)  # fitted on the earlier steps
    exact = 5.0 * cost / cost.sum()
    later = torch.stack(controlled[10:])  # once the slope is known, every estimate is exact
    assert torch.allclose(later, exact.expand_as(later), atol=1e-5)
    assert float(torch.stack(plain).std(0).min()) > 0.5  # what it removed: the plain estimator's spread


def test_paper_estimator_direction():
    # The reference estimator follows w * sqrt(s(1-s)) * K/(K-1) (a rescaled gradient), with a
    # baseline that lags behind; its sign agrees with the true gradient.
    s = torch.tensor([0.2, 0.5, 0.9])
    w = torch.tensor([1.0, -2.0, 0.5])
    g = _mc_gradient(paper_estimator, s, w, k=2)
    expected = w.double() * torch.sqrt(s.double() * (1 - s.double())) * 2
    assert torch.allclose(g, expected, atol=0.15)


def test_paper_estimator_with_the_others_baseline_keeps_its_expectation():
    # exact expectations by enumeration: the same-step baseline of each mask depends only on the other
    # (independent) mask, so the mean estimate equals the one with a baseline fixed before the step
    s = torch.tensor([0.15, 0.5, 0.7], dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def loss(m):
        return (m @ w) ** 2 + 3.0 * m[..., 0] * m[..., 2]

    fixed = _exact_mean("paper", s, loss, (1.3, 1.1))
    others = _exact_mean("paper", s, loss, mode="others")
    assert fixed.abs().max() > 0.1
    assert torch.allclose(fixed, others, atol=1e-9), (fixed, others)


def test_the_others_baseline_ignores_what_the_batch_adds_to_every_mask():
    # a batch that is harder for every mask (the same offset on the K losses) moves the "previous"
    # baseline's estimate and leaves the same-step one unchanged
    s = torch.tensor([0.2, 0.5, 0.9])
    m = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    losses = torch.tensor([2.0, 2.5])
    estimates = {}
    for mode in ("previous", "others"):
        estimates[mode] = [paper_estimator(m, s, losses + offset, BaselineState(history=deque([2.0]), mode=mode))[0]
                           for offset in (0.0, 0.7)]
    assert torch.allclose(*estimates["others"], atol=1e-6)
    assert not torch.allclose(*estimates["previous"], atol=1e-3)
    # K=2: the estimate is (L1 - L2) (m1 - m2) / sqrt(s (1 - s))
    expected = (losses[0] - losses[1]) * (m[0] - m[1]) / torch.sqrt(s * (1 - s))
    assert torch.allclose(estimates["others"][0], expected, atol=1e-5)


def test_estimator_needs_enough_samples():
    with pytest.raises(ConfigError, match="K >= 2"):
        get_estimator("loo", 1)
    with pytest.raises(ConfigError, match="unknown estimator"):
        get_estimator("nope", 2)
    with pytest.raises(ConfigError, match="K must be even"):
        get_estimator("disarm", 3)


def _importance_loss(weights):
    """A stand-in for the LM loss: removing channel j costs weights[j] (known optimum)."""
    def loss_fn(model, batch, masks, costs=None):
        m = masks["channel"].float()  # [K, L, I]
        return ((1 - m) * weights).sum((-1, -2))
    return loss_fn


@pytest.mark.parametrize("estimator", ["paper", "loo", "disarm"])
def test_pg_learns_to_keep_the_important_units(estimator):
    model, costs, layout = _setup(("channel",), num_hidden_layers=2, intermediate_size=16)
    L, I = costs.num_layers, costs.units_per_layer("channel")
    weights = torch.rand(L, I, generator=torch.Generator().manual_seed(5))
    config = PGSettings(steps=400, k=4, batch_size=1, lr=0.02, estimator=estimator, eval_every=1000)
    calib = torch.zeros(4, 8, dtype=torch.long)
    policy = UnitPolicy(torch.full((layout.size,), 0.5), layout, costs, 0.1)
    res = run_policy_gradient(model, calib, policy, config, loss_fn=_importance_loss(weights), progress=False)
    kept = res.masks["channel"].reshape(-1)
    ideal = torch.zeros_like(kept)
    ideal[weights.reshape(-1).topk(int(kept.sum())).indices] = True
    assert (kept == ideal).float().mean() >= 0.85  # a random mask agrees on about half
    assert abs(res.masks.sparsity(costs) - 0.1) < 0.01


@pytest.mark.parametrize("control_variate", [False, True])
def test_resume_gives_the_same_result_and_refuses_other_settings(tmp_path, control_variate):
    model, costs, layout = _setup(("channel", "head"), num_hidden_layers=2, intermediate_size=32)
    calib = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    s0 = torch.full((layout.size,), 0.6)
    fresh = lambda: UnitPolicy(s0, layout, costs, 0.4)  # noqa: E731
    config = PGSettings(steps=6, k=2, batch_size=4, lr=0.05, eval_every=3, control_variate=control_variate)
    full = run_policy_gradient(model, calib, fresh(), config, out_dir=tmp_path / "a", progress=False)
    run_policy_gradient(model, calib, fresh(), config, out_dir=tmp_path / "b", progress=False, stop_after=3)
    checkpoint = tmp_path / "b" / run_folder.CHECKPOINT_FILE
    state = torch.load(checkpoint, weights_only=False)
    assert state["seconds"] > 0
    state["seconds"] = 1000.0  # as if the stopped process had run long: the resumed record must count it
    torch.save(state, checkpoint)
    resumed = run_policy_gradient(model, calib, fresh(), config, out_dir=tmp_path / "b", progress=False,
                                  resume=True)
    assert torch.equal(full.probs, resumed.probs)
    assert full.history == resumed.history
    assert full.resumed_at is None and resumed.resumed_at == 3
    assert 1000.0 < resumed.seconds < 1000.0 + 60
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    other = PGSettings(**{**config.__dict__, "lr": 0.1})
    with pytest.raises(CheckpointError, match="lr"):
        run_policy_gradient(model, calib, fresh(), other, out_dir=tmp_path / "b", resume=True, progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run_policy_gradient(model, calib, fresh(), config, out_dir=tmp_path / "c", resume=True, progress=False)


def _same(a, b) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a[k], b[k]) for k in a.tensors)


def test_select_best_returns_the_evaluated_mask_with_the_lowest_perplexity(tmp_path):
    model, costs, layout = _setup(("channel", "head"), num_hidden_layers=2, intermediate_size=32)
    calib = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    s0 = torch.full((layout.size,), 0.6)
    fresh = lambda: UnitPolicy(s0, layout, costs, 0.4)  # noqa: E731
    config = PGSettings(steps=8, k=2, batch_size=4, lr=0.3, eval_every=2, select="best")
    seen = []
    scores = iter([50.0, 40.0, 30.0, 45.0, 35.0])  # steps 0, 2, 4, 6, 8: step 4 is the best

    def eval_fn(masks):
        seen.append(masks)
        return next(scores)

    res = run_policy_gradient(model, calib, fresh(), config, eval_fn=eval_fn, progress=False)
    assert res.selected_step == 4 and _same(res.masks, seen[2])
    assert not _same(res.masks, seen[-1])  # lr 0.3 moved the hard mask after step 4
    final = run_policy_gradient(model, calib, fresh(), PGSettings(**{**config.__dict__, "select": "final"}),
                                eval_fn=lambda m: 1.0, progress=False)
    assert final.selected_step == 8 and _same(final.masks, seen[-1])
    # resumed across the best step: the same pick
    scores = iter([50.0, 40.0, 30.0, 45.0, 35.0])
    run_policy_gradient(model, calib, fresh(), config, eval_fn=lambda m: next(scores), progress=False,
                        out_dir=tmp_path, stop_after=5)
    resumed = run_policy_gradient(model, calib, fresh(), config, eval_fn=lambda m: next(scores),
                                  progress=False, out_dir=tmp_path, resume=True)
    assert resumed.selected_step == 4 and _same(resumed.masks, seen[2])
    # nothing evaluated (no eval_fn, e.g. a library call): "best" has only the final mask to give
    unevaluated = run_policy_gradient(model, calib, fresh(), config, progress=False)
    assert unevaluated.selected_step == 8 and _same(unevaluated.masks, seen[-1])
    with pytest.raises(ConfigError, match="select"):
        RunSettings.from_recipe("features", {"pg.select": "last"}).validate()


def test_nan_losses_are_skipped_and_counted():
    model, costs, layout = _setup(("channel",))
    calls = {"n": 0}

    def flaky(model, batch, masks, costs=None):
        calls["n"] += 1
        k = masks["channel"].shape[0]
        return torch.full((k,), math.nan) if calls["n"] % 2 else torch.rand(k)

    config = PGSettings(steps=10, k=2, batch_size=1, lr=0.01)
    s0 = torch.full((layout.size,), 0.7)
    res = run_policy_gradient(model, torch.zeros(2, 4, dtype=torch.long), UnitPolicy(s0, layout, costs, 0.3), config,
                              loss_fn=flaky, progress=False)
    assert res.skipped_steps == 5
    assert torch.isfinite(res.probs).all()

    def always_nan(model, batch, masks, costs=None):
        return torch.full((2,), math.nan)

    with pytest.raises(ConfigError, match="NaN"):
        run_policy_gradient(model, torch.zeros(2, 4, dtype=torch.long), UnitPolicy(s0, layout, costs, 0.3),
                            PGSettings(steps=30, k=2, batch_size=1), loss_fn=always_nan, progress=False)


def test_bad_settings():
    model, costs, layout = _setup(("channel",))
    s0 = torch.full((layout.size,), 0.5)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        run_policy_gradient(model, torch.zeros(2, 4, dtype=torch.long), UnitPolicy(s0, layout, costs, 0.3),
                            PGSettings(batch_size=8), progress=False)
    with pytest.raises(ConfigError, match="sparsity"):
        RunSettings.from_recipe("features", {"sparsity": 1.0}).validate()
    with pytest.raises(ConfigError, match="K >= 2"):
        RunSettings.from_recipe("features", {"pg.policy": "features", "pg.estimator": "loo", "pg.k": 1}).validate()


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, costs, layout = _setup(("channel",), num_hidden_layers=2, intermediate_size=32)
    calib = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    config = PGSettings(steps=4, k=2, batch_size=4, lr=0.05, eval_every=2)
    res = run_policy_gradient(model, calib, UnitPolicy(torch.full((layout.size,), 0.7), layout, costs, 0.3), config,
                              eval_fn=lambda masks: 10.0 + float(masks["channel"].sum()) / 1000, progress=False,
                              tensorboard=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = events.Scalars("pg/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([h["loss"] for h in res.history if "loss" in h])
    assert [e.step for e in events.Scalars("pg/hard_ppl")] == [0, 2, 4]
