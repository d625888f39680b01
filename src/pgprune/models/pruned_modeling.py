"""Pruned LLaMA-layout decoder models whose layers have their own widths.

This file is copied verbatim into every folder that `pgprune.export.save_pruned` writes, as
`modeling_pgprune.py`, and config.json points `auto_map` at it, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

works where only torch and transformers are installed. It must therefore import nothing but torch,
transformers and the standard library. pgprune's surgery uses the same classes in memory, so a
pruned model runs the same code before and after export.

How it works. The folder's config is the family's own config (model_type stays e.g. "llama"),
with `num_hidden_layers` counting the kept layers, `layer_types` (where the family has them) sliced
to the kept layers, and one extra entry, `config.pgprune`: the structure record, a JSON object
that `StructureRecord` (below) reads and writes. Per kept layer (`LayerRecord`):
  source_layer           index of the layer in the dense model
  num_key_value_heads    KV-head groups kept (0: the attention block was removed)
  intermediate_size      MLP channels kept (0: the MLP block was removed)
  o_proj_bias / down_proj_bias        whether o_proj / down_proj carry a bias (bias compensation)
  attn_output_bias / mlp_output_bias  a constant vector added in place of a removed block
plus the module names ("roles") of the layout, the dense model's sizes (`DenseSizes`), the dense
indices of removed layers and the format version. The model class is the family's own CausalLM class
(e.g. LlamaForCausalLM) built at dense size, whose layers are then rebuilt at the recorded widths.
Its decoder layers get a forward that skips removed blocks. Attention blocks are numbered
0..A-1 in the KV cache (only layers that still have attention own a cache slot).

Head layout: query head h uses KV head h // (num_attention_heads // num_key_value_heads), so a
KV group j owns query rows [j*g*d, (j+1)*g*d) of q_proj (g queries per KV head, d = head_dim),
rows [j*d, (j+1)*d) of k_proj / v_proj, and the matching input columns of o_proj. Inside pgprune
the adapter (pgprune.models.adapter) is the one owner of that layout; this file needs its own
statement of it because it must run without pgprune.

Why the record types live here. The typed record is needed by this file (to build the model from
a config) and by pgprune (surgery writes it; export, the loader and the report read it). This file
must stay self-contained, so it defines the dataclasses once and pgprune imports them from here.
A malformed record raises `StructureError`, a ValueError (transformers reports it as a failed
load); pgprune's `pgprune.models.structure.read_structure` turns it into pgprune's ModelLoadError.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import transformers
from torch import nn

FORMAT_VERSION = 1
CONFIG_KEY = "pgprune"
CLASS_PREFIX = "Pgprune"

# Module names of the LLaMA layout; recorded in config.pgprune["roles"] so that a family with the
# same structure and other names can be described without changing this file.
DEFAULT_ROLES = {
    "layers": "model.layers",
    "attn": "self_attn",
    "mlp": "mlp",
    "input_norm": "input_layernorm",
    "post_norm": "post_attention_layernorm",
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


class StructureError(ValueError):
    """config.pgprune is not a structure record this file can read."""


# --- the structure record ---------------------------------------------------------------------------
def _check_int(d: dict, key: str, where: str, default=None) -> int:
    value = d.get(key, default)
    if type(value) is not int or value < 0:  # bool is an int subclass: not a width
        raise StructureError(f"{where}: {key!r} must be a non-negative integer, got {value!r}")
    return value


def _check_bool(d: dict, key: str, where: str) -> bool:
    value = d.get(key, False)  # bias flags absent = no bias
    if not isinstance(value, bool):
        raise StructureError(f"{where}: {key!r} must be true or false, got {value!r}")
    return value


def _check_dict(d, where: str) -> dict:
    if not isinstance(d, dict):
        raise StructureError(f"{where} must be a JSON object, got {type(d).__name__}")
    return d


@dataclass(frozen=True)
class LayerRecord:
    """One kept decoder layer: where it came from and the widths it kept."""

    source_layer: int
    num_key_value_heads: int  # 0: the attention block was removed
    intermediate_size: int  # 0: the MLP block was removed
    o_proj_bias: bool = False
    down_proj_bias: bool = False
    attn_output_bias: bool = False  # a constant vector added in place of the removed attention block
    mlp_output_bias: bool = False  # likewise for the MLP block

    @classmethod
    def from_dict(cls, d, where: str = "layer record") -> "LayerRecord":
        d = _check_dict(d, where)
        ints = {f.name: _check_int(d, f.name, where) for f in fields(cls) if f.type == "int"}
        flags = {f.name: _check_bool(d, f.name, where) for f in fields(cls) if f.type == "bool"}
        return cls(**ints, **flags)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class DenseSizes:
    """The sizes of the dense model the pruned one came from (parameter counts for sparsity)."""

    num_hidden_layers: int
    num_key_value_heads: int
    num_attention_heads: int
    intermediate_size: int
    prunable_params: int
    total_params: int

    @classmethod
    def from_dict(cls, d, where: str = "dense sizes") -> "DenseSizes":
        d = _check_dict(d, where)
        return cls(**{f.name: _check_int(d, f.name, where) for f in fields(cls)})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class StructureRecord:
    """What `config.pgprune` holds: per kept layer its widths, plus the layout's module names,
    the dense sizes and the dense indices of the removed layers. `to_dict` gives the JSON form
    stored in config.json; `from_dict` reads it back and raises StructureError when malformed."""

    layers: tuple[LayerRecord, ...]
    roles: dict = field(default_factory=lambda: dict(DEFAULT_ROLES))
    dense: DenseSizes | None = None  # always written by pgprune; optional for reading
    removed_layers: tuple[int, ...] = ()
    format_version: int = FORMAT_VERSION

    @property
    def source_layers(self) -> list[int]:
        return [ls.source_layer for ls in self.layers]

    def to_dict(self) -> dict:
        out = {"format_version": self.format_version, "roles": dict(self.roles)}
        if self.dense is not None:
            out["dense"] = self.dense.to_dict()
        out["removed_layers"] = list(self.removed_layers)
        out["layers"] = [ls.to_dict() for ls in self.layers]
        return out

    @classmethod
    def from_dict(cls, d) -> "StructureRecord":
        where = f"config.{CONFIG_KEY}"
        d = _check_dict(d, where)
        version = _check_int(d, "format_version", where, default=FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise StructureError(f"this pruned model uses pgprune format {version}; this modeling file reads "
                                 f"up to {FORMAT_VERSION}: update pgprune and export the model again")
        roles = _check_dict(d.get("roles", DEFAULT_ROLES), f"{where}.roles")
        missing = [r for r in DEFAULT_ROLES if not isinstance(roles.get(r), str)]
        if missing:
            raise StructureError(f"{where}.roles lacks the module name(s) of {', '.join(missing)}")
        layers = d.get("layers")
        if not isinstance(layers, list) or not layers:
            raise StructureError(f"{where}.layers must be a non-empty list of per-layer records, got {layers!r}")
        removed = d.get("removed_layers", [])
        if not isinstance(removed, list) or not all(type(r) is int and r >= 0 for r in removed):
            raise StructureError(f"{where}.removed_layers must be a list of layer indices, got {removed!r}")
        return cls(
            layers=tuple(LayerRecord.from_dict(ls, f"{where}.layers[{i}]") for i, ls in enumerate(layers)),
            roles=dict(roles),
            dense=None if d.get("dense") is None else DenseSizes.from_dict(d["dense"], f"{where}.dense"),
            removed_layers=tuple(removed),
            format_version=version,
        )

    @classmethod
    def of(cls, config) -> "StructureRecord | None":
        """The record of a config (or a model's config), None for a model that is not pruned."""
        config = getattr(config, "config", config)
        d = getattr(config, CONFIG_KEY, None)
        return cls.from_dict(d) if d else None


def family_causal_lm_class(config) -> type:
    """The transformers CausalLM class of config.model_type (no remote code involved)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is None or not hasattr(transformers, name):
        raise ValueError(f"transformers {transformers.__version__} has no causal LM class for "
                         f"model_type={config.model_type!r}; install the transformers version that wrote this model")
    return getattr(transformers, name)


def get_submodule_path(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


# --- decoder layers ------------------------------------------------------------------------------
def _pruned_layer_forward(self, hidden_states, **kwargs):
    """Pre-norm residual layer: h + attn(norm(h)), then h + mlp(norm(h)); a removed block is
    skipped (or replaced by its constant output bias). Every keyword (masks, positions, cache, ...)
    is passed to attention unchanged, as the family's own layer does."""
    roles = self.pgprune_roles
    attn = getattr(self, roles["attn"])
    if attn is not None:
        residual = hidden_states
        h = getattr(self, roles["input_norm"])(hidden_states)
        h = attn(hidden_states=h, **kwargs)[0]
        hidden_states = residual + h
    elif self.attn_output_bias is not None:
        hidden_states = hidden_states + self.attn_output_bias
    mlp = getattr(self, roles["mlp"])
    if mlp is not None:
        residual = hidden_states
        h = getattr(self, roles["post_norm"])(hidden_states)
        hidden_states = residual + mlp(h)
    elif self.mlp_output_bias is not None:
        hidden_states = hidden_states + self.mlp_output_bias
    return hidden_states


_LAYER_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[type, type] = {}


def pruned_layer_class(base: type) -> type:
    """Subclass of a family's decoder layer whose forward skips removed blocks."""
    if getattr(base, "_pgprune_pruned", False):
        return base
    if base not in _LAYER_CLASSES:
        _LAYER_CLASSES[base] = type(CLASS_PREFIX + base.__name__, (base,), {
            "forward": _pruned_layer_forward,
            "_pgprune_pruned": True,
            "__module__": __name__,
            "__doc__": f"{base.__name__} with per-layer widths and removable blocks (pgprune).",
        })
    return _LAYER_CLASSES[base]


def pruned_causal_lm_class(base: type) -> type:
    """Subclass of a family's CausalLM class that builds the widths recorded in config.pgprune.
    With a config that has no pgprune entry it is the plain dense model."""
    if getattr(base, "_pgprune_pruned", False):
        return base
    if base not in _MODEL_CLASSES:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            record = StructureRecord.of(config)
            if record is not None:
                build_structure(self, record)

        _MODEL_CLASSES[base] = type(CLASS_PREFIX + base.__name__, (base,), {
            "__init__": __init__,
            "_pgprune_pruned": True,
            "__module__": __name__,
            "__doc__": f"{base.__name__} pruned by pgprune: each decoder layer has its own widths.",
        })
    return _MODEL_CLASSES[base]


def __getattr__(name: str):
    # auto_map names a class such as "PgpruneLlamaForCausalLM"; build it on first access so that
    # this file serves every family transformers knows without listing them.
    if name.startswith(CLASS_PREFIX) and hasattr(transformers, name[len(CLASS_PREFIX):]):
        return pruned_causal_lm_class(getattr(transformers, name[len(CLASS_PREFIX):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- structure ------------------------------------------------------------------------------------
def _new_linear(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    w = old.weight
    return nn.Linear(in_features, out_features, bias=bias, device=w.device, dtype=w.dtype)


def _dims(config) -> tuple[int, int, int]:
    """(hidden_size, head_dim, query heads per KV head) of the dense layout."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.hidden_size, head_dim, heads // kv


def _set_attn_counts(attn: nn.Module, kv_heads: int, queries_per_kv: int) -> None:
    # Transformers versions before 4.48 read these in the attention forward; newer ones infer the
    # head count from the tensor shapes. num_key_value_groups never changes (whole groups go).
    if hasattr(attn, "num_heads"):
        attn.num_heads = kv_heads * queries_per_kv
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = kv_heads


def mark_layers(model: nn.Module, record: StructureRecord) -> None:
    """Give every decoder layer the pruned forward, its role names, its KV-cache slot and its
    constant block biases (parameters or None). Shapes must already match the record."""
    roles = record.roles
    layers = get_submodule_path(model, roles["layers"])
    slot = 0
    names = set()
    for layer in layers:
        layer.__class__ = pruned_layer_class(type(layer))
        names.add(type(layer).__name__)
        layer.pgprune_roles = dict(roles)
        attn = getattr(layer, roles["attn"])
        if attn is not None:
            attn.layer_idx = slot
            slot += 1
        for key in ("attn_output_bias", "mlp_output_bias"):
            if key not in layer._parameters:
                layer.register_parameter(key, None)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    model._no_split_modules = no_split | names


def build_structure(model: nn.Module, record: StructureRecord) -> None:
    """Rebuild a freshly constructed dense model at the widths recorded in `record` (weights are
    loaded afterwards by from_pretrained)."""
    roles = record.roles
    hidden, head_dim, g = _dims(model.config)
    layers = get_submodule_path(model, roles["layers"])
    if len(layers) != len(record.layers):
        raise StructureError(f"config.{CONFIG_KEY} describes {len(record.layers)} layers but the model has "
                             f"{len(layers)}; num_hidden_layers in config.json must count the kept layers")
    for layer, ls in zip(layers, record.layers):
        attn = getattr(layer, roles["attn"])
        kv = ls.num_key_value_heads
        if kv == 0:
            setattr(layer, roles["attn"], None)
        else:
            for role, out in (("q", kv * g * head_dim), ("k", kv * head_dim), ("v", kv * head_dim)):
                old = getattr(attn, roles[role])
                setattr(attn, roles[role], _new_linear(old, hidden, out, old.bias is not None))
            old = getattr(attn, roles["o"])
            setattr(attn, roles["o"], _new_linear(old, kv * g * head_dim, hidden, ls.o_proj_bias))
            _set_attn_counts(attn, kv, g)
        mlp = getattr(layer, roles["mlp"])
        ch = ls.intermediate_size
        if ch == 0:
            setattr(layer, roles["mlp"], None)
        else:
            for role in ("gate", "up"):
                old = getattr(mlp, roles[role])
                setattr(mlp, roles[role], _new_linear(old, hidden, ch, old.bias is not None))
            old = getattr(mlp, roles["down"])
            setattr(mlp, roles["down"], _new_linear(old, ch, hidden, ls.down_proj_bias))
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = ch
        ref = getattr(layer, roles["input_norm"]).weight
        for key in ("attn_output_bias", "mlp_output_bias"):
            param = nn.Parameter(torch.zeros(hidden, device=ref.device, dtype=ref.dtype)) if getattr(ls, key) else None
            layer.register_parameter(key, param)
    mark_layers(model, record)
