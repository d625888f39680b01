"""The GGUF of a pruned SmolLM2 computes the same model in llama.cpp's own forward: per-token
log-probabilities on real text (WikiText-2 test) under pgprune's windows, perplexity within 1 % and
top-1 agreement >= 99 % at f32, for (a) a 30 % bias-compensated channel+head mask and (b) a mask that
also removes attention blocks (the first layer's too), MLP blocks (the last layer's too) and a whole
layer, with their compensation constants. Needs llama-cpp-python (pgprune[llamacpp])."""

from __future__ import annotations

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (the optional extra pgprune[llamacpp]; see README)")

from pgprune.data import get_calibration_windows, get_eval_tokens  # noqa: E402
from pgprune.evaluate.llamacpp import open_gguf, token_nll_from_logits, window_logits  # noqa: E402
from pgprune.evaluate.perplexity import eval_windows  # noqa: E402
from pgprune.gguf_export import export_gguf  # noqa: E402
from pgprune.masks import Masks, UnitCosts  # noqa: E402
from pgprune.metrics.pipeline import run_metric  # noqa: E402
from pgprune.models.adapter import get_adapter  # noqa: E402
from pgprune.reconstruction import compensation_biases, feature_means  # noqa: E402
from pgprune.surgery import pruned_view  # noqa: E402

pytestmark = pytest.mark.integration

SEQLEN = 128
WINDOWS = 24  # 3072 tokens, 3048 predicted


@pytest.fixture(scope="module")
def setting(smollm2, shared_data):
    model, tok = smollm2
    calib = get_calibration_windows(tok, "wikitext2", 16, SEQLEN, seed=0, data_dir=shared_data, split="validation")
    res = run_metric(model, calib, "magnitude", 0.3, bias_compensation=True, progress=False)
    tokens = get_eval_tokens(tok, "wikitext2", "test", shared_data)
    windows, _ = eval_windows(tokens, SEQLEN, max_windows=WINDOWS)
    return model, res, windows


@torch.no_grad()
def _torch_scores(model, windows):
    nll, top = [], []
    for b in range(0, windows.shape[0], 8):
        batch = windows[b:b + 8]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].double()
        lp = torch.log_softmax(logits, -1)
        nll.append(-lp.gather(-1, batch[:, 1:, None])[..., 0].reshape(-1))
        top.append(logits.argmax(-1).reshape(-1))
    return torch.cat(nll).numpy(), torch.cat(top).numpy()


def _llamacpp_scores(path, windows):
    llm = open_gguf(path, SEQLEN, threads=2)
    nll, top = [], []
    for w in windows.tolist():
        n, t = token_nll_from_logits(window_logits(llm, w), w)
        nll.append(n)
        top.append(t)
    llm.close()
    return np.concatenate(nll), np.concatenate(top)


def _compare(pruned, windows, path):
    t_nll, t_top = _torch_scores(pruned, windows)
    l_nll, l_top = _llamacpp_scores(path, windows)
    ppl_t, ppl_l = float(np.exp(t_nll.mean())), float(np.exp(l_nll.mean()))
    agree = float((t_top == l_top).mean())
    assert abs(ppl_l / ppl_t - 1) <= 0.01, (ppl_t, ppl_l)
    assert agree >= 0.99, agree
    return ppl_t, ppl_l, agree


def test_pruned_30pct_compensated_matches_in_llamacpp(setting, tmp_path):
    model, res, windows = setting
    pruned = pruned_view(model, res.masks, output_bias=res.output_bias)
    assert any(pruned.model.layers[i].mlp.down_proj.bias is not None for i in range(30))  # compensated
    path = tmp_path / "p30.gguf"
    export_gguf(pruned, path, outtype="f32", tokenizer_from="smollm2-135m")
    ppl_t, ppl_l, agree = _compare(pruned, windows, path)
    dense_t, _ = _torch_scores(model, windows)
    assert ppl_t > float(np.exp(dense_t.mean()))  # it is pruned: worse than dense


def test_removed_blocks_and_layer_with_constants_match_in_llamacpp(setting, tmp_path):
    model, res, windows = setting
    adapter = get_adapter(model)
    costs = UnitCosts.from_adapter(adapter)
    L = costs.num_layers
    t = {k: v.clone() for k, v in res.masks.tensors.items()}
    attn = torch.ones(L, 1, dtype=torch.bool)
    mlp = torch.ones(L, 1, dtype=torch.bool)
    layer = torch.ones(L, 1, dtype=torch.bool)
    attn[[0, 9]] = False  # the first layer's attention (llama.cpp needs heads there) and one later
    mlp[[14, L - 1]] = False  # one MLP and the last layer's (llama.cpp skips a layer without FFN)
    layer[20] = False
    masks = Masks({**t, "attn": attn, "mlp": mlp, "layer": layer})
    bias = compensation_biases(adapter, feature_means(res.dense_stats), masks, costs)
    pruned = pruned_view(model, masks, output_bias=bias)
    assert pruned.model.layers[0].attn_output_bias is not None and pruned.model.layers[9].attn_output_bias is not None
    assert pruned.model.layers[14].mlp_output_bias is not None
    path = tmp_path / "blocks.gguf"
    s = export_gguf(pruned, path, outtype="f32", tokenizer_from="smollm2-135m")
    assert s["num_layers"] == L - 1
    assert s["layers"][0]["dummy_attn"] and s["layers"][9]["n_head"] == 0
    assert s["layers"][14]["dummy_ffn"] and s["layers"][-1]["dummy_ffn"]
    assert s["layers"][8]["folded"]  # layer 9's attention constant went into layer 8's ffn_down.bias
    _compare(pruned, windows, path)


def test_llamacpp_quantizer_types_from_export(setting, tmp_path):
    """q4_0 of the dense SmolLM2 through llama.cpp's quantizer: the matrices are stored as Q4_0, nothing
    but the file is left beside it, and it still scores the text (the measured q4_0 drift is ~22 %)."""
    import gguf

    model, _, windows = setting
    windows = windows[:8]
    path = tmp_path / "dense.q4_0.gguf"
    export_gguf("smollm2-135m", path, outtype="q4_0")
    assert list(tmp_path.iterdir()) == [path]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_up.weight"] == "Q4_0" and types["blk.29.attn_q.weight"] == "Q4_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    t_nll, t_top = _torch_scores(model, windows)
    l_nll, l_top = _llamacpp_scores(path, windows)
    ratio = float(np.exp(l_nll.mean() - t_nll.mean()))
    assert 0.9 < ratio < 1.5, ratio
    assert 0.6 < float((t_top == l_top).mean()) < 1.0  # close, but quantized: not the same model


def test_k_quant_of_a_model_whose_rows_fit_256(tmp_path):
    import gguf

    from pgprune.models.synthetic import synthetic_model

    model = synthetic_model("llama", seed=0, num_hidden_layers=2, vocab_size=49152, hidden_size=256,
                            intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "tiny.q4_k_m.gguf"
    export_gguf(model, path, outtype="q4_k_m", tokenizer_from="smollm2-135m")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_up.weight"] == "Q4_K" and types["blk.1.attn_q.weight"] == "Q4_K"
    llm = open_gguf(path, 16, threads=1)
    logits = window_logits(llm, list(range(100, 116)))
    llm.close()
    assert logits.shape == (16, 49152) and np.isfinite(logits).all()
