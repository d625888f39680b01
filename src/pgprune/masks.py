"""`Masks`: which units of a model are kept.

A unit kind maps to a boolean tensor of shape `[num_layers, units]` (or `[K, num_layers, units]`
for K sampled masks at once):

| kind      | units per layer          | removes                                                    |
|-----------|--------------------------|------------------------------------------------------------|
| `channel` | MLP intermediate size    | a row of gate and up, a column of down                     |
| `head`    | KV-head groups           | a K and a V head, the query heads sharing them, O columns  |
| `attn`    | 1                        | the whole attention block of the layer                     |
| `mlp`     | 1                        | the whole MLP block of the layer                           |
| `layer`   | 1                        | the whole decoder layer                                    |

Kinds nest: a head is kept only if its attention block and its layer are kept, and a block whose
heads (channels) are all pruned is removed as a whole. A kind absent from `Masks` keeps everything.
Sparsity is the fraction of prunable parameters (everything inside the decoder layers) removed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pgprune import atomic
from pgprune.errors import CheckpointError, ConfigError
from pgprune.models.adapter import ModelAdapter

UNIT_KINDS = ("channel", "head", "attn", "mlp", "layer")
BLOCK_KINDS = ("attn", "mlp", "layer")


def parse_unit_kinds(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    kinds = [k.strip() for k in spec.split(",")] if isinstance(spec, str) else list(spec)
    kinds = [k for k in kinds if k]
    unknown = [k for k in kinds if k not in UNIT_KINDS]
    if unknown or not kinds:
        raise ConfigError(f"unknown unit kind(s) {unknown or spec!r}; choose from {', '.join(UNIT_KINDS)}")
    return tuple(k for k in UNIT_KINDS if k in kinds)  # canonical order, no duplicates


@dataclass(frozen=True)
class UnitCosts:
    """Exact parameter accounting of a model's prunable units (read off an adapter once)."""

    num_layers: int
    num_kv_heads: torch.Tensor  # [L] long: KV groups present per layer
    intermediate: torch.Tensor  # [L] long: MLP channels present per layer
    head_cost: torch.Tensor  # [L] params per KV group
    channel_cost: torch.Tensor  # [L] params per channel
    attn_fixed: torch.Tensor  # [L] attention params not owned by any head (o bias, q/k norms)
    mlp_fixed: torch.Tensor  # [L] MLP params not owned by any channel (down bias)
    layer_fixed: torch.Tensor  # [L] layer params outside both blocks (the two norms)
    outside_params: int  # parameters outside the decoder layers (embeddings, final norm, head)

    @classmethod
    def from_adapter(cls, adapter: ModelAdapter) -> "UnitCosts":
        L = adapter.num_layers
        g = [adapter.num_kv_heads(i) for i in range(L)]
        ch = [adapter.intermediate_size(i) for i in range(L)]
        hc = [adapter.head_group_cost(i) for i in range(L)]
        cc = [adapter.channel_cost(i) for i in range(L)]
        attn = [adapter.attn_params(i) for i in range(L)]
        mlp = [adapter.mlp_params(i) for i in range(L)]
        lay = [adapter.layer_params(i) for i in range(L)]
        t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        return cls(
            num_layers=L,
            num_kv_heads=t(g),
            intermediate=t(ch),
            head_cost=t(hc),
            channel_cost=t(cc),
            attn_fixed=t([a - n * c for a, n, c in zip(attn, g, hc)]),
            mlp_fixed=t([m - n * c for m, n, c in zip(mlp, ch, cc)]),
            layer_fixed=t([l - a - m for l, a, m in zip(lay, attn, mlp)]),
            outside_params=adapter.total_params() - sum(lay),
        )

    @property
    def prunable_params(self) -> int:
        return int((self.layer_fixed + self.attn_fixed + self.mlp_fixed
                    + self.num_kv_heads * self.head_cost + self.intermediate * self.channel_cost).sum())

    def units_per_layer(self, kind: str) -> int:
        if kind == "head":
            return int(self.num_kv_heads.max())
        if kind == "channel":
            return int(self.intermediate.max())
        return 1

    def present(self, kind: str) -> torch.Tensor:
        """[L, units] True where unit j of `kind` exists in layer i (head / channel widths differ by layer)."""
        widths = {"head": self.num_kv_heads, "channel": self.intermediate}.get(kind)
        if widths is None:
            return torch.ones(self.num_layers, 1, dtype=torch.bool)
        return _present(widths, self.units_per_layer(kind))

    def unit_cost(self, kind: str) -> torch.Tensor:
        """[L, units] parameters removed by each unit of `kind` alone (block kinds: the whole block)."""
        L = self.num_layers
        if kind == "head":
            return self.head_cost[:, None].expand(L, self.units_per_layer("head")).clone()
        if kind == "channel":
            return self.channel_cost[:, None].expand(L, self.units_per_layer("channel")).clone()
        attn = self.attn_fixed + self.num_kv_heads * self.head_cost
        mlp = self.mlp_fixed + self.intermediate * self.channel_cost
        block = {"attn": attn, "mlp": mlp, "layer": attn + mlp + self.layer_fixed}[kind]
        return block[:, None].clone()


