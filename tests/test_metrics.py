"""Metric-based pruning: layer-by-layer statistics, scores, allocations, initial probabilities.

References are plain re-computations: one full forward with hooks, explicit formulas on the
captured activations, and brute-force searches over removal prefixes."""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import pytest
import torch

from pgprune.errors import ConfigError, DataError
from pgprune.masks import Masks, UnitCosts
from pgprune.budget import expected_keep_ratio, hard_mask
from pgprune.metrics import allocate, compute_scores, metric_masks, resolve_allocation, run_metric
from pgprune.policy.initial_probabilities import init_probabilities
from pgprune.budget import global_positions, masks_from_positions, present_units
from pgprune.metrics.calibration import FeatureStats, LayerStats, capture_layer_inputs, collect_layer_stats
from pgprune.metrics.scores import scores_from_stats
from pgprune.models.adapter import get_adapter
from pgprune.models.synthetic import TEST_FAMILIES, synthetic_model

# SmolLM2-like grouping (3 KV heads, 2 query heads each) at toy size.
SIZES = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
             intermediate_size=40, num_hidden_layers=4)
EXTRA = {"qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=2),
         "mistral": dict(sliding_window=5)}


pytestmark = pytest.mark.usefixtures("one_thread")


def make(family="llama", seed=0, **over):
    sizes = {**SIZES, **EXTRA.get(family, {}), **over}
    return synthetic_model(family, seed=seed, **sizes)


def ids(n=5, t=12, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def costs_of(model):
    return UnitCosts.from_adapter(get_adapter(model))


# --- reference: one plain forward with hooks ----------------------------------------------------------
@torch.no_grad()
def reference_activations(model, input_ids):
    a = get_adapter(model)
    acts = defaultdict(list)
    handles = []
    for i in range(a.num_layers):
        m = a.layer(i)
        handles.append(m.layer.register_forward_pre_hook(
            lambda _m, args, kw, i=i: acts[("in", i)].append(args[0] if args else kw["hidden_states"]),
            with_kwargs=True))
        handles.append(m.layer.register_forward_hook(
            lambda _m, _a, out, i=i: acts[("out", i)].append(out[0] if isinstance(out, tuple) else out)))
        handles.append(m.o_proj.register_forward_pre_hook(lambda _m, args, i=i: acts[("o", i)].append(args[0])))
        handles.append(m.down_proj.register_forward_pre_hook(lambda _m, args, i=i: acts[("d", i)].append(args[0])))
        handles.append(m.post_attention_norm.register_forward_pre_hook(
            lambda _m, args, i=i: acts[("mid", i)].append(args[0])))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v).double() for k, v in acts.items()}


def reference_layer_stats(model, input_ids):
    acts = reference_activations(model, input_ids)
    out = []
    cos = lambda x, y: float(torch.nn.functional.cosine_similarity(x, y, dim=-1).sum())  # noqa: E731
    for i in range(get_adapter(model).num_layers):
        fs = []
        for key in ("o", "d"):
            x = acts[(key, i)].reshape(-1, acts[(key, i)].shape[-1])
            fs.append(FeatureStats(x.shape[0], x.mean(0), x.var(0) * (x.shape[0] - 1)))
        h_in, mid, h_out = acts[("in", i)], acts[("mid", i)], acts[("out", i)]
        out.append(LayerStats(i, h_in.shape[0] * h_in.shape[1], fs[0], fs[1],
                              cos(h_in, mid), cos(mid, h_out), cos(h_in, h_out)))
    return out, acts


