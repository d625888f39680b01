"""Surgery: physically remove the units a mask drops, giving each layer its own widths.

`remove_units(model, masks)` works IN PLACE (pass `copy=True` for a pruned deep copy;
`pruned_view(model, masks)` copies only the kept rows / columns of the sliced projections and
shares every other tensor with the unchanged `model`):
- a dropped KV group loses its K and V rows, the rows of the query heads sharing it, their
  q/k/v bias entries (Qwen2 has them) and the matching o_proj input columns;
- a dropped MLP channel loses its gate and up rows (and biases) and its down_proj column;
- a block with no head / channel left, or dropped by a block mask, is removed (the module becomes
  None and the layer's forward skips it); its pre-norm weight stays with the layer, as the
  parameter accounting in `pgprune.masks` counts it with the layer;
- a layer whose two blocks are gone is removed; the remaining layers are renumbered and only the
  layers that still have attention own a KV-cache slot (0..A-1), so generation with a cache works.

Nesting and exact parameter counts follow `Masks.effective` / `Masks.kept_prunable_params`, and
the result computes the same function as the gated forward (`pgprune.gating`) with that mask.

Bias compensation (FLAP): `output_bias={"attn": [L, hidden], "mlp": [L, hidden]}` adds a vector
to the output of each kept block's o_proj / down_proj (creating the bias if the layer had none;
each non-zero vector adds `hidden` parameters). For a removed block of a kept layer the vector is
kept as a constant added to the residual stream (`attn_output_bias` / `mlp_output_bias`); a
non-zero vector for a removed layer is an error. All-zero vectors are ignored.

The pruned model's config records its structure in `config.pgprune` (a
`pruned_modeling.StructureRecord`, stored in its JSON form), `num_hidden_layers` counts the kept
layers and `layer_types` is sliced to them; pruning an already pruned model composes (source layer
indices and the dense parameter counts are carried over).
"""

from __future__ import annotations

import copy as copy_module
import itertools

import torch
from torch import nn

from pgprune.errors import ConfigError, UnsupportedModelError
from pgprune.masks import Masks, UnitCosts
from pgprune.models import pruned_modeling as pm
from pgprune.models.adapter import ModelAdapter, get_adapter
from pgprune.models.structure import read_structure


def is_pruned(model: nn.Module) -> bool:
    """Whether `model` (or its config) carries a pgprune structure record."""
    config = getattr(model, "config", model)
    return bool(getattr(config, pm.CONFIG_KEY, None))


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    for name, mod in parent.named_children():
        if mod is child:
            return name
    raise UnsupportedModelError(f"cannot find {type(child).__name__} among the children of {type(parent).__name__}")


def _module_path(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise UnsupportedModelError(f"cannot find {type(target).__name__} inside the model")


def discover_roles(model: nn.Module, adapter: ModelAdapter) -> dict:
    """Module names of the layout, read off the adapter's modules (the adapter stays the only
    code that knows them; they are recorded so the exported modeling file can find them)."""
    for i in range(adapter.num_layers):
        m = adapter.layer(i)
        if m.attn is not None and m.mlp is not None:
            break
    else:
        raise UnsupportedModelError("no layer with both blocks to read module names from; prune the dense model")
    return {
        "layers": _module_path(model, adapter.decoder_layers()),
        "attn": _child_name(m.layer, m.attn),
        "mlp": _child_name(m.layer, m.mlp),
        "input_norm": _child_name(m.layer, m.input_norm),
        "post_norm": _child_name(m.layer, m.post_attention_norm),
        "q": _child_name(m.attn, m.q_proj),
        "k": _child_name(m.attn, m.k_proj),
        "v": _child_name(m.attn, m.v_proj),
        "o": _child_name(m.attn, m.o_proj),
        "gate": _child_name(m.mlp, m.gate_proj),
        "up": _child_name(m.mlp, m.up_proj),
        "down": _child_name(m.mlp, m.down_proj),
    }


@torch.no_grad()
def _slice_linear(lin: nn.Linear, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> None:
    """Keep rows `out_idx` and columns `in_idx` of a Linear, in place (the module object, and any
    hook on it, survives)."""
    w = lin.weight
    new = w.data
    if out_idx is not None:
        new = new.index_select(0, out_idx.to(w.device))
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, out_idx.to(w.device)).contiguous(),
                                    requires_grad=lin.bias.requires_grad)
        lin.out_features = new.shape[0]
    if in_idx is not None:
        new = new.index_select(1, in_idx.to(w.device))
        lin.in_features = new.shape[1]
    lin.weight = nn.Parameter(new.contiguous(), requires_grad=w.requires_grad)


@torch.no_grad()
def _add_bias(lin: nn.Linear, bias: torch.Tensor) -> None:
    # A new tensor, never an in-place add: a pruned_view shares its biases with the source model.
    b = bias.to(device=lin.weight.device, dtype=lin.weight.dtype)
    new = b.clone() if lin.bias is None else lin.bias.detach() + b
    lin.bias = nn.Parameter(new, requires_grad=lin.weight.requires_grad)


