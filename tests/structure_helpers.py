"""Shared helpers for the gating / surgery / export tests: tiny models of every family, masks
that exercise every kind of removal, and a plain weight-zeroing reference of a pruned model."""

from __future__ import annotations

import copy

import torch

from pgprune.masks import Masks, UnitCosts
from pgprune.models.adapter import get_adapter
from pgprune.models.synthetic import TEST_FAMILIES, synthetic_model

# name -> (model_type, extra sizes/options). "llama-mha" has as many KV heads as heads;
# "llama-bias" has biases on q/k/v/o and gate/up/down (the bias paths of gating and surgery).
CASES = {fam: (fam, {}) for fam in TEST_FAMILIES}
CASES["llama-mha"] = ("llama", {"num_key_value_heads": 4})
CASES["llama-bias"] = ("llama", {"attention_bias": True, "mlp_bias": True})

NUM_LAYERS = 4


def make_model(case: str, seed: int = 0, dtype=torch.float32):
    model_type, extra = CASES[case]
    return synthetic_model(model_type, seed=seed, dtype=dtype, num_hidden_layers=NUM_LAYERS, **extra)


def costs_of(model) -> UnitCosts:
    return UnitCosts.from_adapter(get_adapter(model))


def structured_mask(costs: UnitCosts, seed: int = 0) -> Masks:
    """Every removal path at once: layer 0 loses all its heads (attention removed although the
    attention block mask keeps it, and the first KV-cache slot moves to layer 1), layer 1 keeps a
    random subset of heads and channels, layer 2 is removed by the layer mask, layer 3 loses its
    MLP by the block mask."""
    g = torch.Generator().manual_seed(seed)
    L, G, I = costs.num_layers, costs.units_per_layer("head"), costs.units_per_layer("channel")
    heads = torch.rand(L, G, generator=g) > 0.5
    heads[:, 0] = True
    heads[0] = False
    chans = torch.rand(L, I, generator=g) > 0.4
    chans[:, 0] = True
    attn = torch.ones(L, 1, dtype=torch.bool)
    mlp = torch.ones(L, 1, dtype=torch.bool)
    mlp[3] = False
    layer = torch.ones(L, 1, dtype=torch.bool)
    layer[2] = False
    return Masks({"head": heads, "channel": chans, "attn": attn, "mlp": mlp, "layer": layer})


def random_mask(costs: UnitCosts, seed: int, p_keep: float = 0.6) -> Masks:
    g = torch.Generator().manual_seed(seed)
    return Masks({kind: torch.rand(costs.num_layers, costs.units_per_layer(kind), generator=g) < p_keep
                  for kind in ("head", "channel", "attn", "mlp", "layer")})


def random_ids(batch: int, seqlen: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def zeroed_reference(model, masks: Masks, output_bias: dict | None = None):
    """A deep copy of `model` whose pruned units have zero output weights: the plain definition of
    pruning, written without gating.py / surgery.py / Masks.effective. Nesting rules: a layer
    mask drops both blocks; a block is dropped by its block mask or when none of its heads /
    channels is kept; a dropped block contributes nothing (also no bias), except an output_bias
    vector, which a dropped block of a kept layer still adds."""
    ref = copy.deepcopy(model)
    adapter = get_adapter(ref)
    hd, g = adapter.head_dim, adapter.queries_per_kv
    t = masks.tensors
    with torch.no_grad():
        for i in range(adapter.num_layers):
            m = adapter.layer(i)
            n_groups = m.k_proj.out_features // hd
            n_chans = m.up_proj.out_features
            layer_keep = bool(t["layer"][i, 0]) if "layer" in t else True
            heads = [bool(t["head"][i, j]) if "head" in t else True for j in range(n_groups)]
            chans = t["channel"][i, :n_chans] if "channel" in t else torch.ones(n_chans, dtype=torch.bool)
            attn_keep = layer_keep and (bool(t["attn"][i, 0]) if "attn" in t else True) and any(heads)
            mlp_keep = layer_keep and (bool(t["mlp"][i, 0]) if "mlp" in t else True) and bool(chans.any())
            for j, keep in enumerate(heads):
                if not (keep and attn_keep):
                    m.o_proj.weight[:, j * g * hd:(j + 1) * g * hd] = 0
            if not attn_keep and m.o_proj.bias is not None:
                m.o_proj.bias.zero_()
            for c in range(n_chans):
                if not (bool(chans[c]) and mlp_keep):
                    m.down_proj.weight[:, c] = 0
            if not mlp_keep and m.down_proj.bias is not None:
                m.down_proj.bias.zero_()
            for kind, proj in (("attn", m.o_proj), ("mlp", m.down_proj)):
                if output_bias and kind in output_bias and layer_keep:
                    b = output_bias[kind][i].to(proj.weight.dtype)
                    if proj.bias is None:
                        proj.bias = torch.nn.Parameter(torch.zeros_like(b))
                    proj.bias += b
    return ref


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def tiny_tokenizer(vocab: int = 128):
    """A word-level fast tokenizer over the words w0..w{vocab-1} (no download needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1", bos_token="w2")
