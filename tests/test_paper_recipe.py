"""`--recipe paper` behaves like the authors' reference code (docs/method.md lists every difference):
per-layer start, per-kind unit-count projection shifted down only, per-kind hard mask, the moving
average baseline that includes the current step, and calibration windows each seen once."""

from __future__ import annotations

import json

import pytest
import torch

from pgprune.budget import per_kind_hard_mask, present_units, project
from pgprune.config import PGSettings
from pgprune.masks import UnitCosts
from pgprune.models.adapter import get_adapter
from pgprune.models.synthetic import synthetic_model
from pgprune.policy.estimators import BaselineState, paper_estimator
from pgprune.policy.initial_probabilities import per_layer_probabilities
from pgprune.policy.loop import run_policy_gradient
from pgprune.policy.probabilities import UnitLayout, UnitPolicy
from pgprune.pruning import prune

from conftest import char_tokenizer, run_settings

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(**sizes):
    model = synthetic_model("llama", seed=0, **sizes)
    costs = UnitCosts.from_adapter(get_adapter(model))
    return model, costs, UnitLayout.build(costs, ("channel", "head"))


def test_per_layer_start_keeps_each_layers_order_and_mean():
    _, costs, layout = _setup(num_hidden_layers=3, intermediate_size=32)
    gen = torch.Generator().manual_seed(0)
    raw = {k: torch.rand(costs.num_layers, costs.units_per_layer(k), generator=gen, dtype=torch.float64) * (i + 1)
           for i, k in enumerate(layout.kinds)}
    probs = per_layer_probabilities(raw, costs, keep=0.6)
    for kind, p in probs.items():
        for i in range(costs.num_layers):
            x, q = raw[kind][i], p[i].double()
            assert float(q.mean()) == pytest.approx(0.6, abs=1e-6)  # nothing clamps at this spread
            assert torch.equal(torch.argsort(x), torch.argsort(q))  # the layer's own order


def test_reference_projection_shifts_down_per_kind_and_never_up():
    _, costs, layout = _setup(num_hidden_layers=2, intermediate_size=32)
    gen = torch.Generator().manual_seed(1)
    high = torch.rand(layout.size, generator=gen) * 0.5 + 0.5
    out = layout.split(project(high, layout, costs, 0.4, "reference"))
    for kind in layout.kinds:  # each kind keeps 40 % of its unit count in expectation
        n = int(present_units(costs, kind).sum())
        assert float(out[kind].double().sum()) == pytest.approx(0.4 * n, rel=1e-6)
    low = torch.full((layout.size,), 0.1)
    assert torch.equal(project(low, layout, costs, 0.4, "reference"), low * layout.present)  # under budget: unchanged
    assert float(project(low, layout, costs, 0.4, "uniform").sum()) > float(low.sum())  # ours shifts up


def test_per_kind_hard_mask_removes_each_kinds_share_ties_kept():
    _, costs, layout = _setup(num_hidden_layers=2, intermediate_size=8)
    probs = {"channel": torch.arange(16, dtype=torch.float64).reshape(2, 8) / 16,
             "head": torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.1, 0.9]], dtype=torch.float64)}
    probs["head"] = probs["head"][:, : costs.units_per_layer("head")]
    masks = per_kind_hard_mask(probs, costs, 0.25)
    assert int((~masks["channel"]).sum()) == 4 and not masks["channel"][0, :4].any()
    n_heads = int(present_units(costs, "head").sum())
    removed_heads = int((~masks["head"] & present_units(costs, "head")).sum())
    assert removed_heads <= int(n_heads * 0.25)  # ties with the threshold stay


def test_ema_baseline_includes_the_current_step():
    b = BaselineState(window=5, mode="ema")
    m, s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0.5, 0.5])
    _, first = paper_estimator(m, s, torch.tensor([2.0, 4.0]), b)
    assert first == pytest.approx(3.0)
    _, second = paper_estimator(m, s, torch.tensor([6.0, 8.0]), b)
    assert second == pytest.approx(0.8 * 3.0 + 0.2 * 7.0)
    again = BaselineState.from_state(b.state_dict())
    assert again.value(1.0) == b.value(1.0)
    previous = BaselineState(window=5)  # pgprune's: the earlier steps only
    paper_estimator(m, s, torch.tensor([2.0, 4.0]), previous)
    assert paper_estimator(m, s, torch.tensor([6.0, 8.0]), previous)[1] == pytest.approx(3.0)


def test_streamed_batches_use_every_window_once():
    model, costs, layout = _setup(num_hidden_layers=2, intermediate_size=16)
    pool = torch.arange(24 * 4).reshape(24, 4) % 128
    seen = []

    def loss_fn(model, batch, masks, costs=None):
        seen.append(batch[:, 0].tolist())
        return torch.rand(masks["channel"].shape[0])

    pg = PGSettings(policy="units", steps=6, batch_size=4, batches="stream", lr=0.01)
    run_policy_gradient(model, pool, UnitPolicy(layout.present.float() * 0.7, layout, costs, 0.3), pg,
                        loss_fn=loss_fn, progress=False)
    assert sorted(x for batch in seen for x in batch) == sorted(pool[:, 0].tolist())
    with pytest.raises(Exception, match="each window once"):
        run_policy_gradient(model, pool[:20], UnitPolicy(layout.present.float() * 0.7, layout, costs, 0.3), pg,
                            loss_fn=loss_fn, progress=False)


def test_paper_recipe_end_to_end(tmp_path):
    synthetic_model("qwen2", seed=3).save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("Structured pruning removes whole channels, heads and layers of a network. " * 60)
    from pgprune.config import RunSettings

    settings = RunSettings.from_recipe("paper", {
        "model": str(tmp_path / "model"), "sparsity": 0.25, "data.calib": f"text:{text}",
        "eval.datasets": f"text:{text}", "data.seqlen": 32, "eval.seqlen": 32, "eval.max_tokens": None,
        "eval.track_max_tokens": 10**6, "pg.steps": 4, "pg.eval_every": 2, "pg.batch_size": 4,
        "execution.dtype": "fp32", "execution.device": "cpu"})
    settings.validate()
    record = prune(settings, tmp_path / "run", progress=False)
    name = f"text:{text}"
    ppl = record["perplexity"]
    assert ppl["pruned"][name] == pytest.approx(ppl["gated"][name], rel=1e-4)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["hard_ppl"] == pytest.approx(ppl["init"][name], rel=1e-6)  # the start is the per-kind mask
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["settings"]["pg"]["batches"] == "stream" and run["settings"]["recipe"] == "paper"
    # each kind removes its own share of units (the reference's budget), not one shared parameter budget
    summary = run["masks"]
    heads, channels = sum(summary["kv_heads_per_layer"]), sum(summary["channels_per_layer"])
    dense = run["model"]
    assert channels == pytest.approx(0.75 * dense["intermediate_size"] * dense["num_layers"], abs=1)
    assert heads >= int(0.75 * dense["num_kv_heads"] * dense["num_layers"])


def test_units_policy_settings_of_the_earlier_defaults_still_validate():
    run_settings(method="pg").validate()