def _check_bias(output_bias: dict | None, costs: UnitCosts, hidden: int) -> dict[str, torch.Tensor]:
    if not output_bias:
        return {}
    unknown = set(output_bias) - {"attn", "mlp"}
    if unknown:
        raise ConfigError(f"output_bias keys must be 'attn' and/or 'mlp'; got {sorted(unknown)}")
    out = {}
    for kind, t in output_bias.items():
        t = torch.as_tensor(t)
        if tuple(t.shape) != (costs.num_layers, hidden):
            raise ConfigError(f"output_bias[{kind!r}] must have shape [{costs.num_layers}, {hidden}] "
                              f"(layers, hidden size); got {tuple(t.shape)}")
        out[kind] = t.detach().cpu()
    return out


def pruned_view(model: nn.Module, masks: Masks, *, output_bias: dict[str, torch.Tensor] | None = None,
                input_weights: dict[str, dict[int, torch.Tensor]] | None = None) -> nn.Module:
    """The pruned model, sharing with `model` (left unchanged) every tensor surgery does not slice:
    only the kept rows / columns of the pruned projections are new memory."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return remove_units(copy_module.deepcopy(model, shared), masks, output_bias=output_bias,
                        input_weights=input_weights)


def remove_units(model: nn.Module, masks: Masks, *, output_bias: dict[str, torch.Tensor] | None = None,
                 input_weights: dict[str, dict[int, torch.Tensor]] | None = None, copy: bool = False) -> nn.Module:
    """Remove the units `masks` drops. In place unless `copy=True`; returns the pruned model.

    `masks` holds one mask ([L, units] per kind, or a stack of one). `output_bias`: optional
    FLAP-style compensation, {"attn"|"mlp": float tensor [L, hidden]} (see the module docstring).
    `input_weights`: {"attn"|"mlp": {layer: [hidden, kept inputs]}}, new kept columns of o_proj /
    down_proj (least-squares reconstruction, `reconstruction.Refit`); a layer not listed keeps its own.
    """
    if copy:
        model = copy_module.deepcopy(model)
    adapter = get_adapter(model)
    costs = UnitCosts.from_adapter(adapter)
    masks.check(costs)
    if masks.num_masks is not None:
        if masks.num_masks != 1:
            raise ConfigError(f"remove_units takes one mask; got a stack of {masks.num_masks}. "
                              "Pick one with masks.select(k)")
        masks = masks.select(0)
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ConfigError("the model has weights on the meta device (offloaded); load it fully onto "
                          "CPU/GPU memory before pruning")
    masks = masks.to("cpu")
    eff = masks.effective(costs)
    L = costs.num_layers
    if not bool(eff["layer"].any()):
        raise ConfigError("the mask removes every decoder layer; keep at least one unit")

    biases = _check_bias(output_bias, costs, adapter.hidden_size)
    old = read_structure(model, "the model to prune")  # pruning a pruned model composes
    roles = old.roles if old is not None else discover_roles(model, adapter)
    sources = old.source_layers if old is not None else list(range(L))
    dense = old.dense if old is not None and old.dense is not None else pm.DenseSizes(
        num_hidden_layers=L,
        num_key_value_heads=adapter.dense_num_kv_heads,
        num_attention_heads=adapter.dense_num_heads,
        intermediate_size=adapter.dense_intermediate_size,
        prunable_params=costs.prunable_params,
        total_params=costs.prunable_params + costs.outside_params,
    )

    new_layers, removed = [], []
    for i in range(L):
        m = adapter.layer(i)
        layer = m.layer
        b_attn = biases.get("attn", torch.zeros(L, 0))[i]
        b_mlp = biases.get("mlp", torch.zeros(L, 0))[i]
        nz_attn, nz_mlp = bool(b_attn.ne(0).any()), bool(b_mlp.ne(0).any())
        if not bool(eff["layer"][i]):
            if nz_attn or nz_mlp:
                raise ConfigError(f"layer {i} is removed but output_bias gives it a non-zero vector; keep the "
                                  "layer or pass a zero bias for it")
            removed.append(i)
            continue

        # attention: keep whole KV groups
        if bool(eff["attn"][i]):
            groups = eff["head"][i].nonzero().flatten()
            if len(groups) < int(costs.num_kv_heads[i]):
                for role, proj in (("q", m.q_proj), ("k", m.k_proj), ("v", m.v_proj)):
                    _slice_linear(proj, out_idx=adapter.head_group_indices(groups, role))
                _slice_linear(m.o_proj, in_idx=adapter.head_group_indices(groups, "o"))
                pm._set_attn_counts(m.attn, len(groups), adapter.queries_per_kv)
            _set_kept_columns(m.o_proj, input_weights, "attn", i)
            if nz_attn:
                _add_bias(m.o_proj, b_attn)
        else:
            setattr(layer, roles["attn"], None)
            if nz_attn:
                _add_layer_constant(layer, "attn_output_bias", b_attn)

        # MLP: keep channels
        if bool(eff["mlp"][i]):
            chans = eff["channel"][i].nonzero().flatten()
            if len(chans) < int(costs.intermediate[i]):
                _slice_linear(m.gate_proj, out_idx=chans)
                _slice_linear(m.up_proj, out_idx=chans)
                _slice_linear(m.down_proj, in_idx=chans)
                if hasattr(m.mlp, "intermediate_size"):
                    m.mlp.intermediate_size = len(chans)
            _set_kept_columns(m.down_proj, input_weights, "mlp", i)
            if nz_mlp:
                _add_bias(m.down_proj, b_mlp)
        else:
            setattr(layer, roles["mlp"], None)
            if nz_mlp:
                _add_layer_constant(layer, "mlp_output_bias", b_mlp)

        m = adapter.layer(i)  # re-read: blocks may be None now
        new_layers.append(pm.LayerRecord(
            source_layer=sources[i],
            num_key_value_heads=adapter.num_kv_heads(i),
            intermediate_size=adapter.intermediate_size(i),
            o_proj_bias=m.o_proj is not None and m.o_proj.bias is not None,
            down_proj_bias=m.down_proj is not None and m.down_proj.bias is not None,
            attn_output_bias=getattr(layer, "attn_output_bias", None) is not None,
            mlp_output_bias=getattr(layer, "mlp_output_bias", None) is not None,
        ))

    layers = adapter.decoder_layers()
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        kept_types = [t for j, t in enumerate(layer_types) if j not in removed]
        _check_cache_slots(kept_types, new_layers)
    for i in reversed(removed):
        del layers[i]  # ModuleList renumbers the rest
    if getattr(config, "is_heterogeneous", False):
        config.per_layer_config = None  # transformers' per-layer widths of the input: save_pruned writes new ones
    config.num_hidden_layers = len(layers)
    if layer_types is not None:
        config.layer_types = kept_types
    previously_removed = set(old.removed_layers) if old is not None else set()
    record = pm.StructureRecord(
        layers=tuple(new_layers), roles=roles, dense=dense,
        removed_layers=tuple(sorted(previously_removed | {sources[i] for i in removed})))
    setattr(config, pm.CONFIG_KEY, record.to_dict())  # the config holds the JSON form (config.json)
    pm.mark_layers(model, record)
    model.__class__ = pm.pruned_causal_lm_class(type(model))
    return model


@torch.no_grad()
def _set_kept_columns(lin: nn.Linear, input_weights: dict | None, block: str, i: int) -> None:
    new = (input_weights or {}).get(block, {}).get(i)
    if new is None:
        return
    if tuple(new.shape) != tuple(lin.weight.shape):
        raise ConfigError(f"input_weights[{block!r}][{i}] has shape {tuple(new.shape)}; the pruned projection's "
                          f"kept columns are {tuple(lin.weight.shape)}")
    # a new tensor, never in place: a pruned_view may share this weight with the source model
    lin.weight = nn.Parameter(new.to(device=lin.weight.device, dtype=lin.weight.dtype).contiguous(),
                              requires_grad=lin.weight.requires_grad)


def _add_layer_constant(layer: nn.Module, name: str, bias: torch.Tensor) -> None:
    ref = next(layer.parameters())
    b = bias.to(device=ref.device, dtype=ref.dtype)
    current = layer._parameters.get(name)
    new = b.clone() if current is None else current.detach() + b  # not in place: see _add_bias
    layer.register_parameter(name, nn.Parameter(new, requires_grad=ref.requires_grad))


def _check_cache_slots(kept_types: list, new_layers: list[pm.LayerRecord]) -> None:
    """Only layers with attention own a KV-cache slot, and transformers builds slot j's cache from
    layer_types[j]; with mixed sliding/full layers that only works if the types still line up."""
    attn_types = [t for t, ls in zip(kept_types, new_layers) if ls.num_key_value_heads > 0]
    if attn_types != kept_types[: len(attn_types)]:
        raise UnsupportedModelError(
            "this model mixes attention layer types (sliding / full) and the mask removes attention blocks "
            "so that KV-cache slots would get the wrong type; remove whole layers instead of attention "
            "blocks, or prune attention blocks only where the following layers have the same type")


def layer_widths(model: nn.Module) -> list[dict]:
    """Per decoder layer: source layer, KV groups, query heads, channels, parameters."""
    adapter = get_adapter(model)
    record = read_structure(model)
    src = record.source_layers if record is not None else list(range(adapter.num_layers))
    out = []
    for i in range(adapter.num_layers):
        kv = adapter.num_kv_heads(i)
        out.append({
            "layer": i,
            "source_layer": src[i],
            "kv_heads": kv,
            "heads": kv * adapter.queries_per_kv,
            "channels": adapter.intermediate_size(i),
            "attn_params": adapter.attn_params(i),
            "mlp_params": adapter.mlp_params(i),
            "params": adapter.layer_params(i),
        })
    return out