@pytest.mark.parametrize("family", TEST_FAMILIES)
def test_layer_by_layer_stats_equal_full_forward(family):
    model = make(family)
    x = ids(5, 12)
    got = collect_layer_stats(model, x, batch_size=2, progress=False)  # uneven last batch
    ref, _ = reference_layer_stats(model, x)
    for g, r in zip(got, ref):
        assert g.tokens == r.tokens == 5 * 12
        for gf, rf in ((g.attn_in, r.attn_in), (g.mlp_in, r.mlp_in)):
            torch.testing.assert_close(gf.mean, rf.mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gf.variance, rf.variance, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(gf.mean_square, rf.mean_square, rtol=1e-4, atol=1e-6)
        for block in ("attn", "mlp", "layer"):
            assert g.mean_cos(block) == pytest.approx(r.mean_cos(block), abs=1e-5)
    # ... and so are the scores built on them
    adapter = get_adapter(model)
    for method in ("wanda-sp", "flap", "block-influence"):
        kinds = ("attn", "mlp", "layer") if method == "block-influence" else ("channel", "head", "layer")
        a = scores_from_stats(adapter, got, method, kinds)
        b = scores_from_stats(adapter, ref, method, kinds)
        for k in kinds:
            torch.testing.assert_close(a.raw[k], b.raw[k], rtol=1e-4, atol=1e-8)
            torch.testing.assert_close(a.standardized[k], b.standardized[k], rtol=1e-3, atol=1e-5)


def test_sliding_window_layers_get_their_own_mask():
    """qwen2 with sliding-window layers: a layer fed the full-attention mask would differ."""
    model = make("qwen2")
    assert len(set(model.config.layer_types)) == 2
    x = ids(3, 12)
    got = collect_layer_stats(model, x, progress=False)
    ref, _ = reference_layer_stats(model, x)
    late = model.config.layer_types.index("sliding_attention")
    torch.testing.assert_close(got[late].attn_in.mean, ref[late].attn_in.mean, rtol=1e-5, atol=1e-6)


def test_scores_match_explicit_formulas():
    model = make("llama")
    x = ids(4, 10)
    a = get_adapter(model)
    _, acts = reference_layer_stats(model, x)
    s_w = compute_scores(model, x, "wanda-sp", ("channel", "head"), progress=False)
    s_f = compute_scores(model, x, "flap", ("channel", "head"), progress=False)
    s_m = compute_scores(model, None, "magnitude", ("channel", "head", "layer"))
    s_b = compute_scores(model, x, "block-influence", ("layer",), progress=False)
    g, hd = a.queries_per_kv, a.head_dim
    for i in range(a.num_layers):
        m = a.layer(i)
        Xo = acts[("o", i)].reshape(-1, acts[("o", i)].shape[-1])
        Xd = acts[("d", i)].reshape(-1, acts[("d", i)].shape[-1])
        Wo, Wd = m.o_proj.weight.double(), m.down_proj.weight.double()
        # wanda-sp: mean_i |W_ij| * ||X_j|| (rms), summed over the group's columns
        wo = Wo.abs().mean(0) * Xo.pow(2).mean(0).sqrt()
        torch.testing.assert_close(s_w.raw["head"][i], wo.reshape(-1, g * hd).sum(1), rtol=1e-4, atol=0)
        torch.testing.assert_close(s_w.raw["channel"][i], Wd.abs().mean(0) * Xd.pow(2).mean(0).sqrt(),
                                   rtol=1e-4, atol=0)
        # flap: Var(X_j) * ||W_:,j||^2; heads square it (as FLAP's reference)
        fo = Xo.var(0) * Wo.pow(2).sum(0)
        torch.testing.assert_close(s_f.raw["head"][i], fo.pow(2).reshape(-1, g * hd).sum(1), rtol=1e-3, atol=0)
        torch.testing.assert_close(s_f.raw["channel"][i], Xd.var(0) * Wd.pow(2).sum(0), rtol=1e-3, atol=0)
        # flap's global scores: standardised within the layer, heads averaged over their features
        z = (fo.pow(2) - fo.pow(2).mean()) / fo.pow(2).std()
        torch.testing.assert_close(s_f.standardized["head"][i], z.reshape(-1, g * hd).mean(1), rtol=1e-3, atol=1e-5)
        # magnitude: L2 norm of the unit's weights
        q = m.q_proj.weight.double().reshape(-1, g * hd, m.q_proj.in_features)
        k = m.k_proj.weight.double().reshape(-1, hd, m.k_proj.in_features)
        v = m.v_proj.weight.double().reshape(-1, hd, m.v_proj.in_features)
        o = Wo.reshape(Wo.shape[0], -1, g * hd)
        head_norm = (q.pow(2).sum((1, 2)) + k.pow(2).sum((1, 2)) + v.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))).sqrt()
        torch.testing.assert_close(s_m.raw["head"][i], head_norm, rtol=1e-5, atol=0)
        layer_norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in m.layer.parameters() if p.dim() == 2))
        assert float(s_m.raw["layer"][i, 0]) == pytest.approx(layer_norm, rel=1e-5)
        # block influence: 1 - mean cos(layer input, layer output)
        cos = torch.nn.functional.cosine_similarity(acts[("in", i)], acts[("out", i)], dim=-1).mean()
        assert float(s_b.raw["layer"][i, 0]) == pytest.approx(1 - float(cos), abs=1e-5)


