"""Models dispatched with an accelerate device_map, some layers offloaded to disk.

Offloaded layers keep their weights on the meta device and accelerate's hooks bring them in for
each call, so anything that reads a module's device from its weights breaks there. This is the
multi-device code path that one CPU can exercise: the results must equal the plain model's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pgprune.evaluate.perplexity import perplexity_of_tokens
from pgprune.gating import gated_logits, masked_losses
from pgprune.masks import Masks
from pgprune.metrics.pipeline import run_metric
from structure_helpers import costs_of, make_model, random_ids, random_mask, structured_mask

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plain_and_offloaded(tmp_path_factory):
    pytest.importorskip("accelerate")
    model = make_model("llama-bias")
    folder = tmp_path_factory.mktemp("device_map")
    model.save_pretrained(folder)
    device_map = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "disk"}
    device_map.update({f"model.layers.{i}": "disk" if i % 2 else "cpu"
                       for i in range(model.config.num_hidden_layers)})
    offloaded = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, dtype=torch.float32,
                                                     offload_folder=str(folder / "offload"))
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # really offloaded
    return model, offloaded


def test_gated_forward_and_losses_match(plain_and_offloaded):
    model, offloaded = plain_and_offloaded
    costs = costs_of(model)
    ids = random_ids(2, 12)
    masks = Masks.stack([structured_mask(costs), random_mask(costs, seed=4)])
    want = gated_logits(model, ids.repeat(2, 1), masks)
    assert (gated_logits(offloaded, ids.repeat(2, 1), masks) - want).abs().max() <= 1e-5
    assert torch.allclose(masked_losses(offloaded, ids, masks), masked_losses(model, ids, masks), atol=1e-5)


def test_perplexity_matches(plain_and_offloaded):
    model, offloaded = plain_and_offloaded
    tokens = random_ids(1, 200, seed=3)
    want = perplexity_of_tokens(model, tokens, seqlen=20, batch_size=4).ppl
    assert perplexity_of_tokens(offloaded, tokens, seqlen=20, batch_size=4).ppl == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("method,propagate", [("flap", "dense"), ("wanda-sp", "pruned")])
def test_layer_by_layer_metric_matches(plain_and_offloaded, method, propagate):
    model, offloaded = plain_and_offloaded
    calib = random_ids(8, 16, seed=5)
    want = run_metric(model, calib, method, 0.4, propagate=propagate, batch_size=4, progress=False)
    got = run_metric(offloaded, calib, method, 0.4, propagate=propagate, batch_size=4, progress=False)
    for kind in want.masks.kinds:
        assert torch.equal(got.masks[kind], want.masks[kind])
    for block, bias in (want.output_bias or {}).items():
        assert torch.allclose(got.output_bias[block], bias, atol=1e-5)


@pytest.mark.parametrize("inputs", ["dense", "sequential"])
def test_least_squares_refit_matches(plain_and_offloaded, inputs):
    # the sequential refit stands in for the attention / MLP modules and computes the edited
    # projections itself (refit columns, the module's own bias): offloaded weights must be read right
    from pgprune.reconstruction import reconstruct

    model, offloaded = plain_and_offloaded
    masks = structured_mask(costs_of(model))
    calib = random_ids(8, 16, seed=6)
    want = reconstruct(model, calib, masks, "lsq", inputs=inputs, batch_size=4, progress=False)
    got = reconstruct(offloaded, calib, masks, "lsq", inputs=inputs, batch_size=4, progress=False)
    assert want.input_weights["attn"] or want.input_weights["mlp"]
    for block, weights in want.input_weights.items():
        assert weights.keys() == got.input_weights[block].keys()
        for i, w in weights.items():
            assert torch.allclose(got.input_weights[block][i], w, atol=1e-4)
        assert torch.allclose(got.output_bias[block], want.output_bias[block], atol=1e-4)
