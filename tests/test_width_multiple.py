"""--width-multiple: every kept MLP width a multiple of N, the rounding chosen by the scores.

References: brute force over every up/down choice of the layers that need rounding, and the
explicit boundary units of each layer."""

from __future__ import annotations

import itertools

import pytest
import torch

from pgprune.budget import check_width_multiple, hard_mask, round_widths
from pgprune.errors import ConfigError
from pgprune.masks import Masks, UnitCosts
from pgprune.metrics import allocate, compute_scores, run_metric
from pgprune.models.adapter import get_adapter
from pgprune.models.synthetic import synthetic_model

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
             intermediate_size=64, num_hidden_layers=6)


def make(**over):
    return synthetic_model("llama", seed=0, **{**SIZES, **over})


def costs_of(model):
    return UnitCosts.from_adapter(get_adapter(model))


def random_keys(costs, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"channel": torch.randn(costs.num_layers, costs.units_per_layer("channel"), generator=g, dtype=torch.float64),
            "head": torch.randn(costs.num_layers, costs.units_per_layer("head"), generator=g, dtype=torch.float64)}


def kept_channels(masks, costs):
    return masks.effective(costs)["channel"].sum(-1)


@pytest.mark.parametrize("n", [4, 8, 16])
@pytest.mark.parametrize("sparsity", [0.2, 0.35, 0.5])
def test_rounding_keeps_multiples_meets_the_budget_and_moves_the_boundary_units(n, sparsity):
    costs = costs_of(make())
    keys = random_keys(costs, seed=n)
    base = hard_mask(keys, costs, sparsity)  # a global top-k: uneven widths per layer
    rounded, info = round_widths(base, keys, costs, n, sparsity)
    before, after = kept_channels(base, costs), kept_channels(rounded, costs)
    assert info.before == before.tolist() and info.after == after.tolist()
    assert all(int(w) % n == 0 for w in after)  # the multiples hold
    assert all(abs(int(a) - int(b)) < n for a, b in zip(after, before))  # each layer moves by less than N
    assert torch.equal(rounded["head"], base["head"])  # heads are not rounded
    # the budget: the closest over every combination of rounding each layer up or down
    partial = [i for i, k in enumerate(before.tolist()) if k % n]
    assert sorted(info.rounded_up + info.rounded_down) == partial
    chan_cost = int(costs.channel_cost[0])
    best = min(abs(base.sparsity(costs) * costs.prunable_params
                   - chan_cost * sum((n - k % n) if up else -(k % n) for k, up in zip([int(before[i]) for i in partial], ups))
                   - sparsity * costs.prunable_params)
               for ups in itertools.product([False, True], repeat=len(partial)))
    got = abs(info.sparsity - sparsity) * costs.prunable_params
    assert got <= best + 1e-6
    assert got <= n * chan_cost / 2 + 1e-6 or not partial  # within half a multiple of the target
    assert info.sparsity == pytest.approx(rounded.sparsity(costs))
    # the units that moved are each layer's boundary units by score
    k = keys["channel"]
    chunk_means = {}
    for i in partial:
        was, now = base["channel"][i], rounded["channel"][i]
        r = int(before[i]) % n
        kept_keys, removed_keys = k[i][was].sort().values, k[i][~was].sort().values
        if i in info.rounded_down:
            dropped = was & ~now
            assert int(dropped.sum()) == r and not (~was & now).any()
            assert torch.equal(k[i][dropped].sort().values, kept_keys[:r])  # the r least important kept
            chunk = torch.cat([kept_keys[:r], removed_keys[removed_keys.numel() - (n - r):]])
        else:
            added = ~was & now
            assert int(added.sum()) == n - r and not (was & ~now).any()
            assert torch.equal(k[i][added].sort().values, removed_keys[removed_keys.numel() - (n - r):])
            chunk = torch.cat([kept_keys[:r], k[i][added]])
        chunk_means[i] = float(chunk.mean())
    # layers that went up had better boundary chunks than layers that went down
    if info.rounded_up and info.rounded_down:
        assert min(chunk_means[i] for i in info.rounded_up) >= max(chunk_means[i] for i in info.rounded_down)


def test_multiple_one_and_exact_multiples_change_nothing():
    costs = costs_of(make())
    keys = random_keys(costs)
    base = hard_mask(keys, costs, 0.3)
    assert round_widths(base, keys, costs, 1, 0.3)[0] is base
    even = Masks({"channel": torch.arange(64)[None, :].expand(6, 64) < 48})
    out, info = round_widths(even, keys, costs, 16, 0.3)
    assert torch.equal(out["channel"], even["channel"]) and info.rounded_up == info.rounded_down == []


