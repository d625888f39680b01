"""ModelAdapter: the only code that knows a model family's module names.

Everything else in pgprune (masks, gating, surgery, metrics, the policy-gradient loop) talks to a
model through an adapter. Widths are read from the weights, not the config, so the same adapter
describes a dense model and one whose layers were pruned to different widths.

Adding a family: subclass `ModelAdapter` (usually `LlamaFamilyAdapter` is enough when the module
names match), and decorate it with `@register_adapter("model_type", ...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from pgprune.errors import UnsupportedModelError

_ADAPTERS: dict[str, type["ModelAdapter"]] = {}


def register_adapter(*model_types: str) -> Callable[[type["ModelAdapter"]], type["ModelAdapter"]]:
    def wrap(cls: type[ModelAdapter]) -> type[ModelAdapter]:
        for t in model_types:
            _ADAPTERS[t] = cls
        cls.model_types = tuple(model_types)
        return cls

    return wrap


def supported_model_types() -> list[str]:
    _import_families()
    return sorted(_ADAPTERS)


def get_adapter(model: nn.Module) -> "ModelAdapter":
    """The adapter for `model`, chosen by `model.config.model_type`."""
    _import_families()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _ADAPTERS.get(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"pgprune has no adapter for model_type={model_type!r}. Supported: "
            f"{', '.join(sorted(_ADAPTERS))}. To add a family, write a ModelAdapter subclass in "
            "pgprune/models/<family>.py (see pgprune/models/llama.py) and register it with "
            "@register_adapter('<model_type>')."
        )
    return cls(model)


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes. Under an accelerate device_map with CPU/disk offload a module's
    weights wait on the meta device and its `_hf_hook` moves them in for each call: then the hook's
    execution device is the answer, not the device of its parameters."""
    dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if dev is not None:
        return torch.device(dev)
    p = next(module.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def read_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """`module.weight` (or another parameter, e.g. "bias"; detached), also for an offloaded
    device_map module whose weights wait on the meta device between calls: then a copy is brought
    to its execution device."""
    w = getattr(module, name)
    if w.device.type != "meta":
        return w.detach()
    from accelerate.utils import align_module_device

    with align_module_device(module):
        return getattr(module, name).detach().clone()


def _import_families() -> None:
    # Importing the family modules registers their adapters.
    from pgprune.models import llama  # noqa: F401


@dataclass
class LayerModules:
    """The modules of one decoder layer. `attn` / `mlp` are None when surgery removed that block."""

    layer: nn.Module
    attn: nn.Module | None
    mlp: nn.Module | None
    q_proj: nn.Linear | None
    k_proj: nn.Linear | None
    v_proj: nn.Linear | None
    o_proj: nn.Linear | None
    gate_proj: nn.Linear | None
    up_proj: nn.Linear | None
    down_proj: nn.Linear | None
    input_norm: nn.Module
    post_attention_norm: nn.Module


class ModelAdapter:
    """Family knowledge for one loaded model. Subclasses fill in the module names."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- whole-model modules -------------------------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed_tokens(self) -> nn.Module:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def lm_head(self) -> nn.Module:
        raise NotImplementedError

    def layer(self, i: int) -> LayerModules:
        raise NotImplementedError

    # --- shapes ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def head_dim(self) -> int:
        hd = getattr(self.config, "head_dim", None)
        return hd or self.config.hidden_size // self.config.num_attention_heads

    @property
    def dense_num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def dense_num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads

    @property
    def queries_per_kv(self) -> int:
        """Query heads sharing one KV head (1 for multi-head attention). Constant under pruning:
        a unit of kind `head` is a whole KV group."""
        return self.dense_num_heads // self.dense_num_kv_heads

    @property
    def dense_intermediate_size(self) -> int:
        return self.config.intermediate_size

    def num_kv_heads(self, i: int) -> int:
        """KV-head groups present in layer i (0 when its attention block was removed)."""
        k = self.layer(i).k_proj
        return 0 if k is None else k.out_features // self.head_dim

    def intermediate_size(self, i: int) -> int:
        """MLP channels present in layer i (0 when its MLP block was removed)."""
        up = self.layer(i).up_proj
        return 0 if up is None else up.out_features

    # --- parameter costs ---------------------------------------------------------------------
    def head_group_cost(self, i: int) -> int:
        """Parameters removed with one KV-head group of layer i: its K and V heads, the query
        heads that share them, their O columns, and their slices of q/k/v biases."""
        m = self.layer(i)
        hd, h, g = self.head_dim, self.hidden_size, self.queries_per_kv
        cost = (2 * g + 2) * hd * h
        for proj, heads in ((m.q_proj, g), (m.k_proj, 1), (m.v_proj, 1)):
            if proj is not None and proj.bias is not None:
                cost += heads * hd
        return cost

    def channel_cost(self, i: int) -> int:
        """Parameters removed with one MLP intermediate channel: a row of gate and up, a column
        of down, and their bias entries."""
        m = self.layer(i)
        cost = 3 * self.hidden_size
        for proj in (m.gate_proj, m.up_proj):
            if proj is not None and proj.bias is not None:
                cost += 1
        return cost

    @staticmethod
    def _numel(module: nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    def attn_params(self, i: int) -> int:
        return self._numel(self.layer(i).attn)

    def mlp_params(self, i: int) -> int:
        return self._numel(self.layer(i).mlp)

    def layer_params(self, i: int) -> int:
        return self._numel(self.layer(i).layer)

    def prunable_params(self) -> int:
        """Parameters inside the decoder layers (attention, MLP, their norms); DESIGN.md's
        denominator of sparsity. Embeddings, final norm and LM head are excluded."""
        return sum(self.layer_params(i) for i in range(self.num_layers))

    def total_params(self) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.model.parameters():  # tied embeddings count once
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    def describe(self) -> dict:
        return {
            "model_type": self.config.model_type,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "head_dim": self.head_dim,
            "num_heads": self.dense_num_heads,
            "num_kv_heads": self.dense_num_kv_heads,
            "intermediate_size": self.dense_intermediate_size,
            "prunable_params": self.prunable_params(),
            "total_params": self.total_params(),
        }

    @property
    def device(self) -> torch.device:
        return execution_device(self.embed_tokens())  # where inputs go
