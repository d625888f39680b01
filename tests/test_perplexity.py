import math

import pytest
import torch

from pgprune.errors import ConfigError
from pgprune.evaluate.perplexity import evaluate_perplexity, natural_text_perplexities, perplexity_of_tokens
from pgprune.lm_loss import token_nll
from pgprune.models.synthetic import synthetic_model


def reference_ppl(model, tokens, seqlen):
    """One window at a time, with the model's own loss (mean over the window's predicted tokens)."""
    stream = tokens.reshape(-1)
    n = stream.numel() // seqlen
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = stream[i * seqlen:(i + 1) * seqlen][None]
            losses.append(model(input_ids=w, labels=w).loss.double())
    return math.exp(torch.stack(losses).mean().item()), n


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("seqlen,batch_size", [(16, 3), (32, 8), (7, 1)])
def test_matches_plain_reference_loop(family, seqlen, batch_size):
    model = synthetic_model(family, seed=1)
    tokens = torch.randint(0, 128, (1, 301), generator=torch.Generator().manual_seed(0))
    res = perplexity_of_tokens(model, tokens, seqlen=seqlen, batch_size=batch_size)
    ref, n = reference_ppl(model, tokens, seqlen)
    assert res.windows == n
    assert res.tokens == n * (seqlen - 1)
    assert res.ppl == pytest.approx(ref, rel=1e-5)
    assert not res.limited


def test_token_nll_matches_full_logits_in_small_chunks():
    model = synthetic_model("llama", seed=2)
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        logits = model(ids).logits.float()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1),
                                            reduction="none").view(2, 19)
    assert torch.allclose(token_nll(model, ids, chunk_tokens=5), ref, atol=1e-5)


def test_max_tokens_uses_a_prefix_and_says_so():
    model = synthetic_model("llama", seed=1)
    tokens = torch.randint(0, 128, (1, 400))
    res = perplexity_of_tokens(model, tokens, seqlen=16, max_tokens=100)
    ref, _ = reference_ppl(model, tokens[:, :96], 16)
    assert res.windows == 6 and res.limited
    assert res.ppl == pytest.approx(ref, rel=1e-5)
    assert res.to_dict()["limited"] is True


def test_bad_settings_are_refused():
    model = synthetic_model("llama", max_position_embeddings=64)
    tokens = torch.randint(0, 128, (1, 400))
    with pytest.raises(ConfigError, match="context"):
        perplexity_of_tokens(model, tokens, seqlen=128)
    with pytest.raises(ConfigError, match="max-tokens"):
        perplexity_of_tokens(model, tokens, seqlen=32, max_tokens=10)


def test_named_source_from_text_file(tmp_path, tokenizer):
    path = tmp_path / "doc.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    model = synthetic_model("mistral", seed=3)
    res = evaluate_perplexity(model, tokenizer, f"text:{path}", seqlen=32)
    ids = tokenizer(path.read_text(), return_tensors="pt").input_ids
    ref, _ = reference_ppl(model, ids, 32)
    assert res.ppl == pytest.approx(ref, rel=1e-5)


@pytest.mark.integration
@pytest.mark.shared_data
def test_smollm2_wikitext2_matches_reference_loop(smollm2, shared_data):
    model, tok = smollm2
    res = evaluate_perplexity(model, tok, "wikitext2", seqlen=128, max_tokens=128 * 16, data_dir=shared_data)
    from pgprune.data import get_eval_tokens

    ref, n = reference_ppl(model, get_eval_tokens(tok, "wikitext2", "test", shared_data)[:, :128 * 16], 128)
    assert res.windows == n == 16
    assert res.ppl == pytest.approx(ref, rel=1e-4)
    # A pretrained model is far better than chance on real English (vocab 49152).
    assert res.ppl < 200


def test_natural_text_is_the_geometric_mean_and_caps_c4_like_the_named_source():
    model = synthetic_model("llama", seed=2)
    g = torch.Generator().manual_seed(0)
    streams = {"c4": torch.randint(0, 128, (1, 16 * 300), generator=g),
               "wiki-sample": torch.randint(0, 128, (1, 16 * 40), generator=g)}
    out = natural_text_perplexities(model, streams, max_tokens=None, seqlen=16)
    c4_ref, _ = reference_ppl(model, streams["c4"][:, :16 * 256], 16)  # C4's evaluation stops at 256 windows
    wiki_ref, _ = reference_ppl(model, streams["wiki-sample"], 16)
    assert out["c4"] == pytest.approx(c4_ref, rel=1e-5)
    assert out["wiki-sample"] == pytest.approx(wiki_ref, rel=1e-5)
    assert out["natural"] == pytest.approx(math.sqrt(c4_ref * wiki_ref), rel=1e-5)