# --- budgets -------------------------------------------------------------------------------------
def brute_force_prefix(keys, costs, target):
    """Try every prefix of the ascending-key order; keep the closest (first on ties)."""
    pos = global_positions(keys, costs)
    n_max = sum(int(present_units(costs, k).sum()) for k in keys)
    best = min(range(n_max + 1), key=lambda n: (abs(masks_from_positions(pos, n).sparsity(costs) - target), n))
    return masks_from_positions(pos, best)


@pytest.mark.parametrize("kinds", [("channel", "head"), ("head",), ("layer",), ("channel", "head", "layer")])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.55])
def test_global_allocation_is_closest_prefix_of_standardised_order(kinds, sparsity):
    model = make("llama", num_hidden_layers=5)
    costs = costs_of(model)
    if "head" in kinds and len(kinds) == 1 and sparsity > 0.2:
        pytest.skip("heads alone cannot reach this sparsity (tested in test_unreachable_budgets)")
    scores = compute_scores(model, None, "random", kinds, seed=3)
    alloc = allocate(scores, costs, sparsity, "global")
    ref = brute_force_prefix(scores.standardized, costs, sparsity)
    for k in kinds:
        assert torch.equal(alloc.masks[k], ref[k])
    one_unit = max(int(costs.unit_cost(k).max()) for k in kinds) / costs.prunable_params
    assert abs(alloc.sparsity - sparsity) <= one_unit / 2 + 1e-12
    assert alloc.sparsity == pytest.approx(alloc.masks.sparsity(costs))
    # standardised per kind: mean 0, std 1 over the existing units
    for k in kinds:
        s = scores.standardized[k][present_units(costs, k)]
        if s.numel() > 1:
            assert float(s.mean()) == pytest.approx(0, abs=1e-9) and float(s.std()) == pytest.approx(1)


@pytest.mark.parametrize("sparsity", [0.05, 0.2, 0.3, 0.5])
def test_uniform_allocation_meets_budget_with_equal_fractions(sparsity):
    model = make("llama", num_hidden_layers=6)
    costs = costs_of(model)
    scores = compute_scores(model, None, "magnitude", ("channel", "head"))
    alloc = allocate(scores, costs, sparsity, "uniform")
    m = alloc.masks
    head_cost, chan_cost = int(costs.head_cost[0]), int(costs.channel_cost[0])
    # within half of the boundary step (a channel: channels absorb the head rounding)
    assert abs(alloc.sparsity - sparsity) * costs.prunable_params <= chan_cost / 2 + 1
    removed_h = (~m["head"]).sum(1)
    removed_c = (~m["channel"]).sum(1)
    assert int(removed_h.max() - removed_h.min()) <= 1 and int(removed_c.max() - removed_c.min()) <= 1
    # same fraction of each kind, up to whole heads: the rounding of the head count
    H, I = costs.num_kv_heads.sum(), costs.intermediate.sum()
    f = sparsity * costs.prunable_params / float(H * head_cost + I * chan_cost)
    assert int(removed_h.sum()) == round(f * int(H))
    if sparsity >= 0.2:  # 3 KV heads per layer: a per-layer round would keep them all at 0.1
        assert int(removed_h.sum()) > 0
    # each layer removes its lowest-scoring units
    for kind in ("head", "channel"):
        for i in range(costs.num_layers):
            r = scores.raw[kind][i]
            removed, kept = r[~m[kind][i]], r[m[kind][i]]
            if removed.numel() and kept.numel():
                assert float(removed.max()) <= float(kept.min())


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_uniform_allocation_beside_whole_layers_keeps_every_layer(method):
    """channel,head,layer under `uniform`: the channel / head mask of the same run without layers (the
    pruned-propagation walk included), every layer kept, so PG starts from it and can trade layers in."""
    model = make("llama", num_hidden_layers=5)
    costs = costs_of(model)
    x = ids(4, 10)
    fine = run_metric(model, x, method, 0.3, ("channel", "head"), "uniform", progress=False)
    mixed = run_metric(model, x, method, 0.3, ("channel", "head", "layer"), "uniform", progress=False)
    assert mixed.info["propagate"] == fine.info["propagate"] == ("pruned" if method == "wanda-sp" else "dense")
    for kind in ("channel", "head"):
        assert torch.equal(mixed.masks[kind], fine.masks[kind])
    assert bool(mixed.masks["layer"].all()) and mixed.masks.sparsity(costs) == fine.masks.sparsity(costs)
    assert torch.isfinite(mixed.allocation.keys["layer"]).all()  # PG's start ranks the layers by them


