"""Reconstruction: the least-squares refit against a plain ridge regression, its effect on the layer
error, and masked-and-refit = pruned = reloaded for every removal path."""

from __future__ import annotations

import pytest
import torch

from pgprune.errors import ConfigError, DataError
from pgprune.export import load_pruned, save_pruned
from pgprune.masks import Masks
from pgprune.metrics.calibration import FeatureStats
from pgprune.models.adapter import get_adapter
from pgprune.reconstruction import (DEFAULT_DAMP, Refit, compensation_biases, feature_means, lsq_columns,
                                    may_use_sequential_inputs, reconstruct, refit_applied, removal_errors)
from pgprune.surgery import remove_units
from pgprune.models.synthetic import synthetic_model
from structure_helpers import CASES, costs_of, make_model, random_ids, structured_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated(n: int, f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, f, generator=g) @ torch.randn(f, f, generator=g) + 3 * torch.randn(f, generator=g)


def stats_of(x: torch.Tensor, batches: int = 3) -> FeatureStats:
    fs = FeatureStats.empty(x.shape[1], covariance=True)
    for part in x.chunk(batches):
        fs.update(part)
    return fs


def plain_ridge(x, w, keep, damp):
    """min over (W'_S, b) of mean_t ||W x_t - W'_S x_S,t - b||^2 + lam ||W'_S - W_S||^2, as one
    augmented least-squares problem solved by torch.linalg.lstsq (float64)."""
    x, w = x.double(), w.double()
    xs = x[:, keep]
    n = x.shape[0]
    lam = damp * float(x.var(0, correction=0).mean())  # relative to the mean variance of all inputs
    design = torch.cat([torch.cat([xs, torch.ones(n, 1, dtype=x.dtype)], 1),
                        torch.cat([(n * lam) ** 0.5 * torch.eye(xs.shape[1], dtype=x.dtype),
                                   torch.zeros(xs.shape[1], 1, dtype=x.dtype)], 1)])
    target = torch.cat([x @ w.T - xs @ w[:, keep].T, torch.zeros(xs.shape[1], w.shape[0], dtype=x.dtype)])
    sol = torch.linalg.lstsq(design, target).solution  # [S+1, out]: Delta^T and the bias
    return w[:, keep] + sol[:-1].T, sol[-1]


def refit_error(x, w, keep) -> float:
    """Mean over tokens of ||W x - (W'_S x_S + b)||^2 after the plain least-squares refit (no ridge)."""
    xc = (x - x.mean(0)).double()
    y, xs = xc @ w.double().T, xc[:, keep]
    if xs.shape[1] == 0:
        return float(y.pow(2).sum()) / len(x)
    fit = torch.linalg.lstsq(xs, y).solution
    return float((y - xs @ fit).pow(2).sum()) / len(x)


@pytest.mark.parametrize("width", [1, 3])
def test_removal_errors_follow_a_plain_greedy_least_squares_search(width):
    """One group per round and no ridge: the greedy order and each removal's added error (its running
    maximum) equal a search that refits every candidate kept set from scratch with torch.linalg.lstsq."""
    x, w = correlated(400, 12, seed=1), torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    groups = 12 // width
    errors = removal_errors(w, stats_of(x), width, damp=0.0, batches=groups)
    kept, before, running, order = list(range(groups)), 0.0, 0.0, []
    expected = torch.zeros(groups, dtype=torch.float64)
    while kept:
        def columns(gs):
            return [g * width + c for g in gs for c in range(width)]
        added, g = min((refit_error(x, w, columns([k for k in kept if k != g])) - before, g) for g in kept)
        running = max(running, added)
        expected[g] = running
        before += added
        kept.remove(g)
        order.append(g)
    assert errors.argsort().tolist() == order  # strictly increasing along the greedy order: ties nudged apart
    assert bool((errors[order[1:]] > errors[order[:-1]]).all())
    torch.testing.assert_close(errors, expected, rtol=1e-4, atol=1e-9)
    # in rounds of several groups the order is coarser but every group still gets a finite, ordered error
    coarse = removal_errors(w, stats_of(x), width, damp=DEFAULT_DAMP, batches=2)
    assert bool(torch.isfinite(coarse).all()) and bool((coarse > 0).all())


