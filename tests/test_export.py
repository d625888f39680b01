"""Export / reload: the saved folder reproduces the pruned model in pgprune and in a fresh Python
process where pgprune cannot be imported (torch + transformers only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pgprune.errors import ConfigError, ModelLoadError
from pgprune.export import load_pruned, save_pruned, structure_summary
from pgprune.masks import Masks, UnitCosts
from pgprune.models.adapter import get_adapter
from pgprune.surgery import remove_units
from structure_helpers import (CASES, NUM_LAYERS, costs_of, logits, make_model, random_ids, structured_mask,
                               tiny_tokenizer)

GEN = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


def _bias(model):
    g = torch.Generator().manual_seed(3)
    b = {k: torch.randn(NUM_LAYERS, model.config.hidden_size, generator=g) for k in ("attn", "mlp")}
    b["attn"][2] = b["mlp"][2] = 0  # layer 2 is removed by structured_mask
    return b


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case pruned with every kind of removal and exported; llama-bias also carries
    FLAP-style output biases (on kept blocks and as constants for removed ones)."""
    root = tmp_path_factory.mktemp("export")
    ids = random_ids(2, 12, seed=5)
    out = {}
    for case in CASES:
        model = make_model(case)
        costs = costs_of(model)
        masks = structured_mask(costs)
        bias = _bias(model) if case == "llama-bias" else None
        pruned = remove_units(model, masks, output_bias=bias)
        folder = root / case
        save_pruned(pruned, tiny_tokenizer() if case == "llama" else None, folder, masks=masks, extra={"case": case})
        with torch.no_grad():
            gen = pruned.generate(ids, **GEN)
        out[case] = dict(folder=folder, model=pruned, masks=masks, costs=costs, logits=logits(pruned, ids), gen=gen)
    torch.save(ids, root / "ids.pt")
    return root, ids, out


def test_reload_in_process(exported):
    root, ids, out = exported
    for case, item in out.items():
        model, tok = load_pruned(item["folder"], dtype="fp32", device="cpu")
        assert type(model).__name__.startswith("Pgprune")
        assert (logits(model, ids) - item["logits"]).abs().max() <= 1e-4, case
        with torch.no_grad():
            cached = model.generate(ids, use_cache=True, **GEN)
            uncached = model.generate(ids, use_cache=False, **GEN)
        assert torch.equal(cached, uncached) and torch.equal(cached, item["gen"]), case
        # the adapter works on the reloaded model and sees the same structure
        a, b = UnitCosts.from_adapter(get_adapter(model)), UnitCosts.from_adapter(get_adapter(item["model"]))
        assert torch.equal(a.num_kv_heads, b.num_kv_heads) and torch.equal(a.intermediate, b.intermediate)
        assert a.prunable_params == b.prunable_params
        assert (tok is not None) == (case == "llama")


