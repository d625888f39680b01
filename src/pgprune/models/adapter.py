"""ModelAdapter: the only code that knows a model family's module names.

Everything else in pgprune (masks, gating, surgery, metrics, the policy-gradient loop) talks to a
model through an adapter. Widths are read from the weights, not the config, so the same adapter
describes a dense model and one whose layers were pruned to different widths.

Adding a family: subclass `ModelAdapter` (usually `LlamaFamilyAdapter` is enough when the module
names match) in `pgprune/models/<family>.py`, decorate it with `@register_adapter("model_type", ...)`
and import that module in `pgprune/models/__init__.py`. The package imports every family before any
of its modules runs, so the registry is complete whenever `get_adapter` is called, and this module
never imports a family (which would import it back).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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


def get_adapter(model: nn.Module) -> "ModelAdapter":
    """The adapter for `model`, chosen by `model.config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _ADAPTERS.get(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"pgprune has no adapter for model_type={model_type!r}. Supported: "
            f"{', '.join(sorted(_ADAPTERS))}. To add a family, write a ModelAdapter subclass in "
            "pgprune/models/<family>.py (see pgprune/models/llama.py), register it with "
            "@register_adapter('<model_type>') and import it in pgprune/models/__init__.py."
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


class ModelAdapter(ABC):
    """Family knowledge for one loaded model.

    A subclass must implement the five abstract methods below (the module names of its family);
    everything else has a default for the LLaMA layout (pre-norm decoder layers, q/k/v/o and
    gate/up/down projections, grouped-query attention with consecutive head blocks) that a family
    with another layout overrides: the shapes, the KV-head group layout and the parameter costs."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- whole-model modules (required) --------------------------------------------------------
    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The ModuleList of decoder layers, in order (surgery deletes entries from it)."""

    @abstractmethod
    def embed_tokens(self) -> nn.Module:
        """The token embedding; its execution device is where input ids go."""

    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm after the last decoder layer (calibration stops the forward pass in front of it)."""

    @abstractmethod
    def lm_head(self) -> nn.Module:
        """The output projection from hidden states to vocabulary logits."""

    @abstractmethod
    def layer(self, i: int) -> LayerModules:
        """The modules of decoder layer i, read afresh on every call; a block that surgery removed
        is None, and so are its projections."""

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
        return 0 if k is None else k.out_features // self.head_group_width("k")

    # --- KV-head groups: the rows / columns a unit of kind `head` owns ---------------------------
    # Decided here once; surgery (slicing), gating (o_proj input mask), calibration (layer edits),
    # the metric scores and the compensation all ask these methods. LLaMA layout (transformers'
    # repeat_kv): query head h reads KV head h // queries_per_kv, so group j owns one consecutive
    # block of rows in q_proj, k_proj and v_proj and the block of o_proj input columns that matches
    # its q rows.
    def head_group_width(self, role: str) -> int:
        """How many rows of q_proj ("q"), k_proj ("k") or v_proj ("v"), or input columns of o_proj
        ("o"), one KV-head group owns."""
        queries = self.queries_per_kv * self.head_dim
        return {"q": queries, "o": queries, "k": self.head_dim, "v": self.head_dim}[role]

    def head_group_indices(self, groups: torch.Tensor, role: str) -> torch.Tensor:
        """Long [len(groups) * width]: the rows ("q", "k", "v") or o_proj input columns ("o") owned
        by the KV-head groups `groups` (a long tensor of group indices), group by group in order."""
        width = self.head_group_width(role)
        groups = groups.long().cpu()
        return (groups[:, None] * width + torch.arange(width)[None, :]).reshape(-1)

    def expand_head_mask(self, keep: torch.Tensor, role: str = "o") -> torch.Tensor:
        """[..., G] per KV-head group -> [..., G * width] per row / column of `role` (each group's
        value repeated over the rows / columns it owns); e.g. a keep-mask over groups becomes the
        keep-mask over o_proj's input features."""
        return keep.repeat_interleave(self.head_group_width(role), dim=-1)

    def reduce_head_groups(self, x: torch.Tensor, role: str = "o", mean: bool = False) -> torch.Tensor:
        """[G * width] per row / column of `role` -> [G]: the sum (or with `mean` the mean) over the
        rows / columns each KV-head group owns (per-feature scores -> per-group scores)."""
        per_group = x.reshape(-1, self.head_group_width(role))
        return per_group.mean(-1) if mean else per_group.sum(-1)

    def intermediate_size(self, i: int) -> int:
        """MLP channels present in layer i (0 when its MLP block was removed)."""
        up = self.layer(i).up_proj
        return 0 if up is None else up.out_features

    # --- parameter costs ---------------------------------------------------------------------
    def head_group_cost(self, i: int) -> int:
        """Parameters removed with one KV-head group of layer i: its K and V heads, the query
        heads that share them, their O columns, and their slices of q/k/v biases."""
        m = self.layer(i)
        cost = sum(self.head_group_width(role) for role in "qkvo") * self.hidden_size
        for proj, role in ((m.q_proj, "q"), (m.k_proj, "k"), (m.v_proj, "v")):
            if proj is not None and proj.bias is not None:
                cost += self.head_group_width(role)
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

    # --- GGUF (llama.cpp) -------------------------------------------------------------------
    def gguf_unsupported(self) -> str | None:
        """Why pgprune's GGUF writer (`pgprune.gguf_export`, llama.cpp's `deci` graph: pre-norm
        RMSNorm layers, rotary attention with optional q/k/v/o biases, SiLU-gated MLP) cannot
        represent this model, or None when it can. A family that fits overrides this and
        `gguf_rope_halves`."""
        return (f"pgprune writes GGUF files for the LLaMA layout only; model_type={self.config.model_type!r} "
                "has no GGUF mapping")

    def gguf_hparams(self) -> dict:
        """{"context_length", "rms_norm_eps", "rope_theta"} for the GGUF header (LLaMA layout only)."""
        raise UnsupportedModelError(f"cannot write this model as GGUF: {self.gguf_unsupported()}")

    #: True when the family's rotary embedding pairs dimension j with j + head_dim/2 of each head
    #: (transformers' rotate_half); llama.cpp's `deci` pairs 2j with 2j+1, so the q/k rows of each
    #: head are reordered on export.
    gguf_rope_halves: ClassVar[bool] = True

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