@pytest.mark.parametrize("method, allocation", [("flap", "global"), ("wanda-sp", "uniform"), ("obs", "uniform")])
def test_layers_first_removes_the_lowest_block_influence_then_meets_the_budget(method, allocation):
    """--remove-layers N: the N layers block influence ranks lowest go first (from the same dense statistics),
    then the method's channel / head order over the kept layers: one threshold (global) or the same fraction
    of every kept layer (uniform), the true sparsity within a unit of the target."""
    model = make("llama", num_hidden_layers=6)
    costs = costs_of(model)
    x = ids(4, 10)
    influence = run_metric(model, x, "block-influence", 0.3, ("layer",), progress=False).scores.raw["layer"][:, 0]
    for n in (1, 2):
        r = run_metric(model, x, method, 0.4, ("channel", "head", "layer"), allocation, remove_layers=n,
                       progress=False)
        removed = ~r.masks["layer"][:, 0]
        assert removed.nonzero().flatten().tolist() == sorted(torch.argsort(influence)[:n].tolist())
        assert r.info["remove_layers"]["layers"] == removed.nonzero().flatten().tolist()
        assert r.info["propagate"] == "dense" and r.info["allocation"] == allocation
        unit = max(int(costs.channel_cost.max()), int(costs.head_cost.max())) / costs.prunable_params
        assert abs(r.masks.sparsity(costs) - 0.4) <= unit
        kept_layers = (~removed).nonzero().flatten()
        channels_gone = (~r.masks["channel"][kept_layers]).sum(1)
        if allocation == "uniform":  # the same fraction of each kept layer's channels, within one channel
            assert int(channels_gone.max() - channels_gone.min()) <= 1
        else:  # one threshold over the kept layers' standardised channel and head scores
            keys = torch.cat([r.allocation.keys[k][kept_layers].flatten() for k in ("channel", "head")])
            gone = torch.cat([(~r.masks[k][kept_layers]).flatten() for k in ("channel", "head")])
            assert float(keys[gone].max()) <= float(keys[~gone].min())
        assert int(channels_gone.sum()) > 0
    with pytest.raises(ConfigError, match="more than the budget"):
        run_metric(model, x, method, 0.2, ("channel", "head", "layer"), allocation, remove_layers=2, progress=False)
    with pytest.raises(ConfigError, match="choose 0 to 5"):
        run_metric(model, x, method, 0.4, ("channel", "head", "layer"), allocation, remove_layers=6, progress=False)
    with pytest.raises(ConfigError, match="needs --units layer"):
        run_metric(model, x, method, 0.4, ("channel", "head"), allocation, remove_layers=1, progress=False)
    with pytest.raises(ConfigError, match="propagate='pruned'"):
        run_metric(model, x, method, 0.4, ("channel", "head", "layer"), "uniform", remove_layers=1, progress=False,
                   propagate="pruned")


@pytest.mark.parametrize("method, allocation", [("flap", "global"), ("obs", "uniform")])
def test_remove_layers_first_reallocates_as_a_fresh_run_would(method, allocation):
    """--remove-layers auto tries several counts on one metric pass: re-allocating a result for another count
    gives run_metric's own masks for that count, 0 (every layer kept, the layer kind present) included, up to
    removable_layers, the most the budget holds."""
    from pgprune.metrics.allocation import removable_layers
    from pgprune.metrics.pipeline import remove_layers_first

    model = make("llama", num_hidden_layers=6)
    costs = costs_of(model)
    x = ids(4, 10)
    kinds = ("channel", "head", "layer")
    first = run_metric(model, x, method, 0.4, kinds, allocation, remove_layers=1, bias_compensation=False,
                       progress=False)
    cap = removable_layers(first.layer_influence, costs, 0.4)
    assert cap == 2  # six equal layers: two are 33 % of the prunable parameters, three 50 %
    for n in range(cap + 1):
        fresh = run_metric(model, x, method, 0.4, kinds, allocation, remove_layers=n, progress=False)
        moved = remove_layers_first(first, n, costs)
        assert set(moved.masks.tensors) == set(fresh.masks.tensors) == set(kinds)
        assert all(torch.equal(moved.masks[k], fresh.masks[k]) for k in kinds)
        assert moved.info["remove_layers"] == fresh.info["remove_layers"]
        assert moved.info["remove_layers"]["count"] == n
        assert moved.info["sparsity"] == pytest.approx(fresh.info["sparsity"])
    with pytest.raises(ConfigError, match="more than the budget"):
        remove_layers_first(first, cap + 1, costs)
    assert removable_layers(first.layer_influence, costs, 0.9) == 5  # never every layer
    with pytest.raises(ConfigError, match="removed whole layers first"):
        remove_layers_first(run_metric(model, x, method, 0.4, ("channel", "head"), allocation, progress=False), 1,
                            costs)