@dataclass
class Masks:
    """Boolean keep-masks per unit kind, `[L, units]` each, or `[K, L, units]` for K samples."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # The file the masks were read from (set by `load`), so a mismatch can name it.
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for kind, t in self.tensors.items():
            if kind not in UNIT_KINDS:
                raise ConfigError(f"unknown unit kind {kind!r}; choose from {', '.join(UNIT_KINDS)}")
            self.tensors[kind] = t.bool()

    @classmethod
    def full(cls, costs: UnitCosts, kinds: tuple[str, ...] | list[str], batch: int | None = None) -> "Masks":
        lead = () if batch is None else (batch,)
        return cls({k: torch.ones(*lead, costs.num_layers, costs.units_per_layer(k), dtype=torch.bool)
                    for k in kinds})

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in UNIT_KINDS if k in self.tensors)

    @property
    def num_masks(self) -> int | None:
        """K for stacked masks, None for a single mask."""
        t = next(iter(self.tensors.values()), None)
        return None if t is None or t.dim() == 2 else t.shape[0]

    def __getitem__(self, kind: str) -> torch.Tensor:
        return self.tensors[kind]

    def select(self, k: int) -> "Masks":
        """The k-th mask of a stack."""
        return Masks({kind: t[k] for kind, t in self.tensors.items()}, self.source)

    @classmethod
    def stack(cls, masks: list["Masks"]) -> "Masks":
        return cls({kind: torch.stack([m[kind] for m in masks]) for kind in masks[0].kinds})

    def to(self, device) -> "Masks":
        return Masks({k: t.to(device) for k, t in self.tensors.items()}, self.source)

    def check(self, costs: UnitCosts) -> None:
        """Raise ConfigError unless every kind has shape [L, units] or [K, L, units] for the model
        `costs` describes (the same K for all kinds)."""
        where = f" in {self.source}" if self.source else ""
        hint = ("the masks were made for another model (or for this one before it was pruned); make them "
                "for this model with `pgprune prune`")
        lead = None
        for kind, t in self.tensors.items():
            layers, units = costs.num_layers, costs.units_per_layer(kind)
            if t.dim() not in (2, 3):
                raise ConfigError(f"the {kind!r} mask{where} has shape {tuple(t.shape)}; a mask is [layers, units] "
                                  "or [K, layers, units]")
            if t.shape[-2] != layers:
                raise ConfigError(f"the {kind!r} mask{where} describes {t.shape[-2]} decoder layers but the model "
                                  f"has {layers}; {hint}")
            if t.shape[-1] != units:
                raise ConfigError(f"the {kind!r} mask{where} has {t.shape[-1]} units per layer but the model has "
                                  f"{units} (shape {tuple(t.shape)}, needed [{layers}, {units}] or "
                                  f"[K, {layers}, {units}]); {hint}")
            k = t.shape[0] if t.dim() == 3 else None
            if lead is not None and k != lead[1]:
                raise ConfigError(f"mask kinds{where} disagree on K: {lead[0]!r} has {lead[1]}, {kind!r} has {k}")
            lead = (kind, k)

    # --- what is really kept -------------------------------------------------------------------
    def effective(self, costs: UnitCosts) -> dict[str, torch.Tensor]:
        """Keep-masks after nesting: {'head': [..., L, G], 'channel': [..., L, I], 'attn': [..., L],
        'mlp': [..., L], 'layer': [..., L]}. Padding units (beyond a layer's real width) are False.
        A block with no head / channel left is removed, and a layer with both blocks removed is
        removed too."""
        lead = () if self.num_masks is None else (self.num_masks,)
        L = costs.num_layers
        device = next(iter(self.tensors.values())).device if self.tensors else torch.device("cpu")

        def get(kind: str) -> torch.Tensor:
            if kind in self.tensors:
                return self.tensors[kind]
            return torch.ones(*lead, L, costs.units_per_layer(kind), dtype=torch.bool, device=device)

        layer = get("layer")[..., 0]
        heads = get("head") & costs.present("head").to(device)
        chans = get("channel") & costs.present("channel").to(device)
        attn = get("attn")[..., 0] & layer & heads.any(-1)
        mlp = get("mlp")[..., 0] & layer & chans.any(-1)
        heads = heads & attn[..., None]
        chans = chans & mlp[..., None]
        layer = attn | mlp
        return {"head": heads, "channel": chans, "attn": attn, "mlp": mlp, "layer": layer}

    def kept_prunable_params(self, costs: UnitCosts) -> torch.Tensor:
        """Exact prunable parameters of the pruned model (a scalar, or [K] for a stack)."""
        e = {k: v.cpu() for k, v in self.effective(costs).items()}
        per_layer = (
            e["layer"] * costs.layer_fixed
            + e["attn"] * costs.attn_fixed
            + e["mlp"] * costs.mlp_fixed
            + e["head"].sum(-1) * costs.head_cost
            + e["channel"].sum(-1) * costs.channel_cost
        )
        return per_layer.sum(-1)

    def sparsity(self, costs: UnitCosts) -> float | torch.Tensor:
        """Fraction of the prunable parameters removed (DESIGN.md)."""
        s = 1.0 - self.kept_prunable_params(costs).double() / costs.prunable_params
        return float(s) if s.dim() == 0 else s

    def summary(self, costs: UnitCosts) -> dict:
        e = self.effective(costs)
        kept = int(self.kept_prunable_params(costs))
        total_prunable = costs.prunable_params
        total = total_prunable + costs.outside_params
        return {
            "kinds": list(self.kinds),
            "prunable_params": total_prunable,
            "kept_prunable_params": kept,
            "sparsity": 1.0 - kept / total_prunable,
            "total_params": total,
            "kept_total_params": kept + costs.outside_params,
            "total_sparsity": (total_prunable - kept) / total,
            "kv_heads_per_layer": e["head"].sum(-1).tolist(),
            "channels_per_layer": e["channel"].sum(-1).tolist(),
            "layers_kept": int(e["layer"].sum()),
        }

    # --- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        with atomic.temp_path(path) as tmp:
            save_file({k: t.to(torch.uint8).contiguous() for k, t in self.tensors.items()}, str(tmp),
                      metadata={"pgprune": json.dumps(metadata or {})})

    @classmethod
    def load(cls, path: str | Path) -> "Masks":
        """Read a file written by `save`. A file that is not one (not safetensors, truncated, no
        mask tensors, unknown kinds, non-0/1 values) raises CheckpointError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"mask file {path} does not exist; masks are written by `pgprune prune` "
                              "as masks.safetensors in the run folder")
        how = ("pass the masks.safetensors of a `pgprune prune` run folder (or a file written by "
               "pgprune.masks.Masks.save)")
        try:
            raw = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"mask file {path} is not a readable safetensors file (damaged, truncated or "
                                  f"another format: {e}); {how}") from e
        if not raw:
            raise CheckpointError(f"mask file {path} holds no mask tensors; {how}")
        unknown = sorted(k for k in raw if k not in UNIT_KINDS)
        if unknown:
            raise CheckpointError(f"mask file {path} holds tensors {unknown} that are no unit kind (expected "
                                  f"{', '.join(UNIT_KINDS)}); {how}")
        for kind, t in raw.items():
            if t.dim() not in (2, 3) or t.dtype not in (torch.uint8, torch.bool) or bool((t.to(torch.uint8) > 1).any()):
                raise CheckpointError(f"mask file {path}: the {kind!r} tensor ({t.dtype}, shape {tuple(t.shape)}) is "
                                      "not a 0/1 mask of shape [layers, units] or [K, layers, units]; " + how)
        return cls({k: t.bool() for k, t in raw.items()}, str(path))


def _present(widths: torch.Tensor, units: int) -> torch.Tensor:
    """[L, units] True where unit j exists in layer i (layers may have different widths)."""
    return torch.arange(units)[None, :] < widths[:, None]
