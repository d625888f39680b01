"""Gated forward: run the unchanged model as if units were pruned, for K masks in one batch.

Hooks multiply activations by 0/1 keep-masks, so no weight is copied or changed:
- heads: the input of o_proj (the concatenated head outputs), per KV group (a KV head and the
  query heads that share it; which columns a group owns is the adapter's `expand_head_mask`);
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

Mean fill (`fill=`, FLAP's bias compensation seen from the inside): a dropped input feature of
o_proj / down_proj is replaced by its calibration mean instead of zero, so the gated model computes
what `surgery.remove_units(..., output_bias=reconstruction.compensation_biases(...))` computes. A
removed layer then adds its mean update (both blocks mean-filled) to the residual stream, unless
no kept layer precedes it: surgery folds that constant into the previous kept layer's output. The
policy-gradient loop uses it to choose masks for the compensated model it will export.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from pgprune.errors import ConfigError
from pgprune.masks import Masks, UnitCosts
from pgprune.models.adapter import ModelAdapter, execution_device, get_adapter, read_weight


def _num_masks(masks: Masks) -> int:
    return masks.num_masks or 1


class _Multiplier:
    """x -> x * keep (+ offset): a [K, D] keep-mask (and optional [K, D] offset) applied to a
    [K*B, ..., D] activation; mask k scales rows k*B..(k+1)*B-1.

    `prepared` is the mask already on the module's device and dtype (see `_prepare`), so a hook
    never copies from the host in the middle of a forward (a synchronous copy would stall the GPU
    queue at every layer). Other devices / dtypes are converted on first use and cached."""

    def __init__(self, keep: torch.Tensor, num_masks: int, device: torch.device | None, dtype: torch.dtype | None,
                 offset: torch.Tensor | None = None):
        self.keep = keep  # [K, D] bool, on the CPU
        self.offset = offset  # [K, D] float or None, on the CPU
        self.k = num_masks
        self.device, self.dtype = device, dtype
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def host_tensors(self) -> list[torch.Tensor]:
        return [self.keep] if self.offset is None else [self.keep, self.offset]

    def set_prepared(self, tensors: list[torch.Tensor]) -> None:
        self._cache[(tensors[0].device, tensors[0].dtype)] = (tensors[0], tensors[1] if len(tensors) > 1 else None)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n % self.k:
            raise ConfigError(f"a gated forward with K={self.k} masks needs a batch of K*B rows; got {n} rows")
        prepared = self._cache.get((x.device, x.dtype))
        if prepared is None:
            self.set_prepared([t.to(device=x.device, dtype=x.dtype) for t in self.host_tensors()])
            prepared = self._cache[(x.device, x.dtype)]
        shape = (self.k,) + (1,) * (x.dim() - 1) + (x.shape[-1],)
        m, offset = prepared
        y = x.view(self.k, n // self.k, *x.shape[1:]) * m.view(shape)
        if offset is not None:
            y = y + offset.view(shape)
        return y.view(x.shape)


def _prepare(mults: list[_Multiplier]) -> None:
    """Move all masks (and offsets) to their modules' devices in one copy per (device, dtype)."""
    groups: dict[tuple, list[_Multiplier]] = {}
    for mult in mults:
        if mult.device is not None and mult.device.type != "meta":
            groups.setdefault((mult.device, mult.dtype), []).append(mult)
    for (device, dtype), members in groups.items():
        host = [t for mult in members for t in mult.host_tensors()]
        flat = torch.cat([t.reshape(-1).float() for t in host]).to(device=device).to(dtype)
        offset = 0
        for mult in members:
            moved = []
            for t in mult.host_tensors():
                moved.append(flat[offset:offset + t.numel()].view(t.shape))
                offset += t.numel()
            mult.set_prepared(moved)


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
          adapter: ModelAdapter | None = None, fill: dict[str, list] | None = None) -> Iterator[nn.Module]:
    """Within the block, `model` computes as if the units that `masks` drops were removed.

    `masks`: one mask ([L, units] per kind) or K stacked masks ([K, L, units]); with K masks the
    batch must hold K*B rows, mask k applying to rows k*B..(k+1)*B-1. `costs` (from
    `UnitCosts.from_adapter`) can be passed to save recomputing it on every call. Hooks are
    removed on exit, also when the body raises. Works under no_grad / inference_mode, in any
    dtype, and with device_map models (masks follow each activation's device).
    `fill`: {"attn": [L] means of o_proj's input, "mlp": [L] means of down_proj's input}
    (`reconstruction.feature_means`): dropped features take these values (mean fill, see the
    module doc), also in removed layers that have a kept layer before them.
    """
    adapter = adapter or get_adapter(model)
    costs = costs or UnitCosts.from_adapter(adapter)
    masks.check(costs)
    masks = masks.to("cpu")
    k = _num_masks(masks)
    eff = masks.effective(costs)
    if masks.num_masks is None:
        eff = {kind: t.unsqueeze(0) for kind, t in eff.items()}  # [1, L, ...]
    hooks: list[tuple[nn.Module, str, _Multiplier]] = []

    def add(module: nn.Linear, where: str, keep: torch.Tensor, offset: torch.Tensor | None = None) -> None:
        w = module.weight
        hooks.append((module, where, _Multiplier(keep.contiguous(), k, w.device, w.dtype, offset)))

    filled = eff["layer"]  # [K, L]: layers whose dropped features take their mean (fill)
    if fill is not None:  # also removed layers that have a kept layer before them (module doc)
        filled = filled | ((torch.cumsum(eff["layer"].long(), dim=1) - eff["layer"].long()) > 0)

    def add_gates(proj: nn.Linear, keep: torch.Tensor, block_keep: torch.Tensor, block: str, i: int) -> None:
        fills = filled[:, i, None]  # [K, 1]
        if not bool(keep.all()):
            offset = None
            if fill is not None:
                mean = fill[block][i].detach().float().cpu().reshape(1, -1)
                offset = (~keep & fills) * mean
            add(proj, "pre", keep, offset)
        if proj.bias is not None and not bool(block_keep.all()):
            # A dropped block adds nothing: zero its output (the bias too). A mean-filled block
            # becomes the constant W @ mean, so only its bias is taken off.
            gone = ~block_keep[:, None].expand(k, proj.out_features)
            if fill is None:
                add(proj, "post", ~gone)
            else:
                bias = read_weight(proj, "bias").float().cpu().reshape(1, -1)
                add(proj, "post", ~gone | fills, (gone & fills) * -bias)

    for i in range(costs.num_layers):
        m = adapter.layer(i)
        if m.o_proj is not None:
            heads = eff["head"][:, i, : int(costs.num_kv_heads[i])]
            add_gates(m.o_proj, adapter.expand_head_mask(heads, "o"), eff["attn"][:, i], "attn", i)
        if m.down_proj is not None:
            chans = eff["channel"][:, i, : int(costs.intermediate[i])]
            add_gates(m.down_proj, chans, eff["mlp"][:, i], "mlp", i)
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
                 costs: UnitCosts | None = None, fill: dict[str, list] | None = None) -> torch.Tensor:
    """Logits [K*B, T, V] of `input_ids` [K*B, T] under K masks (or [B, T, V] for one mask).
    Materialises all logits: for losses use `masked_losses`."""
    adapter = get_adapter(model)
    with gated(model, masks, costs=costs, adapter=adapter, fill=fill):
        return model(input_ids=input_ids.to(_input_device(adapter)), use_cache=False).logits