def test_layer_units_reach_multiples_and_report_the_reachable_ones():
    model = make("llama", num_hidden_layers=10)
    costs = costs_of(model)
    scores = compute_scores(model, None, "random", ("layer",))
    alloc = allocate(scores, costs, 0.3, "global")
    assert alloc.sparsity == pytest.approx(0.3) and int((~alloc.masks["layer"]).sum()) == 3
    with pytest.raises(ConfigError, match=r"0\.2000 and 0\.3000"):
        allocate(scores, costs, 0.25, "global", tolerance=0.01)


def test_unreachable_budgets():
    model = make("llama")
    costs = costs_of(model)
    heads = compute_scores(model, None, "random", ("head",))
    head_share = float((costs.num_kv_heads * costs.head_cost + costs.attn_fixed).sum()) / costs.prunable_params
    with pytest.raises(ConfigError, match=f"{head_share:.4f}"):
        allocate(heads, costs, head_share + 0.1, "uniform")
    # a budget smaller than half a head rounds to removing nothing: an error, not a silent no-op
    tiny = 0.4 * int(costs.head_cost[0]) / costs.prunable_params
    with pytest.raises(ConfigError, match="removing nothing"):
        allocate(heads, costs, tiny, "uniform")
    for bad in (-0.1, 1.0, 1.5, float("nan"), "x"):
        with pytest.raises(ConfigError, match=r"\[0, 1\)"):
            allocate(heads, costs, bad, "global")
    with pytest.raises(ConfigError, match="allocation"):
        allocate(heads, costs, 0.1, "greedy")
    # mixed with whole layers, only the per-layer kinds can meet a uniform budget: their share is the limit
    both = compute_scores(model, None, "random", ("head", "layer"))
    with pytest.raises(ConfigError, match=f"{head_share:.4f}"):
        allocate(both, costs, head_share + 0.1, "uniform")
    assert allocate(heads, costs, 0.0, "global").sparsity == 0.0


def test_bad_inputs_of_metric_masks():
    model = make("llama")
    x = ids(4, 8)
    with pytest.raises(DataError, match="only 4 calibration windows"):
        metric_masks(model, x, "wanda-sp", 0.2, nsamples=10, progress=False)
    with pytest.raises(ConfigError, match="needs calibration"):
        metric_masks(model, None, "flap", 0.2)
    with pytest.raises(ConfigError, match="cannot score"):
        metric_masks(model, x, "block-influence", 0.2, ("channel",))
    with pytest.raises(ConfigError, match="unknown metric"):
        metric_masks(model, x, "taylor", 0.2)
    with pytest.raises(ConfigError, match="propagate='pruned'"):
        metric_masks(model, x, "wanda-sp", 0.2, allocation="global", propagate="pruned")
    with pytest.raises(DataError, match="vocabulary"):
        metric_masks(model, x + 1000, "wanda-sp", 0.2, progress=False)
    with pytest.raises(DataError, match="LongTensor"):
        metric_masks(model, x[0], "wanda-sp", 0.2, progress=False)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        metric_masks(model, x, "wanda-sp", 1.0, progress=False)


def test_seeded_runs_are_reproducible():
    model = make("llama")
    x = ids(4, 8)
    a = metric_masks(model, x, "wanda-sp", 0.3, progress=False)[0]
    b = metric_masks(model, x, "wanda-sp", 0.3, progress=False)[0]
    assert all(torch.equal(a[k], b[k]) for k in a.kinds)
    r1 = metric_masks(model, None, "random", 0.3, allocation="global", seed=1)[0]
    r1b = metric_masks(model, None, "random", 0.3, allocation="global", seed=1)[0]
    r2 = metric_masks(model, None, "random", 0.3, allocation="global", seed=2)[0]
    assert torch.equal(r1["channel"], r1b["channel"]) and not torch.equal(r1["channel"], r2["channel"])


