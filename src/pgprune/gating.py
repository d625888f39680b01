"""Gated forward: run the unchanged model as if units were pruned, for K masks in one batch.

Hooks multiply activations by 0/1 keep-masks, so no weight is copied or changed:
- heads: the input of o_proj (the concatenated head outputs), per KV group (a KV head and the
  query heads that share it; query head h belongs to group h // queries_per_kv);
- channels: the input of down_proj (the MLP intermediate activations);
- attention / MLP blocks: all their heads / channels (plus, if o_proj / down_proj has a bias, the
  block output), so the block adds nothing to the residual stream;
- layers: both blocks, so the residual passes through unchanged.
Nesting follows `Masks.effective`: that is also what surgery removes, so a gated forward and the
surgically pruned model compute the same function (up to float summation order).

K masks at once: with a stacked `Masks` (leading dim K) the input batch is K*B rows and mask k
applies to rows k*B .. (k+1)*B-1. A single mask (no leading dim) is K = 1.

Multiplying by exactly 1 leaves a value unchanged, and layers whose units are all kept by every
mask get no hook at all, so an all-ones mask reproduces the dense logits bit for bit.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from pgprune.errors import ConfigError
from pgprune.masks import Masks, UnitCosts
from pgprune.models.adapter import ModelAdapter, execution_device, get_adapter


def check_masks(masks: Masks, costs: UnitCosts) -> None:
    """Raise ConfigError unless every kind in `masks` has shape [L, units] or [K, L, units] for
    this model."""
    lead = None
    for kind, t in masks.tensors.items():
        want = (costs.num_layers, costs.units_per_layer(kind))
        if t.dim() not in (2, 3) or tuple(t.shape[-2:]) != want:
            raise ConfigError(
                f"the {kind!r} mask has shape {tuple(t.shape)} but this model needs [{want[0]}, {want[1]}] "
                f"(or [K, {want[0]}, {want[1]}]); the masks were made for another model or before pruning")
        k = t.shape[0] if t.dim() == 3 else None
        if lead is not None and k != lead[1]:
            raise ConfigError(f"mask kinds disagree on K: {lead[0]!r} has {lead[1]}, {kind!r} has {k}")
        lead = (kind, k)


def _num_masks(masks: Masks) -> int:
    return masks.batch_size or 1


def _expand_heads(heads: torch.Tensor, width: int) -> torch.Tensor:
    """[K, G] group keep -> [K, width] o_proj input columns (each group owns width/G columns)."""
    per_group = width // heads.shape[-1]
    return heads.repeat_interleave(per_group, dim=-1)


class _Multiplier:
    """A [K, D] keep-mask applied to a [K*B, ..., D] activation (mask k scales rows k*B..(k+1)*B-1).

    `prepared` is the mask already on the module's device and dtype (see `_prepare`), so a hook
    never copies from the host in the middle of a forward (a synchronous copy would stall the GPU
    queue at every layer). Other devices / dtypes are converted on first use and cached."""

    def __init__(self, keep: torch.Tensor, num_masks: int, device: torch.device | None, dtype: torch.dtype | None):
        self.keep = keep  # [K, D] bool, on the CPU
        self.k = num_masks
        self.device, self.dtype = device, dtype
        self._cache: dict[tuple, torch.Tensor] = {}

    def set_prepared(self, m: torch.Tensor) -> None:
        self._cache[(m.device, m.dtype)] = m

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n % self.k:
            raise ConfigError(f"a gated forward with K={self.k} masks needs a batch of K*B rows; got {n} rows")
        m = self._cache.get((x.device, x.dtype))
        if m is None:
            m = self.keep.to(device=x.device, dtype=x.dtype)
            self._cache[(x.device, x.dtype)] = m
        m = m.view((self.k,) + (1,) * (x.dim() - 1) + (x.shape[-1],))
        return (x.view(self.k, n // self.k, *x.shape[1:]) * m).view(x.shape)


def _prepare(mults: list[_Multiplier]) -> None:
    """Move all masks to their modules' devices in one copy per (device, dtype)."""
    groups: dict[tuple, list[_Multiplier]] = {}
    for mult in mults:
        if mult.device is not None and mult.device.type != "meta":
            groups.setdefault((mult.device, mult.dtype), []).append(mult)
    for (device, dtype), members in groups.items():
        flat = torch.cat([mult.keep.reshape(-1) for mult in members]).to(device=device).to(dtype)
        offset = 0
        for mult in members:
            n = mult.keep.numel()
            mult.set_prepared(flat[offset:offset + n].view(mult.keep.shape))
            offset += n


def _pre_hook(mult: _Multiplier):
    def hook(module, args):
        return (mult.apply(args[0]),) + tuple(args[1:])

    return hook


def _post_hook(mult: _Multiplier):
    def hook(module, args, output):
        return mult.apply(output)

    return hook