@pytest.mark.parametrize("method,allocation", [("wanda-sp", "uniform"), ("flap", "global"), ("magnitude", "uniform")])
def test_metric_masks_round_by_the_methods_own_scores(method, allocation):
    model = make()
    costs = costs_of(model)
    x = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(0))
    plain = run_metric(model, x, method, 0.3, ("channel", "head"), allocation, progress=False)
    r = run_metric(model, x, method, 0.3, ("channel", "head"), allocation, progress=False, width_multiple=16)
    widths = kept_channels(r.masks, costs)
    assert all(int(w) % 16 == 0 for w in widths)
    assert torch.equal(r.allocation.masks["channel"], plain.masks["channel"])  # PG starts from the unrounded one
    want, _ = round_widths(plain.masks, plain.allocation.keys, costs, 16, 0.3)
    assert torch.equal(r.masks["channel"], want["channel"])
    assert r.info["width_multiple"] == 16 and r.info["sparsity"] == pytest.approx(r.masks.sparsity(costs))
    assert abs(r.info["sparsity"] - 0.3) <= 16 * int(costs.channel_cost[0]) / costs.prunable_params
    if method == "flap":  # the compensation covers the rounded mask's removed channels
        assert r.output_bias["mlp"].abs().sum() > 0


@pytest.mark.parametrize("method,allocation", [("obs", "uniform"), ("flap", "global")])
def test_layers_first_masks_round_the_kept_layers(method, allocation):
    """--remove-layers with --width-multiple: the layers removed first stay removed, every kept layer's MLP width
    is rounded by the method's scores, as round_widths does to the unrounded allocation; re-allocating for
    another count (--remove-layers auto) rounds the same way."""
    from pgprune.metrics.pipeline import remove_layers_first

    model = make()
    costs = costs_of(model)
    x = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(0))
    kinds = ("channel", "head", "layer")
    plain = run_metric(model, x, method, 0.4, kinds, allocation, progress=False, remove_layers=1)
    r = run_metric(model, x, method, 0.4, kinds, allocation, progress=False, remove_layers=1, width_multiple=16,
                   bias_compensation=False)
    assert torch.equal(r.masks["layer"], plain.masks["layer"]) and int((~r.masks["layer"]).sum()) == 1
    assert all(int(w) % 16 == 0 for w in kept_channels(r.masks, costs))
    want, _ = round_widths(plain.masks, plain.allocation.keys, costs, 16, 0.4)
    assert torch.equal(r.masks["channel"], want["channel"]) and r.info["width_rounding"] is not None
    assert abs(r.info["sparsity"] - 0.4) <= 16 * int(costs.channel_cost[0]) / costs.prunable_params
    for n in (0, 2):
        moved = remove_layers_first(r, n, costs)
        fresh = run_metric(model, x, method, 0.4, kinds, allocation, progress=False, remove_layers=n,
                           width_multiple=16)
        assert all(torch.equal(moved.masks[k], fresh.masks[k]) for k in kinds)
        assert moved.info["width_rounding"] == fresh.info["width_rounding"]


def test_policy_hard_masks_are_rounded():
    from pgprune.policy.probabilities import UnitLayout, UnitPolicy

    costs = costs_of(make())
    layout = UnitLayout.build(costs, ("channel", "head"))
    g = torch.Generator().manual_seed(1)
    s0 = torch.rand(layout.size, generator=g) * layout.present
    for projection in ("cost", "reference"):
        policy = UnitPolicy(s0, layout, costs, 0.4, projection=projection, per_kind_budget=projection == "reference")
        plain = policy.hard_mask()
        policy.width_multiple = 16
        m = policy.hard_mask()
        assert all(int(w) % 16 == 0 for w in kept_channels(m, costs))
        probs = layout.split(policy.probs().double())
        assert torch.equal(m["channel"], round_widths(plain, probs, costs, 16, 0.4)[0]["channel"])


def test_bad_multiples_are_clear_errors():
    costs = costs_of(make())
    for bad in (0, -32, 2.5, "x"):
        with pytest.raises(ConfigError, match="whole number >= 1"):
            check_width_multiple(bad)
    with pytest.raises(ConfigError, match="does not divide the model's MLP widths"):
        check_width_multiple(24, costs)
    keys = random_keys(costs)
    with pytest.raises(ConfigError, match="larger than the MLP width some layers keep"):
        round_widths(hard_mask(keys, costs, 0.3), keys, costs, 64, 0.3)
    model = make()
    x = torch.randint(0, 128, (4, 8))
    with pytest.raises(ConfigError, match="larger than the MLP width"):  # refused before calibrating
        run_metric(model, x, "wanda-sp", 0.3, ("channel",), "uniform", progress=False, width_multiple=64)
    from pgprune.config import RunSettings

    with pytest.raises(ConfigError, match="--width-multiple"):
        RunSettings.from_recipe("features", {"width_multiple": 0}).validate()