# --- FLAP bias compensation --------------------------------------------------------------------------
def test_flap_compensation_is_the_mean_of_removed_features_and_lowers_the_error():
    model = make("llama")
    x = ids(6, 12)
    masks, bias, info = metric_masks(model, x, "flap", 0.3, ("channel", "head"), "uniform", progress=False)
    assert info["bias_compensation"] and bias is not None
    _, acts = reference_layer_stats(model, x)
    a = get_adapter(model)
    per_head = a.queries_per_kv * a.head_dim
    for i in range(a.num_layers):
        m = a.layer(i)
        for key, proj, keep, block in (("o", m.o_proj, masks["head"][i].repeat_interleave(per_head), "attn"),
                                       ("d", m.down_proj, masks["channel"][i], "mlp")):
            X = acts[(key, i)].reshape(-1, proj.in_features)
            W = proj.weight.double()
            removed = ~keep
            ref = W[:, removed] @ X[:, removed].mean(0)
            torch.testing.assert_close(bias[block][i].double(), ref, rtol=1e-4, atol=1e-6)
            dense = X @ W.T
            pruned = (X * keep) @ W.T
            if removed.any():
                err_plain = (pruned - dense).pow(2).sum()
                err_comp = (pruned + ref - dense).pow(2).sum()
                assert err_comp < err_plain


def test_flap_compensation_lowers_layer_output_error_after_surgery():
    surgery = pytest.importorskip("pgprune.surgery")
    model = make("llama")
    x = ids(6, 12)
    masks, bias, _ = metric_masks(model, x, "flap", 0.3, ("channel", "head"), "uniform", progress=False)
    _, acts = reference_layer_stats(model, x)
    plain = surgery.remove_units(model, masks, copy=True)
    comp = surgery.remove_units(model, masks, output_bias=bias, copy=True)
    a = get_adapter(model)
    layer_kwargs = capture_layer_inputs(model, x, batch_size=x.shape[0]).kwargs[0]  # one batch
    with torch.no_grad():
        for i in range(a.num_layers):
            h = acts[("in", i)].float()
            dense = acts[("out", i)]
            outs = [get_adapter(mm).layer(i).layer(h, **layer_kwargs[i]) for mm in (plain, comp)]
            outs = [o[0] if isinstance(o, tuple) else o for o in outs]
            e_plain, e_comp = [float((o.double() - dense).pow(2).sum()) for o in outs]
            assert e_comp < e_plain


# --- pruned propagation -------------------------------------------------------------------------
def test_pruned_propagation_sees_the_pruned_model():
    """With propagate='pruned', layer i's statistics come from the model whose layers < i are
    pruned: they equal the o_proj inputs (kept heads) of the surgically pruned model."""
    surgery = pytest.importorskip("pgprune.surgery")
    model = make("llama")
    x = ids(5, 10)
    r = run_metric(model, x, "flap", 0.3, ("channel", "head"), "uniform", propagate="pruned", progress=False)
    pruned = surgery.remove_units(model, r.masks, output_bias=r.output_bias, copy=True)
    _, acts = reference_layer_stats(pruned, x)
    a = get_adapter(model)
    per_head = a.queries_per_kv * a.head_dim
    dense = collect_layer_stats(model, x, progress=False)
    for i in range(a.num_layers):
        keep = r.masks["head"][i].repeat_interleave(per_head)
        Xo = acts[("o", i)].reshape(-1, int(keep.sum()))
        st = r.scores.stats[i].attn_in
        torch.testing.assert_close(st.mean[keep], Xo.mean(0), rtol=1e-4, atol=1e-5)
        if i > 0:  # and they differ from the dense statistics once earlier layers are pruned
            assert not torch.allclose(st.mean, dense[i].attn_in.mean, atol=1e-4)


# --- initial probabilities -----------------------------------------------------------------------
@pytest.mark.parametrize("method,kinds,allocation", [
    ("wanda-sp", ("channel", "head"), "uniform"),
    ("flap", ("channel", "head"), "global"),
    ("magnitude", ("channel", "head", "layer"), "global"),
    ("wanda-sp", ("channel", "head", "layer"), "uniform"),
    ("block-influence", ("layer",), "global"),
])
@pytest.mark.parametrize("init", ["sigmoid", "constant"])
def test_init_probabilities_read_off_the_metric_mask(method, kinds, allocation, init):
    model = make("llama", num_hidden_layers=5)
    costs = costs_of(model)
    r = run_metric(model, ids(4, 10), method, 0.3, kinds, allocation, progress=False)
    ip = init_probabilities(r.allocation, costs, init)
    assert ip.sparsity == pytest.approx(r.masks.sparsity(costs))
    read = hard_mask(ip.probs, costs, ip.sparsity)
    eff_a, eff_b = read.effective(costs), r.masks.effective(costs)
    for k in eff_a:
        assert torch.equal(eff_a[k], eff_b[k]), k
    assert float(expected_keep_ratio(ip.probs, costs)) == pytest.approx(ip.keep_ratio, abs=1e-6)
    for k in kinds:
        p = ip.probs[k][present_units(costs, k)]
        assert bool(((p > 0) & (p < 1)).all())
    if init == "sigmoid":  # rank-preserving inside the kept and the removed group
        for k in kinds:
            for group in (r.masks[k], ~r.masks[k]):
                sel = group & present_units(costs, k)
                keys, probs = r.allocation.keys[k][sel], ip.probs[k][sel].double()
                order = torch.argsort(keys)
                assert bool((probs[order].diff() >= 0).all())


