"""Surgery: the physically pruned model equals the gated / weight-zeroed model, has exactly the
parameters Masks predicts, and generates with a KV cache."""

from __future__ import annotations

import pytest
import torch

from pgprune.errors import ConfigError
from pgprune.gating import gated_logits
from pgprune.masks import Masks, UnitCosts
from pgprune.models.adapter import get_adapter
from pgprune.surgery import is_pruned, remove_units, pruned_view
from structure_helpers import (CASES, NUM_LAYERS, costs_of, logits, make_model, random_ids, random_mask,
                               structured_mask, zeroed_reference)


def _per_layer_kept(masks: Masks, costs: UnitCosts) -> list[int]:
    """Prunable parameters each dense layer keeps, from the costs table."""
    e = masks.effective(costs)
    per = (e["layer"] * costs.layer_fixed + e["attn"] * costs.attn_fixed + e["mlp"] * costs.mlp_fixed
           + e["head"].sum(-1) * costs.head_cost + e["channel"].sum(-1) * costs.channel_cost)
    return per.tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_equals_gated_and_counts_match(case):
    model = make_model(case)
    costs = costs_of(model)
    ids = random_ids(2, 12)
    for masks in (structured_mask(costs), random_mask(costs, seed=11)):
        want = gated_logits(model, ids, masks)
        pruned = remove_units(model, masks, copy=True)
        assert (logits(pruned, ids) - want).abs().max() <= 1e-4
        assert (logits(zeroed_reference(model, masks), ids) - want).abs().max() <= 1e-4

        # exact parameter accounting: per kept layer and in total
        kept = _per_layer_kept(masks, costs)
        adapter = get_adapter(pruned)
        sources = [ls["source_layer"] for ls in pruned.config.pgprune["layers"]]
        assert sources == [i for i in range(NUM_LAYERS) if kept[i] > 0]
        for i, src in enumerate(sources):
            assert adapter.layer_params(i) == kept[src]
        total = sum(p.numel() for p in pruned.parameters())
        assert total == int(masks.kept_prunable_params(costs)) + costs.outside_params
        assert pruned.config.num_hidden_layers == len(sources)


@pytest.mark.parametrize("case", ["llama", "mistral", "qwen2", "qwen3", "llama-mha"])
def test_generation_with_cache_equals_without(case):
    model = make_model(case)
    pruned = remove_units(model, structured_mask(costs_of(model)))  # layer 0 has no attention left
    assert pruned.config.pgprune["layers"][0]["num_key_value_heads"] == 0
    prompt = random_ids(2, 7, seed=3)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = pruned.generate(prompt, use_cache=True, **kw)
        uncached = pruned.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("case", ["llama", "qwen2", "llama-bias"])
def test_all_ones_prune_is_exact(case):
    model = make_model(case)
    ids = random_ids(2, 10)
    dense = logits(model, ids)
    pruned = remove_units(model, Masks.full(costs_of(model), ["head", "channel", "layer"]), copy=True)
    assert torch.equal(logits(pruned, ids), dense)
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in model.parameters())
    assert not is_pruned(model) and is_pruned(pruned)  # copy=True left the input alone


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_bias_compensation(case):
    model = make_model(case)
    costs = costs_of(model)
    masks = structured_mask(costs)
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(7)
    bias = {"attn": torch.randn(NUM_LAYERS, hidden, generator=g), "mlp": torch.randn(NUM_LAYERS, hidden, generator=g)}
    bias["attn"][2] = 0  # layer 2 is removed: its vectors must be zero
    bias["mlp"][2] = 0
    bias["mlp"][1] = 0  # an all-zero vector adds nothing
    ids = random_ids(2, 10)
    want = logits(zeroed_reference(model, masks, output_bias=bias), ids)
    pruned = remove_units(model, masks, output_bias=bias, copy=True)
    assert (logits(pruned, ids) - want).abs().max() <= 1e-4
    layers = pruned.config.pgprune["layers"]
    # kept layers 0, 1, 3: layer 0 lost attention (constant), layer 3 lost its MLP (constant)
    assert [ls["attn_output_bias"] for ls in layers] == [True, False, False]
    assert [ls["o_proj_bias"] for ls in layers] == [False, True, True]
    assert [ls["mlp_output_bias"] for ls in layers] == [False, False, True]
    assert [ls["down_proj_bias"] for ls in layers] == [True, False, False]
    added = 5 * hidden  # non-zero vectors on kept layers: attn of 0, 1, 3 and mlp of 0, 3
    assert sum(p.numel() for p in pruned.parameters()) == \
        int(masks.kept_prunable_params(costs)) + costs.outside_params + added

    # pruned_view: the same function, the source model untouched (it shares the unsliced tensors)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    view = pruned_view(model, masks, output_bias=bias)
    assert (logits(view, ids) - want).abs().max() <= 1e-4
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not is_pruned(model)
    assert view.model.embed_tokens.weight is model.model.embed_tokens.weight  # shared, not copied

    bad = {"attn": torch.ones(NUM_LAYERS, hidden)}
    with pytest.raises(ConfigError, match="layer 2 is removed"):
        remove_units(model, masks, output_bias=bad, copy=True)
    with pytest.raises(ConfigError, match="shape"):
        remove_units(model, masks, output_bias={"attn": torch.ones(2, hidden)}, copy=True)