def test_removal_errors_refuse_or_degrade_clearly():
    x = correlated(50, 6)
    with pytest.raises(ConfigError, match="covariances"):
        removal_errors(torch.randn(3, 6), stats_of(x).without_covariance())
    with pytest.raises(ConfigError, match="groups of 4"):
        removal_errors(torch.randn(3, 6), stats_of(x), 4)
    constant = stats_of(torch.ones(20, 6))  # nothing to regress on: no error is measurable
    assert torch.equal(removal_errors(torch.randn(3, 6), constant), torch.zeros(6, dtype=torch.float64))
    dead = x.clone()
    dead[:, 2] = 0.5  # a dead feature: a singular covariance, damped; removing it costs nothing
    errors = removal_errors(torch.randn(3, 6), stats_of(dead))
    assert bool(torch.isfinite(errors).all()) and int(errors.argmin()) == 2


def test_covariance_merges_batches_exactly():
    x = correlated(301, 7)
    fs = stats_of(x, batches=4)
    torch.testing.assert_close(fs.covariance, torch.cov(x.double().T, correction=0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fs.mean, x.double().mean(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", [False, True])
@pytest.mark.parametrize("damp", [0.0, DEFAULT_DAMP, 0.5])
def test_lsq_columns_match_a_plain_ridge_regression(damp, precision):
    """Both exact forms (the kept-size solve, and through the damped precision matrix where fewer inputs
    are dropped than kept) against a plain ridge regression, for few and for many dropped inputs."""
    x = correlated(400, 12, seed=1)
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    fs = stats_of(x)
    for keep in (torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool), torch.arange(12) % 4 == 0):
        weight, bias = lsq_columns(w, fs, keep, damp, precision=precision)
        ref_w, ref_b = plain_ridge(x, w, keep, damp)
        torch.testing.assert_close(weight, ref_w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bias, ref_b, rtol=1e-5, atol=1e-5)
    assert (damp in fs._precision) == precision  # factored once, cached for the next masks


def test_reused_statistics_honour_the_damping():
    """reconstruct(stats=...) (PG's per-mask refits, the final refit after PG) uses the damping it is given."""
    from pgprune.metrics.calibration import collect_layer_stats

    model = make_model("llama")
    costs = costs_of(model)
    masks = structured_mask(costs)
    ids = random_ids(4, 16)
    stats = collect_layer_stats(model, ids, covariance=True, progress=False)
    reused = reconstruct(model, None, masks, "lsq", damp=1e9, stats=stats, costs=costs)
    walked = reconstruct(model, ids, masks, "lsq", damp=1e9, progress=False, costs=costs)
    biases = reconstruct(model, ids, masks, "bias", progress=False, costs=costs)
    for block in ("attn", "mlp"):
        torch.testing.assert_close(reused.output_bias[block], walked.output_bias[block], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reused.output_bias[block], biases.output_bias[block], rtol=1e-3, atol=1e-4)


def test_strong_damping_is_the_bias_compensation_and_no_damping_the_best_fit():
    x = correlated(400, 10, seed=3)
    w = torch.randn(4, 10, generator=torch.Generator().manual_seed(4))
    keep = torch.arange(10) % 3 != 0
    fs = stats_of(x)
    weight, bias = lsq_columns(w, fs, keep, 1e9)
    torch.testing.assert_close(weight, w[:, keep].double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias, w[:, ~keep].double() @ x.double()[:, ~keep].mean(0), rtol=1e-6, atol=1e-6)

    def err(wk, b):
        return float((x.double() @ w.double().T - x.double()[:, keep] @ wk.T - b).pow(2).mean())

    errors = [err(*lsq_columns(w, fs, keep, d)) for d in (0.0, 0.01, 1.0, 1e9)]
    assert errors == sorted(errors) and errors[0] < 0.5 * errors[-1]


def test_dead_features_and_too_few_tokens_stay_finite():
    x = correlated(6, 10, seed=5)  # 6 tokens, 7 kept inputs: the covariance is singular
    x[:, 2] = 0.0  # a dead feature
    x[:, 4] = 1.5  # a constant one
    w = torch.randn(3, 10, generator=torch.Generator().manual_seed(6))
    keep = torch.arange(10) < 7
    weight, bias = lsq_columns(w, stats_of(x, 2), keep, DEFAULT_DAMP)
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    const = torch.full((20, 4), 2.0)  # nothing varies: only the mean can be kept
    weight, bias = lsq_columns(torch.ones(2, 4), stats_of(const), torch.tensor([True, True, False, False]), 0.01)
    torch.testing.assert_close(weight, torch.ones(2, 2, dtype=torch.float64))
    torch.testing.assert_close(bias, torch.full((2,), 4.0, dtype=torch.float64))


def _lm_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


@pytest.mark.parametrize("inputs", ["dense", "sequential"])
@pytest.mark.parametrize("case", ["llama", "qwen2", "llama-bias"])
def test_masked_refit_equals_pruned_equals_reloaded(case, inputs, tmp_path):
    """Every removal path (removed attention block, removed MLP block, removed layer, partial
    layers) with least-squares refit: hooks on the unchanged model, the surgically pruned model and
    its reloaded export give the same logits (fp32, 1e-4 relative)."""
    if case not in CASES:
        pytest.skip(f"no synthetic case {case}")
    model = make_model(case)
    costs = costs_of(model)
    masks = structured_mask(costs)
    calib, test = random_ids(6, 16, seed=1), random_ids(3, 16, seed=2)
    refit = reconstruct(model, calib, masks, "lsq", inputs=inputs, progress=False)
    assert refit.input_weights["attn"] or refit.input_weights["mlp"]
    with refit_applied(model, masks, refit):
        masked = _lm_logits(model, test)
    dense = _lm_logits(model, test)
    pruned = remove_units(model, masks, output_bias=refit.output_bias, input_weights=refit.input_weights, copy=True)
    via_surgery = _lm_logits(pruned, test)
    save_pruned(pruned, None, tmp_path / "m", masks=masks)
    reloaded, _ = load_pruned(tmp_path / "m", dtype="fp32", device="cpu")
    scale = float(dense.abs().max())
    for other in (via_surgery, _lm_logits(reloaded, test)):
        assert float((masked - other).abs().max()) <= 1e-4 * scale
    assert float((masked - dense).abs().max()) > 1e-3 * scale  # something was pruned


def test_bias_mode_is_the_compensation_of_the_mean_fill():
    model = make_model("llama")
    costs = costs_of(model)
    masks = structured_mask(costs)
    calib = random_ids(6, 16, seed=1)
    refit = reconstruct(model, calib, masks, "bias", progress=False)
    from pgprune.metrics.calibration import collect_layer_stats

    means = feature_means(collect_layer_stats(model, calib, progress=False))
    for block, bias in compensation_biases(get_adapter(model), means, masks, costs).items():
        torch.testing.assert_close(refit.output_bias[block], bias)
    assert not refit.input_weights["attn"] and not refit.input_weights["mlp"]
    assert reconstruct(model, calib, masks, "none").output_bias is None


def test_lsq_lowers_the_error_on_calibration_text_below_bias():
    """Each layer's refit reproduces the dense layer better than the mean compensation on the
    calibration windows: the final hidden states of the refit model are closer to the dense ones."""
    model = make_model("llama")
    costs = costs_of(model)
    g = torch.Generator().manual_seed(3)
    masks = Masks({"head": torch.rand(costs.num_layers, costs.units_per_layer("head"), generator=g) > 0.4,
                   "channel": torch.rand(costs.num_layers, costs.units_per_layer("channel"), generator=g) > 0.4})
    calib = random_ids(16, 32, seed=4)
    dense = _lm_logits(model, calib)
    errors = {}
    for mode in ("none", "bias", "lsq"):
        refit = reconstruct(model, calib, masks, mode, progress=False)
        with refit_applied(model, masks, refit):
            errors[mode] = float((_lm_logits(model, calib) - dense).pow(2).mean())
    assert errors["lsq"] < errors["bias"] < errors["none"]


def test_sequential_refit_reads_the_model_refit_so_far():
    """With inputs='sequential', each block's refit is the plain least-squares refit on the inputs it
    sees in the model pruned and refit up to it (recorded here with hooks): o_proj of layer i after
    layers < i, down_proj of layer i after layers < i and layer i's attention block."""
    model = make_model("llama")
    a = get_adapter(model)
    costs = costs_of(model)
    g = torch.Generator().manual_seed(5)
    masks = Masks({"head": torch.rand(costs.num_layers, costs.units_per_layer("head"), generator=g) > 0.4,
                   "channel": torch.rand(costs.num_layers, costs.units_per_layer("channel"), generator=g) > 0.4})
    masks["head"][:, 0] = True
    masks["channel"][:, 0] = True
    calib = random_ids(8, 16, seed=6)
    refit = reconstruct(model, calib, masks, "lsq", inputs="sequential", progress=False)
    dense_refit = reconstruct(model, calib, masks, "lsq", inputs="dense", progress=False)
    rows = torch.arange(costs.num_layers)[:, None]
    for i in range(costs.num_layers):
        for block, kind, upto in (("attn", "head", {"head": i, "channel": i}),
                                  ("mlp", "channel", {"head": i + 1, "channel": i})):
            # what is edited before this block: rows < upto[kind] of each kind, attention blocks' refits alike
            limit = {"attn": upto["head"], "mlp": upto["channel"]}
            before = Masks({k: torch.where(rows < upto[k], v, torch.ones_like(v)) for k, v in masks.tensors.items()})
            partial = Refit(output_bias={b: torch.where(rows < limit[b], t, 0) for b, t in refit.output_bias.items()},
                            input_weights={b: {j: w for j, w in ws.items() if j < limit[b]}
                                           for b, ws in refit.input_weights.items()})
            m = a.layer(i)
            proj = m.o_proj if block == "attn" else m.down_proj
            keep = a.expand_head_mask(masks["head"][i], "o") if block == "attn" else masks["channel"][i]
            if bool(keep.all()):
                continue
            seen = []
            hook = proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
            try:
                with refit_applied(model, before, partial), torch.no_grad():
                    model(input_ids=calib, use_cache=False)
            finally:
                hook.remove()
            x = torch.cat(seen).reshape(-1, proj.in_features)
            ref_w, _ = lsq_columns(proj.weight, stats_of(x, 1), keep, DEFAULT_DAMP)
            torch.testing.assert_close(refit.input_weights[block][i].double(), ref_w, rtol=1e-3, atol=1e-4)
            if (i, block) != (0, "attn"):  # the first block sees the dense model
                assert not torch.allclose(refit.input_weights[block][i], dense_refit.input_weights[block][i])


def test_least_squares_needs_partly_pruned_projections():
    # whole attention / MLP blocks keep nothing to refit: PG scoring by least squares is refused and
    # their final refit is the mean compensation it equals there, while removed layers are regressed
    # on the previous layer's MLP inputs (so layer units keep lsq, in the loop too)
    from pgprune.config import RunSettings

    layers = {"units": "layer", "pg.init": "block-influence"}
    with pytest.raises(ConfigError, match="--pg-reconstruct bias"):
        RunSettings.from_recipe("features", {"units": "attn,mlp", "pg.init": "block-influence",
                                             "pg.reconstruct": "lsq"}).validate()
    RunSettings.from_recipe("features", {**layers, "pg.reconstruct": "lsq"}).validate()
    s = RunSettings.from_recipe("features", {**layers, "reconstruct": "lsq"})
    s.validate()
    assert s.final_reconstruct == "lsq"
    assert RunSettings.from_recipe("features", {"units": "attn,mlp", "pg.init": "block-influence"}
                                   ).final_reconstruct == "bias"
    assert RunSettings.from_recipe("features", {"units": "channel,layer"}).final_reconstruct == "lsq"


def test_bad_reconstruction_input():
    model = make_model("llama")
    costs = costs_of(model)
    masks = structured_mask(costs)
    with pytest.raises(ConfigError, match="one of none, bias, lsq"):
        reconstruct(model, random_ids(2, 8), masks, "obs")
    with pytest.raises(ConfigError, match="inputs must be one of"):
        reconstruct(model, random_ids(2, 8), masks, "lsq", inputs="shuffled")
    with pytest.raises(ConfigError, match="needs calibration windows"):
        reconstruct(model, None, masks, "lsq")
    with pytest.raises(ConfigError, match=">= 0"):
        lsq_columns(torch.ones(2, 3), stats_of(correlated(10, 3)), torch.tensor([True, False, True]), -1.0)
    # an overflowing activation (fp16 statistics) is refused, never written as NaN weights
    a = get_adapter(model)
    hook = a.layer(1).down_proj.register_forward_pre_hook(lambda _m, args: (args[0] * float("inf"),))
    try:
        with pytest.raises(DataError, match="not finite"):
            reconstruct(model, random_ids(2, 8), masks, "lsq", progress=False)
    finally:
        hook.remove()


def test_finiteness_is_scanned_once_per_update():
    fs = FeatureStats.empty(3, covariance=True)
    fs.update(correlated(10, 3))
    assert fs.is_finite() and fs._finite is True  # cached: PG's per-mask refits do not rescan
    fs.update(torch.tensor([[1.0, float("inf"), 0.0]]))
    assert fs._finite is None and not fs.is_finite()  # an update clears the verdict


def _only_layer_removed(costs, layer: int) -> Masks:
    keep = torch.ones(costs.num_layers, 1, dtype=torch.bool)
    keep[layer] = False
    return Masks({"layer": keep})


def _same_refit(a: Refit, b: Refit) -> bool:
    same_bias = all(torch.equal(a.output_bias[k], b.output_bias[k]) for k in a.output_bias)
    same_cols = all(a.input_weights[k].keys() == b.input_weights[k].keys()
                    and all(torch.equal(w, b.input_weights[k][i]) for i, w in a.input_weights[k].items())
                    for k in a.input_weights)
    return same_bias and same_cols


def test_auto_inputs_are_dense_for_whole_layers_and_sequential_otherwise():
    model = make_model("llama")
    costs = costs_of(model)
    calib = random_ids(6, 16, seed=4)
    layers = Masks({"layer": torch.tensor([[True], [False], [True], [False]] + [[True]] * (costs.num_layers - 4))})
    mixed = Masks({**layers.tensors, "channel": torch.ones(costs.num_layers, costs.units_per_layer("channel"),
                                                           dtype=torch.bool)})
    mixed["channel"][0, ::2] = False  # one kept layer loses channels: columns to refit
    for masks, want in ((layers, "dense"), (mixed, "sequential"), (structured_mask(costs), "sequential")):
        runs = {inputs: reconstruct(model, calib, masks, "lsq", inputs=inputs, progress=False)
                for inputs in ("auto", "dense", "sequential")}
        assert runs["auto"].info["inputs"] == want
        assert may_use_sequential_inputs("auto", masks.tensors) == (want == "sequential")  # the memory plan's rule
        assert _same_refit(runs["auto"], runs[want])
        other = "sequential" if want == "dense" else "dense"
        assert not _same_refit(runs["auto"], runs[other])  # the choice matters on these masks


def test_a_removed_layer_is_regressed_on_the_previous_mlp_inputs():
    """Layer 2 removed: least squares fits its update delta = h_2 - h_1 on layer 1's down_proj inputs
    (hook-recorded on the dense model, solved here as a plain ridge) and adds it to layer 1's
    down_proj; on the calibration tokens the residual stream after the gap is closer to the dense one
    than with the mean fold (bias), which is the no-regression limit."""
    model = make_model("llama")
    costs = costs_of(model)
    masks = _only_layer_removed(costs, 2)
    ids = random_ids(6, 16, seed=3)
    a = get_adapter(model)
    xs = []
    hook = a.layer(1).down_proj.register_forward_pre_hook(lambda _m, args: xs.append(args[0].detach()))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    hook.remove()
    x = torch.cat(xs).flatten(0, 1).double()
    delta = (hs[3] - hs[2]).flatten(0, 1).double()  # hidden_states[i] enters layer i
    xc, dc = x - x.mean(0), delta - delta.mean(0)
    lam = DEFAULT_DAMP * float(x.var(0, correction=0).mean())
    ref_a = torch.linalg.solve(xc.T @ xc / len(x) + lam * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ dc / len(x)).T

    refit = reconstruct(model, ids, masks, "lsq", progress=False, costs=costs)
    assert refit.info["removed_runs_regressed"] == {1: 2}
    w1 = a.layer(1).down_proj.weight.double()
    torch.testing.assert_close(refit.input_weights["mlp"][1].double() - w1, ref_a, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(refit.output_bias["mlp"][1].double(), delta.mean(0) - ref_a @ x.mean(0),
                               rtol=1e-3, atol=1e-4)

    def gap_error(r):  # what enters layer 3, pruned-and-refit against dense
        with refit_applied(model, masks, r, costs), torch.no_grad():
            got = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[3]
        return float((got - hs[3]).double().pow(2).mean())

    bias = reconstruct(model, ids, masks, "bias", progress=False, costs=costs)
    assert gap_error(refit) < gap_error(bias)
    # surgery writes layer 1's full-width refit: the pruned model computes what the hooks did
    with refit_applied(model, masks, refit, costs):
        hooked = _lm_logits(model, ids)
    pruned = remove_units(model, masks, output_bias=refit.output_bias, input_weights=refit.input_weights, copy=True)
    torch.testing.assert_close(_lm_logits(pruned, ids), hooked, rtol=1e-4, atol=1e-4)
    # sequential inputs: the same regression (it reads the dense model); nothing before the gap is pruned,
    # so layer 1's refit is exactly this one
    seq = reconstruct(model, ids, masks, "lsq", inputs="sequential", progress=False, costs=costs)
    assert seq.info["removed_runs_regressed"] == {1: 2}
    torch.testing.assert_close(seq.input_weights["mlp"][1], refit.input_weights["mlp"][1], rtol=1e-5, atol=1e-6)
    # and the removed layer's mean fold is the mean of the whole dense layer's update, as with dense inputs
    torch.testing.assert_close(seq.output_bias["mlp"][1], refit.output_bias["mlp"][1], rtol=1e-4, atol=1e-5)


def test_sequential_refit_after_a_removed_layer_reads_its_regression():
    """Sequential inputs with layer 1 removed: its regression (on layer 0's MLP inputs) joins the walk's
    stream after layer 1, so layer 2's down_proj is refit on the inputs that the exported model feeds it
    (layer 0 refit and regressed, layer 1's mean fold), recorded here with hooks and solved as a plain refit."""
    model = make_model("llama")
    a = get_adapter(model)
    costs = costs_of(model)
    g = torch.Generator().manual_seed(7)
    channels = torch.ones(costs.num_layers, costs.units_per_layer("channel"), dtype=torch.bool)
    channels[[0, 2]] = torch.rand(2, channels.shape[1], generator=g) > 0.4
    layer = torch.ones(costs.num_layers, 1, dtype=torch.bool)
    layer[1] = False
    masks = Masks({"channel": channels, "layer": layer,
                   "head": torch.ones(costs.num_layers, costs.units_per_layer("head"), dtype=torch.bool)})
    calib = random_ids(8, 16, seed=8)
    seq = reconstruct(model, calib, masks, "lsq", inputs="sequential", progress=False, costs=costs)
    assert seq.info["removed_runs_regressed"] == {0: 1}
    before = Masks({k: v.clone() for k, v in masks.tensors.items()})
    before["channel"][2:] = True
    rows = torch.arange(costs.num_layers)[:, None]
    partial = Refit(output_bias={"attn": seq.output_bias["attn"],
                                 "mlp": torch.where(rows < 2, seq.output_bias["mlp"], 0)},
                    input_weights={"attn": {}, "mlp": {0: seq.input_weights["mlp"][0]}})
    seen = []
    down = a.layer(2).down_proj
    hook = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with refit_applied(model, before, partial, costs), torch.no_grad():
            model(input_ids=calib, use_cache=False)
    finally:
        hook.remove()
    x = torch.cat(seen).reshape(-1, down.in_features)
    ref_w, _ = lsq_columns(down.weight, stats_of(x, 1), channels[2], DEFAULT_DAMP)
    torch.testing.assert_close(seq.input_weights["mlp"][2].double(), ref_w, rtol=1e-3, atol=1e-4)
    # and the exported model computes what the hooks do
    with refit_applied(model, masks, seq, costs):
        hooked = _lm_logits(model, calib)
    pruned = remove_units(model, masks, output_bias=seq.output_bias, input_weights=seq.input_weights, copy=True)
    torch.testing.assert_close(_lm_logits(pruned, calib), hooked, rtol=1e-4, atol=1e-4)


def test_sequential_refit_refuses_a_block_it_cannot_stand_in_for():
    # the block-by-block walk replaces the attention module by its refit o_proj output: a family whose
    # attention output is not o_proj's output as is (here: rescaled after it) gets one clear error
    model = make_model("llama")
    masks = structured_mask(costs_of(model))
    attn = get_adapter(model).layer(0).attn
    handle = attn.register_forward_hook(lambda _m, _a, out: (out[0] * 2,) + tuple(out[1:]))
    try:
        with pytest.raises(ConfigError, match="--reconstruct-inputs dense"):
            reconstruct(model, random_ids(4, 16, seed=1), masks, "lsq", inputs="sequential", progress=False)
        reconstruct(model, random_ids(4, 16, seed=1), masks, "lsq", inputs="dense", progress=False)
    finally:
        handle.remove()


@pytest.mark.parametrize("max_cached", [256, 1])
def test_run_regressions_for_many_masks_equal_the_walk(max_cached):
    """PG's per-mask refits with layer units (`RunRegressions`: the held residual stream, a run's
    cross-covariance on first use, the reused dense covariances' precision) give the refit that a
    dense-input walk computes for the same mask: a run of two removed layers after a kept layer with
    pruned channels (the block-inverse solve) and a run of one after a full-width layer (all inputs kept)."""
    from pgprune.metrics.calibration import collect_layer_stats
    from pgprune.reconstruction import RunRegressions

    model = synthetic_model("llama", seed=4, num_hidden_layers=6)
    costs = costs_of(model)
    ids = random_ids(6, 16, seed=5)
    g = torch.Generator().manual_seed(1)
    chans = torch.ones(6, costs.units_per_layer("channel"), dtype=torch.bool)
    chans[0] = torch.rand(chans.shape[1], generator=g) > 0.2  # fewer dropped than kept: the precision's blocks
    layer = torch.ones(6, 1, dtype=torch.bool)
    layer[[1, 2, 4]] = False
    heads = torch.ones(6, costs.units_per_layer("head"), dtype=torch.bool)
    masks = Masks({"channel": chans, "layer": layer, "head": heads})

    walked = reconstruct(model, ids, masks, "lsq", progress=False, costs=costs)
    stats = collect_layer_stats(model, ids, covariance=True, progress=False)
    runs = RunRegressions(model, ids, [st.mlp_in for st in stats], max_cached=max_cached, progress=False)
    for _ in range(2):  # the second time from the cache (or recomputed, with room for one run)
        reused = reconstruct(model, None, masks, "lsq", stats=stats, costs=costs, runs=runs)
        assert reused.info["removed_runs_regressed"] == walked.info["removed_runs_regressed"] == {0: 2, 3: 4}
        for p in (0, 3):
            torch.testing.assert_close(reused.input_weights["mlp"][p], walked.input_weights["mlp"][p],
                                       rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reused.output_bias["mlp"], walked.output_bias["mlp"], rtol=1e-4, atol=1e-5)
    assert len(runs._cross) == min(max_cached, 2)
    # without the runs, the per-mask refit keeps the mean fold (no regression)
    assert "removed_runs_regressed" not in reconstruct(model, None, masks, "lsq", stats=stats, costs=costs).info