def test_init_scale_concentrates_the_probabilities_on_the_same_mask():
    from pgprune.policy.probabilities import mean_entropy

    model = make("llama", num_hidden_layers=5)
    costs = costs_of(model)
    r = run_metric(model, ids(4, 10), "wanda-sp", 0.3, ("channel", "head"), "uniform", progress=False)
    entropy = {}
    for scale in (1.0, 8.0):
        ip = init_probabilities(r.allocation, costs, "sigmoid", scale=scale)
        assert torch.equal(hard_mask(ip.probs, costs, ip.sparsity)["channel"], r.masks["channel"])
        assert float(expected_keep_ratio(ip.probs, costs)) == pytest.approx(ip.keep_ratio, abs=1e-6)
        flat = torch.cat([ip.probs[k].reshape(-1) for k in ("channel", "head")])
        present = torch.cat([present_units(costs, k).reshape(-1) for k in ("channel", "head")])
        entropy[scale] = mean_entropy(flat, present)
    assert entropy[8.0] < 0.6 * entropy[1.0]  # samples stay nearer the metric's mask


def test_metric_result_exposes_only_dense_statistics():
    model = make("llama", num_hidden_layers=3)
    calib = ids(4, 10)
    flap = run_metric(model, calib, "flap", 0.3, ("channel", "head"), "global", progress=False)
    dense = collect_layer_stats(model, calib, propagate="dense", progress=False)
    assert flap.dense_stats is not None and len(flap.dense_stats) == 3
    assert all(torch.equal(a.mlp_in.mean, b.mlp_in.mean) for a, b in zip(flap.dense_stats, dense))
    wanda = run_metric(model, calib, "wanda-sp", 0.3, ("channel", "head"), "uniform", progress=False)
    assert wanda.info["propagate"] == "pruned" and wanda.dense_stats is None
    assert run_metric(model, None, "magnitude", 0.3, ("channel",), "uniform", progress=False).dense_stats is None