def test_pruning_twice_composes():
    model = make_model("llama")
    costs = costs_of(model)
    ids = random_ids(2, 10)
    once = remove_units(model, structured_mask(costs), copy=True)
    costs1 = costs_of(once)
    second = Masks({"channel": torch.rand(costs1.num_layers, costs1.units_per_layer("channel"),
                                          generator=torch.Generator().manual_seed(1)) > 0.3,
                    "layer": torch.tensor([[True], [False], [True]])})
    want = gated_logits(once, ids, second)
    twice = remove_units(once, second, copy=True)
    assert (logits(twice, ids) - want).abs().max() <= 1e-4
    spec = twice.config.pgprune
    assert [ls["source_layer"] for ls in spec["layers"]] == [0, 3]
    assert spec["removed_layers"] == [1, 2]
    assert spec["dense"]["prunable_params"] == costs.prunable_params


def test_bad_masks_raise():
    model = make_model("llama")
    costs = costs_of(model)
    with pytest.raises(ConfigError, match="one mask"):
        remove_units(model, Masks.stack([structured_mask(costs)] * 2), copy=True)
    none = Masks({"layer": torch.zeros(NUM_LAYERS, 1, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="every decoder layer"):
        remove_units(model, none, copy=True)


def test_adapter_owns_the_kv_group_layout():
    """Group j owns q rows / o columns [j*g*d, (j+1)*g*d) and k / v rows [j*d, (j+1)*d) (repeat_kv)."""
    adapter = get_adapter(make_model("llama"))  # 4 query heads, 2 KV heads, head_dim 16
    g, d = adapter.queries_per_kv, adapter.head_dim
    assert (g, d) == (2, 16)
    groups = torch.tensor([1])
    assert adapter.head_group_indices(groups, "q").tolist() == list(range(32, 64))
    assert adapter.head_group_indices(groups, "o").tolist() == list(range(32, 64))
    assert adapter.head_group_indices(groups, "k").tolist() == list(range(16, 32))
    assert adapter.head_group_indices(torch.tensor([1, 0]), "v").tolist() == list(range(16, 32)) + list(range(16))
    keep = torch.tensor([[True, False], [False, True]])
    cols = adapter.expand_head_mask(keep, "o")
    assert cols.shape == (2, 64) and cols[0, :32].all() and not cols[0, 32:].any() and cols[1, 32:].all()
    x = torch.arange(64, dtype=torch.float64)
    assert adapter.reduce_head_groups(x, "o").tolist() == [sum(range(32)), sum(range(32, 64))]
    assert adapter.reduce_head_groups(x, "o", mean=True).tolist() == [15.5, 47.5]
    assert adapter.head_group_cost(0) == (2 * g + 2) * d * adapter.hidden_size