def test_allocate_scores_are_standardised_keys():
    # round_widths compares layers by the allocation's keys: standardised per kind, so a uniform
    # allocation's within-layer order (raw) and the rounding's order agree
    model = make()
    costs = costs_of(model)
    scores = compute_scores(model, None, "magnitude", ("channel",))
    alloc = allocate(scores, costs, 0.3, "uniform")
    for i in range(costs.num_layers):
        raw, std = scores.raw["channel"][i], alloc.keys["channel"][i]
        assert torch.equal(torch.argsort(raw, stable=True), torch.argsort(std, stable=True))


# --- end to end: prune (metric and PG) and apply ------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from conftest import tiny_workdir

    return tiny_workdir(tmp_path_factory, "width")  # MLP width 96


def _settings(root, text, **kw):
    from conftest import tiny_run_settings

    return tiny_run_settings(root, text, **{"sparsity": 0.3, "width_multiple": 16, "forward": "auto", **kw})


@pytest.mark.parametrize("method, layers_first", [("pg", False), ("flap", False), ("pg", True)])
def test_prune_exports_widths_that_are_multiples(workdir, method, layers_first, tmp_path):
    # with --remove-layers the search keeps the removed layer and rounds the kept layers' widths
    from pgprune.pruning import prune

    root, text = workdir
    extra = dict(units="channel,head,layer", remove_layers=1, sparsity=0.5, policy="search", sigma=0.3, init="flap",
                 steps=2) if layers_first else {"policy": "features" if method == "pg" else "units"}
    record = prune(_settings(root, text, method=method, reconstruct="bias",
                             pg_reconstruct="bias" if method == "pg" else "none", init_scale=8.0, **extra),
                   tmp_path / "run", progress=False)
    widths = record["masks"]["channels_per_layer"]
    assert all(w % 16 == 0 for w in widths) and len(set(widths)) >= 1
    if layers_first:
        assert record["masks"]["layers_kept"] == 2 and widths.count(0) == 1
    target = 0.5 if layers_first else 0.3
    assert abs(record["masks"]["sparsity"] - target) <= 16 * 64 * 3 / record["masks"]["prunable_params"]
    from pgprune.export import inspect_model

    summary = inspect_model(str(tmp_path / "run" / "model"))
    assert all(layer["channels"] % 16 == 0 for layer in summary["layers"])


def test_prune_refuses_a_multiple_that_does_not_fit_before_any_data_pass(workdir, tmp_path, monkeypatch):
    import pgprune.pruning as pruning

    root, text = workdir
    monkeypatch.setattr(pruning, "get_calibration_windows", lambda *a, **k: pytest.fail("calibrated"))
    with pytest.raises(ConfigError, match="does not divide"):
        pruning.prune(_settings(root, text, method="wanda-sp", width_multiple=64), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="larger than the MLP width"):
        pruning.prune(_settings(root, text, method="wanda-sp", width_multiple=96, sparsity=0.5), tmp_path / "b",
                      progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_apply_rounds_a_mask_file(workdir, tmp_path, capsys):
    from pgprune.cli import main
    from pgprune.export import inspect_model

    root, text = workdir
    costs = costs_of(synthetic_model("qwen2", seed=3))
    keys = random_keys(costs)
    masks = hard_mask(keys, costs, 0.3)
    assert any(int(w) % 16 for w in kept_channels(masks, costs))
    masks.save(tmp_path / "masks.safetensors")
    out = tmp_path / "pruned"
    rc = main(["apply", str(root / "model"), "--masks", str(tmp_path / "masks.safetensors"), "--out", str(out),
               "--dtype", "fp32", "--width-multiple", "16"])
    assert rc == 0, capsys.readouterr().err
    assert all(layer["channels"] % 16 == 0 for layer in inspect_model(str(out))["layers"])
    for bad, match in (("0", "whole number >= 1"), ("64", "does not divide")):
        rc = main(["apply", str(root / "model"), "--masks", str(tmp_path / "masks.safetensors"), "--out",
                   str(tmp_path / f"bad{bad}"), "--dtype", "fp32", "--width-multiple", bad])
        err = capsys.readouterr().err
        assert rc == 1 and match in err and "Traceback" not in err and not (tmp_path / f"bad{bad}").exists()