@torch.no_grad()
def masked_losses(model: nn.Module, input_ids: torch.Tensor, masks: Masks, *,
                  costs: UnitCosts | None = None, fill: dict[str, list] | None = None) -> torch.Tensor:
    """Mean causal-LM loss of the batch `input_ids` [B, T] under each of K masks: float32 [K].

    The batch is repeated K times and run in one gated forward; the LM head and the fp32 cross
    entropy run over a few thousand tokens at a time, so the full [K*B, T, V] logits never exist.
    Loss k averages over the B*(T-1) predicted tokens, as `model(..., labels=input_ids).loss` does.
    `fill`: mean fill of the dropped features (see `gated`).
    """
    from pgprune.lm_loss import nll_from_hidden

    _check_input_ids(input_ids, "masked_losses")
    adapter = get_adapter(model)
    k = _num_masks(masks)
    ids = input_ids.to(_input_device(adapter)).repeat(k, 1)  # row k*B + b holds sample b
    with gated(model, masks, costs=costs, adapter=adapter, fill=fill):
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    nll = nll_from_hidden(hidden, ids, adapter.lm_head())
    return nll.view(k, -1).mean(dim=1)


@torch.no_grad()
def gathered_losses(model: nn.Module, input_ids: torch.Tensor, masks: Masks, *,
                    costs: UnitCosts | None = None, fill: dict[str, list] | None = None, refit=None) -> torch.Tensor:
    """`masked_losses` computed the other way: for each of the K masks, gather the kept rows and
    columns into a pruned view of the model (`surgery.pruned_view`) and run the B rows through it.
    Does less arithmetic when many units are dropped but copies the kept weights of every sample
    (one pruned copy alive at a time); which is faster depends on the device: bench/gating_cost.py.
    With `fill`, each view gets the matching compensation biases (the same function as `gated`);
    with `refit` (mask -> `reconstruction.Refit`), each view gets its own refit (least squares)."""
    from pgprune.lm_loss import token_nll
    from pgprune.reconstruction import Refit, compensation_biases
    from pgprune.surgery import pruned_view

    _check_input_ids(input_ids, "gathered_losses")
    adapter = get_adapter(model)
    costs = costs or UnitCosts.from_adapter(adapter)
    masks.check(costs)
    stack = masks if masks.num_masks is not None else Masks.stack([masks])
    ids = input_ids.to(_input_device(adapter))
    losses = []
    for j in range(stack.num_masks):
        mask = stack.select(j)
        # the mean fill is the refit with output biases only
        r = refit(mask) if refit is not None else \
            Refit(output_bias=None if fill is None else compensation_biases(adapter, fill, mask, costs))
        view = pruned_view(model, mask, output_bias=r.output_bias, input_weights=r.input_weights)
        losses.append(token_nll(view, ids).mean())
    return torch.stack(losses).float()


# How the policy-gradient loop evaluates the K masks of a step (`--forward`).
FORWARDS = {"gated": masked_losses, "gathered": gathered_losses}
