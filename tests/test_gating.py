"""Gated forward: masks applied through hooks equal the plain weight-zeroing definition of pruning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pgprune.errors import ConfigError
from pgprune.gating import FORWARDS, gated, gated_logits, gathered_losses, masked_losses
from pgprune.masks import Masks
from pgprune.reconstruction import compensation_biases
from pgprune.models.adapter import get_adapter
from pgprune.surgery import remove_units
from structure_helpers import (CASES, costs_of, logits, make_model, random_ids, random_mask, structured_mask,
                               zeroed_reference)


@pytest.mark.parametrize("case", list(CASES))
def test_gated_equals_zeroed_weights(case):
    model = make_model(case)
    costs = costs_of(model)
    ids = random_ids(2, 12)
    for masks in (structured_mask(costs), random_mask(costs, seed=3)):
        want = logits(zeroed_reference(model, masks), ids)
        got = gated_logits(model, ids, masks)
        assert (got - want).abs().max() <= 1e-4
        assert (got - logits(model, ids)).abs().max() > 1e-2  # the mask really changes the model


@pytest.mark.parametrize("case", ["llama", "qwen2", "llama-bias"])
def test_all_ones_mask_is_exact(case):
    model = make_model(case)
    costs = costs_of(model)
    ids = random_ids(2, 12)
    dense = logits(model, ids)
    full = Masks.full(costs, ["head", "channel", "attn", "mlp", "layer"])
    assert torch.equal(gated_logits(model, ids, full), dense)
    stacked = Masks.full(costs, ["head", "channel"], batch=2)
    assert torch.equal(gated_logits(model, ids.repeat(2, 1), stacked), dense.repeat(2, 1, 1))


@pytest.mark.parametrize("case", ["llama", "qwen3", "llama-bias"])
def test_k_masks_in_one_batch_equal_separate_forwards(case):
    model = make_model(case)
    costs = costs_of(model)
    k, b = 3, 2
    masks = [structured_mask(costs, seed=1), random_mask(costs, seed=5), random_mask(costs, seed=6, p_keep=0.8)]
    ids = random_ids(k * b, 10, seed=2)  # different rows for every mask
    batched = gated_logits(model, ids, Masks.stack(masks))
    for j, mk in enumerate(masks):
        single = gated_logits(model, ids[j * b:(j + 1) * b], mk)
        assert (batched[j * b:(j + 1) * b] - single).abs().max() <= 1e-5


@pytest.mark.parametrize("case", ["llama", "mistral", "qwen2"])
def test_masked_losses_match_plain_cross_entropy(case):
    model = make_model(case)
    costs = costs_of(model)
    masks = [structured_mask(costs), random_mask(costs, seed=9)]
    ids = random_ids(3, 12, seed=4)
    got = masked_losses(model, ids, Masks.stack(masks))
    assert got.dtype == torch.float32 and got.shape == (2,)
    for j, mk in enumerate(masks):
        lg = logits(zeroed_reference(model, mk), ids)
        want = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]).float(), ids[:, 1:].reshape(-1))
        assert abs(float(got[j]) - float(want)) <= 1e-5
    # one unstacked mask gives a [1] result; a dense mask gives the model's own loss
    with torch.no_grad():
        dense_loss = model(input_ids=ids, labels=ids).loss
    one = masked_losses(model, ids, Masks.full(costs, ["head"]))
    assert one.shape == (1,) and abs(float(one[0]) - float(dense_loss)) <= 1e-5


@pytest.mark.parametrize("case", ["llama", "qwen3", "llama-bias"])
def test_gathered_losses_equal_gated_losses(case):
    model = make_model(case)
    costs = costs_of(model)
    masks = Masks.stack([structured_mask(costs), random_mask(costs, seed=9), random_mask(costs, seed=2, p_keep=0.8)])
    ids = random_ids(3, 12, seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = gathered_losses(model, ids, masks)
    assert got.shape == (3,)
    assert torch.allclose(got, masked_losses(model, ids, masks), atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # source untouched
    assert FORWARDS["gated"] is masked_losses and FORWARDS["gathered"] is gathered_losses


def _random_fill(model, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    adapter = get_adapter(model)
    return {block: [torch.randn(getattr(adapter.layer(i), proj).in_features, generator=g, dtype=torch.float64)
                    for i in range(adapter.num_layers)]
            for block, proj in (("attn", "o_proj"), ("mlp", "down_proj"))}


def _plain_compensation(model, masks: Masks, fill: dict) -> dict:
    """W[:, dropped] @ mean[dropped] per layer, the dropped columns read off the plain zeroed
    reference (whatever it zeroed is what was removed); a removed layer's two vectors go to the MLP
    of the last kept layer before it (none: dropped). The random weights are never exactly zero."""
    ref = zeroed_reference(model, masks)
    a, r = get_adapter(model), get_adapter(ref)
    bias = {"attn": torch.zeros(a.num_layers, a.hidden_size), "mlp": torch.zeros(a.num_layers, a.hidden_size)}
    last_kept = None
    for i in range(a.num_layers):
        # removed: the layer mask drops it, or both its blocks are gone (nothing left in the reference)
        removed_layer = all(not bool(getattr(r.layer(i), p).weight.any()) for p in ("o_proj", "down_proj"))
        for block, proj in (("attn", "o_proj"), ("mlp", "down_proj")):
            w, w_ref = getattr(a.layer(i), proj).weight, getattr(r.layer(i), proj).weight
            vec = ((w - w_ref).double() @ fill[block][i]).float()
            if not removed_layer:
                bias[block][i] += vec
            elif last_kept is not None:
                bias["mlp"][last_kept] += vec
        last_kept = last_kept if removed_layer else i
    return bias


@pytest.mark.parametrize("case", ["llama", "qwen3", "llama-bias"])
def test_mean_fill_equals_compensated_pruning(case):
    model = make_model(case)
    costs = costs_of(model)
    adapter = get_adapter(model)
    fill = _random_fill(model)
    ids = random_ids(2, 12)
    masks = [structured_mask(costs), random_mask(costs, seed=3), random_mask(costs, seed=8, p_keep=0.8)]
    for mk in masks:
        bias = _plain_compensation(model, mk, fill)
        want = logits(zeroed_reference(model, mk, output_bias=bias), ids)
        got = gated_logits(model, ids, mk, fill=fill)
        assert (got - want).abs().max() <= 1e-4
        assert (got - gated_logits(model, ids, mk)).abs().max() > 1e-2  # the fill really changes the model
        comp = compensation_biases(adapter, fill, mk, costs)
        assert all(torch.allclose(comp[b], bias[b], atol=1e-5) for b in bias)
        pruned = remove_units(model, mk, output_bias=comp, copy=True)
        assert (logits(pruned, ids) - want).abs().max() <= 1e-4
    # K masks in one batch, and the gathered forward, agree with one mask at a time
    stack = Masks.stack(masks)
    batched = masked_losses(model, ids, stack, fill=fill)
    single = torch.cat([masked_losses(model, ids, mk, fill=fill) for mk in masks])
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(gathered_losses(model, ids, stack, fill=fill), batched, atol=1e-5)
    # all kept: no hook, the dense model bit for bit
    full = Masks.full(costs, ["head", "channel", "attn", "mlp", "layer"])
    assert torch.equal(gated_logits(model, ids, full, fill=fill), logits(model, ids))


def test_hooks_removed_on_exit_and_on_error():
    model = make_model("llama")
    costs = costs_of(model)
    ids = random_ids(2, 8)
    dense = logits(model, ids)
    adapter = get_adapter(model)

    def hook_count():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    with pytest.raises(RuntimeError, match="boom"):
        with gated(model, structured_mask(costs)):
            assert hook_count() > 0
            raise RuntimeError("boom")
    assert hook_count() == 0
    assert torch.equal(logits(model, ids), dense)
    assert adapter.layer(0).o_proj.weight.requires_grad  # weights untouched


def test_inference_mode_and_bf16():
    model = make_model("qwen2", dtype=torch.bfloat16)
    costs = costs_of(model)
    ids = random_ids(2, 8)
    masks = structured_mask(costs)
    with torch.inference_mode():
        got = gated_logits(model, ids, masks)
        losses = masked_losses(model, ids, Masks.stack([masks, masks]))
    assert got.dtype == torch.bfloat16
    want = logits(zeroed_reference(model, masks), ids)
    assert (got.float() - want.float()).abs().max() <= 0.1 * want.float().abs().max()
    assert losses.dtype == torch.float32 and abs(float(losses[0]) - float(losses[1])) <= 1e-6


def test_bad_inputs_raise_config_errors():
    model = make_model("llama")
    costs = costs_of(model)
    stacked = Masks.stack([structured_mask(costs), structured_mask(costs)])
    with pytest.raises(ConfigError, match="K\\*B"):
        gated_logits(model, random_ids(3, 8), stacked)
    wrong = Masks({"head": torch.ones(costs.num_layers + 1, 2, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="another model"):
        gated_logits(model, random_ids(2, 8), wrong)
    with pytest.raises(ConfigError, match="T >= 2"):
        masked_losses(model, random_ids(2, 1), stacked)