def test_expected_keep_ratio_of_hard_masks_is_their_kept_fraction():
    model = make("llama")
    costs = costs_of(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        heads = torch.rand(costs.num_layers, 3, generator=g) < 0.6
        heads[:, 0] = True  # no block emptied: the expectation ignores that rule
        chans = torch.rand(costs.num_layers, costs.units_per_layer("channel"), generator=g) < 0.5
        chans[:, 0] = True
        layer = torch.rand(costs.num_layers, 1, generator=g) < 0.7
        m = Masks({"head": heads, "channel": chans, "layer": layer})
        probs = {k: t.double() for k, t in m.tensors.items()}
        assert float(expected_keep_ratio(probs, costs)) == pytest.approx(1 - m.sparsity(costs), abs=1e-12)


# --- every family end to end -----------------------------------------------------------------------
@pytest.mark.parametrize("family", TEST_FAMILIES)
def test_every_family_prunes_to_budget(family):
    model = make(family, num_hidden_layers=3)
    x = ids(3, 10)
    costs = costs_of(model)
    for method, kinds, alloc in (("wanda-sp", ("channel", "head"), "uniform"),
                                 ("flap", ("channel", "head"), "global"),
                                 ("block-influence", ("attn", "mlp"), "global")):
        masks, bias, info = metric_masks(model, x, method, 0.3, kinds, alloc, progress=False)
        step = max(int(costs.unit_cost(k).max()) for k in kinds) / costs.prunable_params
        assert abs(info["sparsity"] - 0.3) <= step / 2 + 1e-9
        assert info["sparsity"] == pytest.approx(masks.sparsity(costs))
    surgery = pytest.importorskip("pgprune.surgery")
    masks, bias, info = metric_masks(model, x, "flap", 0.3, ("channel", "head"), "uniform", progress=False)
    pruned = surgery.remove_units(copy.deepcopy(model), masks, output_bias=bias)
    kept = int(masks.kept_prunable_params(costs)) + info["bias_params_added"]
    assert get_adapter(pruned).prunable_params() == kept


def test_auto_allocation_is_each_methods_own():
    assert resolve_allocation("flap", "auto", "channel,head") == "global"
    assert resolve_allocation("block-influence", "auto", ("layer",)) == "global"
    assert resolve_allocation("wanda-sp", "auto", ("attn", "mlp")) == "global"  # one ranking for whole blocks
    for method in ("wanda-sp", "magnitude", "random"):
        assert resolve_allocation(method, "auto", ("channel", "head")) == "uniform"
    # channels / heads beside whole blocks: uniform widths, every block kept at the start
    assert resolve_allocation("flap", "auto", ("channel", "head", "layer")) == "uniform"
    assert resolve_allocation("flap", "uniform", ("channel",)) == "uniform"
    with pytest.raises(ConfigError, match="auto or one of uniform, global"):
        resolve_allocation("flap", "greedy", ("channel",))
    model = make("llama")
    x = ids(4, 10)
    for method, own in (("flap", "global"), ("wanda-sp", "uniform")):
        auto = run_metric(model, x, method, 0.3, ("channel", "head"), progress=False)
        explicit = run_metric(model, x, method, 0.3, ("channel", "head"), own, progress=False)
        assert auto.info["allocation"] == auto.allocation.allocation == own
        assert all(torch.equal(auto.masks[k], explicit.masks[k]) for k in auto.masks.kinds)


def test_obs_scores_each_layer_from_its_covariances_and_keeps_none():
    """obs scores every layer from its full input covariances while the walk runs, stores only means and
    variances, and ranks units as `removal_errors` does; its global order is error per parameter."""
    from pgprune.reconstruction import removal_errors

    model = make("llama", num_hidden_layers=3)
    x = ids(6, 12)
    costs = costs_of(model)
    r = run_metric(model, x, "obs", 0.3, ("channel", "head"), "global", progress=False)
    assert abs(r.info["sparsity"] - 0.3) < 0.05 and r.info["sparsity"] == pytest.approx(r.masks.sparsity(costs))
    assert all(fs.comoment is None for st in r.dense_stats for fs in (st.attn_in, st.mlp_in))
    full = collect_layer_stats(model, x, covariance=True, progress=False)
    adapter = get_adapter(model)
    for i, st in enumerate(full):
        torch.testing.assert_close(r.scores.raw["channel"][i],
                                   removal_errors(adapter.layer(i).down_proj.weight, st.mlp_in))
        torch.testing.assert_close(r.scores.raw["head"][i, : adapter.num_kv_heads(i)],
                                   removal_errors(adapter.layer(i).o_proj.weight, st.attn_in,
                                                  adapter.head_group_width("o")))
        # no ties: ranking the scores reproduces the greedy order
        assert len(set(r.scores.raw["channel"][i].tolist())) == adapter.intermediate_size(i)
    torch.testing.assert_close(r.scores.standardized["channel"], r.scores.raw["channel"] / costs.unit_cost("channel"))
    # dense statistics without covariances cannot serve obs: run_metric collects its own, same scores
    reused = run_metric(model, x, "obs", 0.3, ("channel", "head"), "global", stats=r.dense_stats, progress=False)
    assert torch.equal(reused.scores.raw["channel"], r.scores.raw["channel"])
    assert not reused.info["calibration"]["reused_stats"]
    uniform = run_metric(model, x, "obs", 0.3, ("channel", "head"), "uniform", propagate="pruned", progress=False)
    assert uniform.info["propagate"] == "pruned" and uniform.dense_stats is None
    with pytest.raises(ConfigError, match="cannot score unit kind"):
        run_metric(model, x, "obs", 0.3, ("layer",), progress=False)
    with pytest.raises(ConfigError, match="covariance"):
        scores_from_stats(adapter, r.dense_stats, "obs", ("channel",))


def test_reused_dense_stats_give_the_same_result():
    model = make("llama")
    x = ids(4, 10)
    stats = collect_layer_stats(model, x, progress=False)
    for method, alloc in (("flap", "global"), ("wanda-sp", "global"), ("flap", "uniform")):
        a = run_metric(model, x, method, 0.3, ("channel", "head"), alloc, progress=False)
        b = run_metric(model, None, method, 0.3, ("channel", "head"), alloc, stats=stats, progress=False)
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks.kinds)
        if a.output_bias is not None:
            torch.testing.assert_close(a.output_bias["mlp"], b.output_bias["mlp"])
    with pytest.raises(ConfigError, match="dense statistics"):
        run_metric(model, x, "wanda-sp", 0.3, ("channel", "head"), "uniform", stats=stats, propagate="pruned")