@contextlib.contextmanager
def gated(model: nn.Module, masks: Masks, *, costs: UnitCosts | None = None,
          adapter: ModelAdapter | None = None) -> Iterator[nn.Module]:
    """Within the block, `model` computes as if the units that `masks` drops were removed.

    `masks`: one mask ([L, units] per kind) or K stacked masks ([K, L, units]); with K masks the
    batch must hold K*B rows, mask k applying to rows k*B..(k+1)*B-1. `costs` (from
    `UnitCosts.from_adapter`) can be passed to save recomputing it on every call. Hooks are
    removed on exit, also when the body raises. Works under no_grad / inference_mode, in any
    dtype, and with device_map models (masks follow each activation's device).
    """
    adapter = adapter or get_adapter(model)
    costs = costs or UnitCosts.from_adapter(adapter)
    check_masks(masks, costs)
    masks = masks.to("cpu")
    k = _num_masks(masks)
    eff = masks.effective(costs)
    if masks.batch_size is None:
        eff = {kind: t.unsqueeze(0) for kind, t in eff.items()}  # [1, L, ...]
    hooks: list[tuple[nn.Module, str, _Multiplier]] = []

    def add(module: nn.Linear, where: str, keep: torch.Tensor) -> None:
        w = module.weight
        hooks.append((module, where, _Multiplier(keep.contiguous(), k, w.device, w.dtype)))

    for i in range(costs.num_layers):
        m = adapter.layer(i)
        if m.o_proj is not None:
            heads = eff["head"][:, i, : int(costs.num_kv_heads[i])]
            if not bool(heads.all()):
                add(m.o_proj, "pre", _expand_heads(heads, m.o_proj.in_features))
            attn = eff["attn"][:, i]
            if m.o_proj.bias is not None and not bool(attn.all()):
                add(m.o_proj, "post", attn[:, None].expand(k, m.o_proj.out_features))
        if m.down_proj is not None:
            chans = eff["channel"][:, i, : int(costs.intermediate[i])]
            if not bool(chans.all()):
                add(m.down_proj, "pre", chans)
            mlp = eff["mlp"][:, i]
            if m.down_proj.bias is not None and not bool(mlp.all()):
                add(m.down_proj, "post", mlp[:, None].expand(k, m.down_proj.out_features))
    _prepare([mult for _, _, mult in hooks])
    handles = []
    try:
        for module, where, mult in hooks:
            if where == "pre":
                handles.append(module.register_forward_pre_hook(_pre_hook(mult)))
            else:
                handles.append(module.register_forward_hook(_post_hook(mult)))
        yield model
    finally:
        for h in handles:
            h.remove()


def _check_input_ids(input_ids: torch.Tensor, who: str) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ConfigError(f"{who} needs input_ids of shape [B, T] with T >= 2; got {tuple(input_ids.shape)}")


def _input_device(adapter: ModelAdapter) -> torch.device:
    return execution_device(adapter.embed_tokens())


@torch.no_grad()
def gated_logits(model: nn.Module, input_ids: torch.Tensor, masks: Masks, *,
                 costs: UnitCosts | None = None) -> torch.Tensor:
    """Logits [K*B, T, V] of `input_ids` [K*B, T] under K masks (or [B, T, V] for one mask).
    Materialises all logits: for losses use `masked_losses`."""
    adapter = get_adapter(model)
    with gated(model, masks, costs=costs, adapter=adapter):
        return model(input_ids=input_ids.to(_input_device(adapter)), use_cache=False).logits


@torch.no_grad()
def masked_losses(model: nn.Module, input_ids: torch.Tensor, masks: Masks, *,
                  costs: UnitCosts | None = None) -> torch.Tensor:
    """Mean causal-LM loss of the batch `input_ids` [B, T] under each of K masks: float32 [K].

    The batch is repeated K times and run in one gated forward; the LM head and the fp32 cross
    entropy run over a few thousand tokens at a time, so the full [K*B, T, V] logits never exist.
    Loss k averages over the B*(T-1) predicted tokens, as `model(..., labels=input_ids).loss` does.
    """
    from pgprune.lm_loss import nll_from_hidden

    _check_input_ids(input_ids, "masked_losses")
    adapter = get_adapter(model)
    k = _num_masks(masks)
    ids = input_ids.to(_input_device(adapter)).repeat(k, 1)  # row k*B + b holds sample b
    with gated(model, masks, costs=costs, adapter=adapter):
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    nll = nll_from_hidden(hidden, ids, adapter.lm_head())
    return nll.view(k, -1).mean(dim=1)


@torch.no_grad()
def gathered_losses(model: nn.Module, input_ids: torch.Tensor, masks: Masks, *,
                    costs: UnitCosts | None = None) -> torch.Tensor:
    """`masked_losses` computed the other way: for each of the K masks, gather the kept rows and
    columns into a pruned view of the model (`surgery.pruned_view`) and run the B rows through it.
    Does less arithmetic when many units are dropped but copies the kept weights of every sample
    (one pruned copy alive at a time); which is faster depends on the device: bench/gating_cost.py."""
    from pgprune.lm_loss import token_nll
    from pgprune.surgery import pruned_view

    _check_input_ids(input_ids, "gathered_losses")
    adapter = get_adapter(model)
    costs = costs or UnitCosts.from_adapter(adapter)
    check_masks(masks, costs)
    stack = masks if masks.batch_size is not None else Masks.stack([masks])
    ids = input_ids.to(_input_device(adapter))
    return torch.stack([token_nll(pruned_view(model, stack.select(j)), ids).mean()
                        for j in range(stack.batch_size)]).float()


# How the policy-gradient loop evaluates the K masks of a step (`--forward`).
FORWARDS = {"gated": masked_losses, "gathered": gathered_losses}