def test_reload_without_pgprune(exported):
    """AutoModelForCausalLM + trust_remote_code in a subprocess whose sys.path cannot reach pgprune."""
    root, ids, out = exported
    script = textwrap.dedent(f"""
        import importlib.util, os, sys
        sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or '.', 'pgprune'))]
        assert importlib.util.find_spec('pgprune') is None, 'pgprune is still importable'
        import torch
        from transformers import AutoModelForCausalLM
        root = {str(root)!r}
        ids = torch.load(os.path.join(root, 'ids.pt'))
        results = {{}}
        for case in {list(out)!r}:
            model = AutoModelForCausalLM.from_pretrained(os.path.join(root, case), trust_remote_code=True,
                                                         dtype=torch.float32).eval()
            with torch.no_grad():
                lg = model(input_ids=ids, use_cache=False).logits
                kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
                cached = model.generate(ids, use_cache=True, **kw)
                uncached = model.generate(ids, use_cache=False, **kw)
            results[case] = dict(logits=lg, cached=cached, uncached=uncached, cls=type(model).__module__)
        assert 'pgprune' not in sys.modules
        torch.save(results, os.path.join(root, 'subprocess_results.pt'))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(root / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(root / "subprocess_results.pt")
    for case, item in out.items():
        r = results[case]
        assert r["cls"].startswith("transformers_modules"), r["cls"]
        assert (r["logits"] - item["logits"]).abs().max() <= 1e-4, case
        assert torch.equal(r["cached"], r["uncached"]) and torch.equal(r["cached"], item["gen"]), case


def test_folder_contents(exported):
    _, _, out = exported
    item = out["qwen2"]
    folder = item["folder"]
    names = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "modeling_pgprune.py", "pgprune.json", "masks.safetensors"} <= names
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_pgprune.PgpruneQwen2ForCausalLM"
    assert cfg["num_hidden_layers"] == 3 and len(cfg["layer_types"]) == 3
    spec = cfg["pgprune"]
    assert spec["removed_layers"] == [2]
    assert [ls["num_key_value_heads"] == 0 for ls in spec["layers"]] == [True, False, False]
    assert [ls["intermediate_size"] == 0 for ls in spec["layers"]] == [False, False, True]
    prov = json.loads((folder / "pgprune.json").read_text())
    assert abs(prov["sparsity"] - item["masks"].sparsity(item["costs"])) < 1e-12
    assert prov["extra"] == {"case": "qwen2"}
    saved = Masks.load(folder / "masks.safetensors")
    assert all(torch.equal(saved[k], item["masks"][k]) for k in item["masks"].kinds)
    # the modeling file imports nothing from pgprune
    source = (folder / "modeling_pgprune.py").read_text()
    assert "import pgprune" not in source and "from pgprune" not in source


def test_dense_export_and_summary(tmp_path):
    model = make_model("llama")
    ids = random_ids(2, 8)
    dense = logits(model, ids)
    save_pruned(model, None, tmp_path / "dense")  # no masks: a trivial structure record
    reloaded, _ = load_pruned(tmp_path / "dense", dtype="fp32", device="cpu")
    assert torch.equal(logits(reloaded, ids), dense)
    s = structure_summary(reloaded)
    assert s["sparsity"] == 0.0 and s["total_params"] == sum(p.numel() for p in model.parameters())


def test_atomic_and_errors(tmp_path, monkeypatch):
    model = make_model("llama")
    target = tmp_path / "out"
    save_pruned(model, None, target, masks=structured_mask(costs_of(model)))
    with pytest.raises(ConfigError, match="overwrite"):
        save_pruned(model, None, target)
    save_pruned(model, None, target, overwrite=True)

    class Broken:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(model, Broken(), tmp_path / "broken")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no half-written folder, no temp leftovers

    with pytest.raises(ModelLoadError, match="not a pruned model"):
        make_model("llama").save_pretrained(tmp_path / "plain")
        load_pruned(tmp_path / "plain", dtype="fp32", device="cpu")


def test_cli_apply_and_info(tmp_path, capsys):
    from safetensors.torch import save_file

    from pgprune.cli import main
    from pgprune.gating import gated_logits

    model = make_model("qwen3")
    dense_dir = tmp_path / "dense"
    model.save_pretrained(dense_dir)
    tiny_tokenizer().save_pretrained(dense_dir)
    costs = costs_of(model)
    masks = structured_mask(costs, seed=4)
    masks.save(tmp_path / "masks.safetensors")
    bias = _bias(model)
    save_file({k: v.contiguous() for k, v in bias.items()}, str(tmp_path / "bias.safetensors"))
    ids = random_ids(2, 9)
    want = logits(remove_units(model, masks, output_bias=bias, copy=True), ids)
    gated = gated_logits(model, ids, masks)

    out = tmp_path / "pruned"
    assert main(["apply", str(dense_dir), "--masks", str(tmp_path / "masks.safetensors"), "--out", str(out),
                 "--dtype", "fp32", "--output-bias", str(tmp_path / "bias.safetensors")]) == 0
    reloaded, tok = load_pruned(out, dtype="fp32", device="cpu")
    assert tok is not None
    assert (logits(reloaded, ids) - want).abs().max() <= 1e-4
    assert (want - gated).abs().max() > 1e-3  # the bias file was applied

    assert main(["info", str(out), "--json", str(tmp_path / "info.json")]) == 0
    printed = capsys.readouterr().out
    assert "sparsity" in printed and "removed layers (dense indices): [2]" in printed
    info = json.loads((tmp_path / "info.json").read_text())
    n_bias = 6 * model.config.hidden_size  # non-zero vectors on the 3 kept layers, both blocks
    assert info["prunable_params"] == int(masks.kept_prunable_params(costs)) + n_bias
    assert info["dense_prunable_params"] == costs.prunable_params
    assert [r["source_layer"] for r in info["layers"]] == [0, 1, 3]

    assert main(["info", str(dense_dir)]) == 0
    assert "sparsity 0.00%" in capsys.readouterr().out
    assert main(["apply", str(dense_dir), "--masks", str(tmp_path / "missing.safetensors"), "--out",
                 str(tmp_path / "x")]) == 1


# --- the structure record ----------------------------------------------------------------------------
# config.pgprune as the first exporting version wrote it (structured_mask on the 4-layer llama case):
# a folder exported then must keep loading, and its record must read back to the same JSON.
OLD_RECORD = {
    "format_version": 1,
    "roles": {"layers": "model.layers", "attn": "self_attn", "mlp": "mlp", "input_norm": "input_layernorm",
              "post_norm": "post_attention_layernorm", "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
              "gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "dense": {"num_hidden_layers": 4, "num_key_value_heads": 2, "num_attention_heads": 4, "intermediate_size": 96,
              "prunable_params": 123, "total_params": 456},
    "removed_layers": [2],
    "layers": [
        {"source_layer": 0, "num_key_value_heads": 0, "intermediate_size": 61, "o_proj_bias": False,
         "down_proj_bias": False, "attn_output_bias": False, "mlp_output_bias": False},
        {"source_layer": 3, "num_key_value_heads": 1, "intermediate_size": 0, "o_proj_bias": True,
         "down_proj_bias": False, "attn_output_bias": False, "mlp_output_bias": True},
    ],
}


def test_structure_record_round_trip(exported):
    from pgprune.models.pruned_modeling import LayerRecord, StructureRecord

    record = StructureRecord.from_dict(OLD_RECORD)
    assert record.to_dict() == OLD_RECORD
    assert json.dumps(record.to_dict()) == json.dumps(OLD_RECORD)  # same keys in the same order on disk
    assert record.source_layers == [0, 3] and record.removed_layers == (2,)
    assert record.layers[1] == LayerRecord(3, 1, 0, o_proj_bias=True, mlp_output_bias=True)
    assert record.dense.prunable_params == 123
    # every exported folder's record, and the in-memory model's, read back unchanged
    _, _, out = exported
    for case, item in out.items():
        on_disk = json.loads((item["folder"] / "config.json").read_text())["pgprune"]
        assert StructureRecord.from_dict(on_disk).to_dict() == on_disk, case
        assert StructureRecord.of(item["model"]).to_dict() == item["model"].config.pgprune, case
    assert StructureRecord.of(make_model("llama")) is None
    # bias flags default to False, dense sizes may be absent (reading only)
    lean = {"layers": [{"source_layer": 0, "num_key_value_heads": 2, "intermediate_size": 8}]}
    r = StructureRecord.from_dict(lean)
    assert r.dense is None and r.layers[0].o_proj_bias is False and r.format_version == 1


@pytest.mark.parametrize("change, says", [
    (lambda d: d.pop("layers"), "layers must be a non-empty list"),
    (lambda d: d["layers"][1].update(num_key_value_heads="1"), r"layers\[1\]: 'num_key_value_heads' must be"),
    (lambda d: d["layers"][0].update(intermediate_size=True), r"layers\[0\]: 'intermediate_size' must be"),
    (lambda d: d["layers"][0].update(o_proj_bias="yes"), "'o_proj_bias' must be true or false"),
    (lambda d: d["layers"][0].pop("source_layer"), "'source_layer' must be a non-negative integer, got None"),
    (lambda d: d["roles"].pop("q"), "roles lacks the module name"),
    (lambda d: d["dense"].pop("total_params"), r"dense: 'total_params'"),
    (lambda d: d.update(removed_layers=[-1]), "removed_layers must be a list of layer indices"),
    (lambda d: d.update(format_version=99), "update pgprune"),
    (lambda d: d.update(layers=[[0, 1, 2]]), r"layers\[0\] must be a JSON object"),
])
def test_malformed_structure_record_is_a_clear_error(change, says):
    import copy

    from pgprune.models.pruned_modeling import StructureError, StructureRecord
    from pgprune.models.structure import read_structure

    bad = copy.deepcopy(OLD_RECORD)
    change(bad)
    with pytest.raises(StructureError, match=says):
        StructureRecord.from_dict(bad)

    class Config:
        pgprune = bad

    with pytest.raises(ModelLoadError, match=f"(?s)malformed pgprune structure record.*{says}.*pgprune apply"):
        read_structure(Config())


def test_load_pruned_with_a_malformed_record_names_the_file(exported, tmp_path):
    import shutil

    _, _, out = exported
    folder = tmp_path / "broken"
    shutil.copytree(out["llama"]["folder"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["pgprune"]["layers"][0]["num_key_value_heads"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"(?s)config\.json has a malformed.*layers\[0\]: 'num_key_value_heads'"):
        load_pruned(folder, dtype="fp32", device="cpu")


def test_per_layer_config_for_stock_transformers(exported):
    """config.json also carries transformers' per_layer_config convention: the stock config class
    (no remote code) reads the true per-layer widths; the remote code still loads the folder."""
    from transformers import AutoConfig

    root, ids, out = exported
    item = out["llama"]
    cfg = AutoConfig.from_pretrained(item["folder"])  # no trust_remote_code
    assert cfg.is_heterogeneous
    model = item["model"]
    adapter = get_adapter(model)
    assert len(cfg.per_layer_config) == adapter.num_layers
    for i, layer_cfg in enumerate(cfg.per_layer_config):
        kv, ch = adapter.num_kv_heads(i), adapter.intermediate_size(i)
        skip = set(getattr(layer_cfg, "skip", []))
        assert ("self_attn" in skip) == (kv == 0) and ("mlp" in skip) == (ch == 0)
        if kv:
            assert layer_cfg.num_key_value_heads == kv and layer_cfg.num_attention_heads == kv * adapter.queries_per_kv
        if ch:
            assert layer_cfg.intermediate_size == ch
    # global attributes stay the dense ones (what our remote code and older tools read)
    assert cfg.intermediate_size == model.config.pgprune["dense"]["intermediate_size"]
    reloaded, _ = load_pruned(item["folder"], dtype="fp32", device="cpu")
    assert (logits(reloaded, ids) - item["logits"]).abs().max() <= 1e-4
