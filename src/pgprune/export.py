"""Export and reload pruned models as Hugging Face folders.

A folder written by `save_pruned` holds
  config.json           the family's own config (model_type unchanged, e.g. "llama"), with
                        num_hidden_layers = kept layers, layer_types sliced to them, the structure
                        record `pgprune` (pruned_modeling.StructureRecord.to_dict(): per-layer widths,
                        removed blocks / layers, output biases, dense sizes) and
                        auto_map -> modeling_pgprune.Pgprune<Family>ForCausalLM
  model.safetensors     the pruned weights (same tensor names as the dense model, fewer of them)
  modeling_pgprune.py   a copy of pgprune/models/pruned_modeling.py (torch + transformers only)
  generation_config.json, tokenizer files (when a tokenizer is given)
  masks.safetensors     the mask that produced the model (when given; units of the model it was applied to)
  pgprune.json          provenance: versions, parameter counts, sparsity, and the caller's `extra`

It loads anywhere with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`;
pgprune itself reloads it with `load_pruned` (same code, imported from the package; it lives in
`pgprune.models.load` beside `load_model`, which routes such folders to it, and is re-exported
here and as `pgprune.load_pruned`). Because model_type is unchanged, the
pgprune adapter of the family works on the reloaded model as is (widths are read from weights);
pruning is detected by the `pgprune` entry of the config. Without trust_remote_code, transformers
would build the dense family class and refuse the smaller weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from pgprune import atomic
from pgprune.errors import ConfigError
from pgprune.masks import Masks, UnitCosts
from pgprune.models import pruned_modeling as pm
from pgprune.models.adapter import get_adapter
from pgprune.models.load import load_model, resolve_model_source
from pgprune.models.load import load_pruned  # noqa: F401  (public here too: pgprune.export.load_pruned)
from pgprune.models.structure import read_structure
from pgprune.surgery import is_pruned, layer_widths, remove_units

MODELING_FILE = "modeling_pgprune.py"
PROVENANCE_FILE = "pgprune.json"
MASKS_FILE = "masks.safetensors"


def structure_summary(model: nn.Module) -> dict:
    """Parameter counts and sparsity of a (pruned or dense) model, per DESIGN.md: sparsity is the
    fraction of the dense model's prunable parameters (inside the decoder layers) removed; the
    fraction of all parameters removed is reported beside it."""
    adapter = get_adapter(model)
    costs = UnitCosts.from_adapter(adapter)
    record = read_structure(model)
    dense = record.dense if record is not None else None
    prunable = costs.prunable_params
    total = prunable + costs.outside_params
    dense_prunable = dense.prunable_params if dense is not None else prunable
    dense_total = dense.total_params if dense is not None else total
    widths = layer_widths(model)
    return {
        "model_type": model.config.model_type,
        "pruned": record is not None,
        "num_layers": adapter.num_layers,
        "dense_num_layers": dense.num_hidden_layers if dense is not None else adapter.num_layers,
        "removed_layers": list(record.removed_layers) if record is not None else [],
        "prunable_params": prunable,
        "dense_prunable_params": dense_prunable,
        "sparsity": 1.0 - prunable / dense_prunable,
        "total_params": total,
        "dense_total_params": dense_total,
        "total_sparsity": 1.0 - total / dense_total,
        "layers": widths,
    }


def save_pruned(model: nn.Module, tokenizer, out_dir: str | Path, masks: Masks | None = None,
                extra: dict | None = None, *, overwrite: bool = False) -> Path:
    """Write `model` as a reloadable Hugging Face folder at `out_dir` (atomically).

    If the model is not pruned yet, it is pruned IN PLACE with `masks` first (a dense model
    without masks is exported with a trivial structure record). `masks`, when given, is also
    saved as masks.safetensors. `extra` (JSON-serialisable) goes into pgprune.json.
    """
    from pgprune import __version__
    import transformers

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir} already exists; choose another folder or pass overwrite=True "
                          "(--overwrite) to replace it")
    if not is_pruned(model):
        remove_units(model, masks if masks is not None else Masks({}))
    summary = structure_summary(model)
    with atomic.temp_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.copyfile(pm.__file__, tmp / MODELING_FILE)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        class_name = type(model).__name__
        cfg["architectures"] = [class_name]
        cfg["auto_map"] = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{class_name}"}
        for key in ("per_layer_config", "allow_global_per_layer_attribute_access"):  # stale after more pruning
            cfg.pop(key, None)
        cfg.update(per_layer_config(model))
        atomic.write_json(cfg_path, cfg)
        if masks is not None:
            masks.save(tmp / MASKS_FILE)
        atomic.write_json(tmp / PROVENANCE_FILE, {
            "pgprune_version": __version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "load_with": "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) "
                         "or pgprune.export.load_pruned(folder)",
            "sparsity_definition": "fraction of the dense model's decoder-layer parameters removed",
            **{k: v for k, v in summary.items() if k != "layers"},
            "extra": extra or {},
        })
    return out_dir


def per_layer_config(model: nn.Module) -> dict:
    """transformers' heterogeneous-config convention for the pruned widths: `per_layer_config`, a
    sparse map from kept-layer index to the attributes that differ from the dense config
    (`intermediate_size`, `num_key_value_heads`, `num_attention_heads`; a removed block is listed in
    `skip` by its module name instead), so that the stock config class reads the true per-layer
    widths (`AutoConfig.from_pretrained(folder).per_layer_config[i]`). The global attributes stay the
    dense ones, and `allow_global_per_layer_attribute_access` lets code that reads them (our remote
    code, older tools) keep working. Empty for a model whose layers all have the dense widths."""
    adapter = get_adapter(model)
    record = read_structure(model)
    roles = record.roles if record is not None else pm.DEFAULT_ROLES
    dense_kv, g, dense_ch = adapter.dense_num_kv_heads, adapter.queries_per_kv, adapter.dense_intermediate_size
    out = {}
    for i in range(adapter.num_layers):
        kv, ch = adapter.num_kv_heads(i), adapter.intermediate_size(i)
        d, skip = {}, []
        if kv == 0:
            skip.append(roles["attn"])
        elif kv != dense_kv:
            d.update(num_key_value_heads=kv, num_attention_heads=kv * g)
        if ch == 0:
            skip.append(roles["mlp"])
        elif ch != dense_ch:
            d["intermediate_size"] = ch
        if skip:
            d["skip"] = skip
        if d:
            out[str(i)] = d
    if not out:
        return {}
    return {"per_layer_config": out, "allow_global_per_layer_attribute_access": True}


def inspect_model(name: str) -> dict:
    """`structure_summary` of a model folder (pruned or dense), hub id, .gguf file or alias.
    Folders are built on the meta device from their config alone (no weights are read)."""
    from transformers import AutoConfig

    source, kwargs = resolve_model_source(name)
    if not kwargs and (Path(source) / "config.json").is_file():
        config = AutoConfig.from_pretrained(source)
        cls = pm.family_causal_lm_class(config)
        if read_structure(config, source) is not None:
            cls = pm.pruned_causal_lm_class(cls)
        with torch.device("meta"):
            model = cls(config)
    else:
        model, _ = load_model(name, dtype="fp32", device="cpu")
    return structure_summary(model)


def format_summary(summary: dict, title: str = "") -> str:
    """A per-layer table and the totals, with the sparsity definition spelled out."""
    lines = [f"{title}  ({summary['model_type']}, {summary['num_layers']} of {summary['dense_num_layers']} layers)"
             if title else f"{summary['model_type']}: {summary['num_layers']} of {summary['dense_num_layers']} layers"]
    lines.append(f"{'layer':>5} {'src':>4} {'kv_heads':>8} {'heads':>5} {'channels':>8} {'attn_params':>12} "
                 f"{'mlp_params':>12} {'layer_params':>12}")
    for r in summary["layers"]:
        lines.append(f"{r['layer']:>5} {r['source_layer']:>4} {r['kv_heads']:>8} {r['heads']:>5} {r['channels']:>8} "
                     f"{r['attn_params']:>12,} {r['mlp_params']:>12,} {r['params']:>12,}")
    if summary["removed_layers"]:
        lines.append(f"removed layers (dense indices): {summary['removed_layers']}")
    lines.append(f"prunable params (decoder layers): {summary['prunable_params']:,} of "
                 f"{summary['dense_prunable_params']:,} dense -> sparsity {summary['sparsity']:.2%}")
    lines.append(f"all params: {summary['total_params']:,} of {summary['dense_total_params']:,} dense -> "
                 f"{summary['total_sparsity']:.2%} of all parameters removed")
    lines.append("sparsity = fraction of the dense model's decoder-layer parameters (attention, MLP, norms) "
                 "removed; embeddings and LM head excluded")
    return "\n".join(lines)
