"""Importance scores per prunable unit (higher = more important), one registry of methods.

| method            | needs data | kinds                          | score of a unit                                   |
|-------------------|------------|--------------------------------|---------------------------------------------------|
| `wanda-sp`        | yes        | channel, head, attn, mlp, layer | sum over the unit's input columns j of the output projection of mean_i |W_ij| * ||X_j|| |
| `flap`            | yes        | channel, head, attn, mlp, layer | fluctuation: Var(X_j) * ||W_:,j||^2 (squared for heads, as FLAP) |
| `magnitude`       | no         | channel, head, attn, mlp, layer | L2 norm of all weights of the unit               |
| `random`          | no         | channel, head, attn, mlp, layer | uniform noise from (seed, layer, kind)           |
| `block-influence` | yes        | attn, mlp, layer                | ShortGPT: 1 - mean over tokens of cos(block input, block output) |
| `obs`             | yes        | channel, head                   | error its removal adds, the rest refit (structured OBS) |

X_j is input feature j of o_proj (heads) or down_proj (channels) on the calibration windows;
||X_j|| is its root mean square over tokens (the token count only rescales). A head is a KV-head
group: its score sums the columns of all query heads sharing the KV head. Block kinds (`attn`,
`mlp`, `layer`) sum the unit scores of the block (`layer` = attn + mlp), except block-influence
and magnitude which measure the block itself; flap's block scores sum the unsquared fluctuations.

Standardised scores (used by the global allocation, one threshold across layers and kinds):
(s - mean) / std over all units of a kind; `flap` follows its paper's reference instead and
standardises per layer (heads: the squared feature metrics are standardised over the layer's
o_proj inputs, then averaged over the group's features); `obs`'s errors are already in one unit
(squared error on the residual stream), so its global order is error per parameter removed. Its
errors come from `reconstruction.removal_errors`: the output error a unit's removal adds when the
layer's other inputs are refit by least squares, units removed greedily cheapest first.
`obs` reads the full input covariances, which `run_metric` collects one layer at a time and drops
once the layer is scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from pgprune.errors import ConfigError
from pgprune.masks import UNIT_KINDS, UnitCosts, parse_unit_kinds
from pgprune.metrics.calibration import LayerStats, collect_layer_stats
from pgprune.models.adapter import ModelAdapter, get_adapter, read_weight

ScoreFn = Callable[[ModelAdapter, int, "LayerStats | None", tuple, int], dict]


@dataclass(frozen=True)
class MetricMethod:
    name: str
    layer_scores: ScoreFn  # (adapter, layer, stats or None, kinds, seed) -> {kind: [units]}
    needs_calibration: bool
    kinds: tuple[str, ...]
    # Optional per-layer standardised scores for the global search (otherwise: per kind).
    layer_standardized: ScoreFn | None = None
    # The reference recipe's propagation of calibration data under a uniform allocation.
    uniform_propagate: str = "dense"
    # The reference recipe's allocation of channel / head units: what allocation="auto" picks.
    allocation: str = "uniform"
    # Scores read the inputs' full covariance (`FeatureStats.comoment`), not only means and variances.
    needs_covariance: bool = False
    # Raw scores share one unit across layers and kinds: the global order is score per parameter removed.
    global_per_param: bool = False
    bias_compensation: bool = False
    description: str = ""


@dataclass
class Scores:
    """Scores of every unit: `raw[kind]` and `standardized[kind]` are float64 `[L, units]`
    tensors, NaN where a unit does not exist (narrower or removed blocks)."""

    method: str
    raw: dict[str, torch.Tensor]
    standardized: dict[str, torch.Tensor]
    stats: list[LayerStats] | None = field(default=None, repr=False)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in UNIT_KINDS if k in self.raw)


# --- per-layer building blocks ------------------------------------------------------------------
def _weights(proj) -> torch.Tensor:
    return read_weight(proj).float()


def _blocks(kinds, attn: torch.Tensor | None, mlp: torch.Tensor | None, out: dict) -> dict:
    nan = torch.tensor([float("nan")], dtype=torch.float64)
    a = nan if attn is None else attn.reshape(1).double()
    m = nan if mlp is None else mlp.reshape(1).double()
    if "attn" in kinds:
        out["attn"] = a
    if "mlp" in kinds:
        out["mlp"] = m
    if "layer" in kinds:
        parts = [t for t in (attn, mlp) if t is not None]
        out["layer"] = nan if not parts else sum(t.reshape(1).double() for t in parts)
    return out


def _need_stats(stats: LayerStats | None, method: str) -> LayerStats:
    if stats is None:
        raise ConfigError(f"method {method!r} needs calibration data; pass calibration windows")
    return stats


def _wanda_features(proj, fs) -> torch.Tensor:
    """Per input column j: mean_i |W_ij| * rms(X_j)."""
    return (_weights(proj).abs().mean(0).double() * fs.mean_square.sqrt()).cpu()


def _flap_features(proj, fs) -> torch.Tensor:
    """Per input column j: Var(X_j) * ||W_:,j||^2 (FLAP's weighted input feature variance)."""
    return (fs.variance * _weights(proj).pow(2).sum(0).double()).cpu()


def _unit_scores(adapter, i, stats, kinds, features: Callable, head_transform=None) -> dict:
    m = adapter.layer(i)
    out: dict[str, torch.Tensor] = {}
    attn_total = mlp_total = None
    if m.o_proj is not None:
        f = features(m.o_proj, stats.attn_in).cpu()
        attn_total = f.sum()
        if "head" in kinds:
            h = f if head_transform is None else head_transform(f)
            out["head"] = adapter.reduce_head_groups(h, "o")
    elif "head" in kinds:
        out["head"] = torch.empty(0, dtype=torch.float64)
    if m.down_proj is not None:
        f = features(m.down_proj, stats.mlp_in).cpu()
        mlp_total = f.sum()
        if "channel" in kinds:
            out["channel"] = f
    elif "channel" in kinds:
        out["channel"] = torch.empty(0, dtype=torch.float64)
    return _blocks(kinds, attn_total, mlp_total, out)


def _wanda_sp(adapter, i, stats, kinds, seed) -> dict:
    return _unit_scores(adapter, i, _need_stats(stats, "wanda-sp"), kinds, _wanda_features)


def _flap(adapter, i, stats, kinds, seed) -> dict:
    return _unit_scores(adapter, i, _need_stats(stats, "flap"), kinds, _flap_features,
                        head_transform=lambda f: f.pow(2))


def _standardize_1d(x: torch.Tensor) -> torch.Tensor:
    if x.numel() < 2:
        return torch.zeros_like(x)
    sd = x.std()
    return torch.zeros_like(x) if not torch.isfinite(sd) or sd == 0 else (x - x.mean()) / sd


def _flap_standardized(adapter, i, stats, kinds, seed) -> dict:
    """FLAP's structure search: metrics standardised within each layer (heads at feature level)."""
    stats = _need_stats(stats, "flap")
    m = adapter.layer(i)
    out: dict[str, torch.Tensor] = {}
    if "head" in kinds:
        if m.o_proj is None:
            out["head"] = torch.empty(0, dtype=torch.float64)
        else:
            f = _standardize_1d(_flap_features(m.o_proj, stats.attn_in).pow(2))
            out["head"] = adapter.reduce_head_groups(f, "o", mean=True)
    if "channel" in kinds:
        out["channel"] = (torch.empty(0, dtype=torch.float64) if m.down_proj is None
                          else _standardize_1d(_flap_features(m.down_proj, stats.mlp_in)))
    return out  # block kinds: standardised per kind across layers by the caller


def _magnitude(adapter, i, stats, kinds, seed) -> dict:
    m = adapter.layer(i)
    out: dict[str, torch.Tensor] = {}
    attn_sq = mlp_sq = None
    if m.o_proj is not None:
        rows = {role: _weights(proj).pow(2).sum(1) for role, proj in (("q", m.q_proj), ("k", m.k_proj),
                                                                     ("v", m.v_proj))}
        rows["o"] = _weights(m.o_proj).pow(2).sum(0)  # o_proj: a group owns input columns
        per_head = sum(adapter.reduce_head_groups(x, role) for role, x in rows.items()).double()
        out["head"] = per_head.sqrt()
        attn_sq = per_head.sum()
    else:
        out["head"] = torch.empty(0, dtype=torch.float64)
    if m.down_proj is not None:
        per_ch = (_weights(m.gate_proj).pow(2).sum(1) + _weights(m.up_proj).pow(2).sum(1)
                  + _weights(m.down_proj).pow(2).sum(0)).double()
        out["channel"] = per_ch.sqrt()
        mlp_sq = per_ch.sum()
    else:
        out["channel"] = torch.empty(0, dtype=torch.float64)
    out = {k: v for k, v in out.items() if k in kinds}
    sq = lambda t: None if t is None else t.sqrt()  # noqa: E731
    out = _blocks(kinds, sq(attn_sq), sq(mlp_sq), out)
    if "layer" in kinds:
        parts = [t for t in (attn_sq, mlp_sq) if t is not None]
        out["layer"] = (torch.tensor([float("nan")], dtype=torch.float64) if not parts
                        else sum(parts).reshape(1).sqrt())
    return out


def _obs(adapter, i, stats, kinds, seed) -> dict:
    from pgprune.reconstruction import check_finite, removal_errors

    stats = _need_stats(stats, "obs")
    m = adapter.layer(i)
    out = {}
    for kind, block, proj, fs, width in (("head", "attn", m.o_proj, stats.attn_in, adapter.head_group_width("o")),
                                         ("channel", "mlp", m.down_proj, stats.mlp_in, 1)):
        if kind not in kinds:
            continue
        if proj is None:
            out[kind] = torch.empty(0, dtype=torch.float64)
            continue
        check_finite(fs, i, block)
        out[kind] = removal_errors(read_weight(proj), fs, width).cpu()  # refuses statistics without covariances
    return out


def _random(adapter, i, stats, kinds, seed) -> dict:
    out = {}
    for kind in kinds:
        width = {"head": adapter.num_kv_heads(i), "channel": adapter.intermediate_size(i)}.get(kind, 1)
        present = {"attn": adapter.layer(i).o_proj is not None, "mlp": adapter.layer(i).down_proj is not None}
        if kind in present and not present[kind] or (kind == "layer" and not any(present.values())):
            out[kind] = torch.tensor([float("nan")], dtype=torch.float64)
            continue
        # One stream per (seed, layer, kind): reproducible whatever else is scored.
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + i * 101 + UNIT_KINDS.index(kind))
        out[kind] = torch.rand(width, generator=gen, dtype=torch.float64)
    return out


def _block_influence(adapter, i, stats, kinds, seed) -> dict:
    stats = _need_stats(stats, "block-influence")
    m = adapter.layer(i)
    attn = None if m.o_proj is None else torch.tensor(1.0 - stats.mean_cos("attn"))
    mlp = None if m.down_proj is None else torch.tensor(1.0 - stats.mean_cos("mlp"))
    out = _blocks(kinds, attn, mlp, {})
    if "layer" in kinds:
        out["layer"] = torch.tensor([1.0 - stats.mean_cos("layer")], dtype=torch.float64)
    return out


METHODS: dict[str, MetricMethod] = {
    "wanda-sp": MetricMethod("wanda-sp", _wanda_sp, True, UNIT_KINDS, uniform_propagate="pruned",
                             description="structured Wanda: |W| x ||X|| of the output projection's "
                                         "input columns, summed per unit"),
    "flap": MetricMethod("flap", _flap, True, UNIT_KINDS, layer_standardized=_flap_standardized,
                         allocation="global", bias_compensation=True,
                         description="FLAP: fluctuation Var(X) x ||W||^2 with bias compensation"),
    "magnitude": MetricMethod("magnitude", _magnitude, False, UNIT_KINDS,
                              description="L2 norm of the unit's weights"),
    "random": MetricMethod("random", _random, False, UNIT_KINDS, description="seeded uniform noise"),
    "block-influence": MetricMethod("block-influence", _block_influence, True, ("attn", "mlp", "layer"),
                                    allocation="global",
                                    description="ShortGPT: 1 - cos(block input, block output)"),
    "obs": MetricMethod("obs", _obs, True, ("channel", "head"), needs_covariance=True, global_per_param=True,
                        description="structured OBS: the error a unit's removal adds with the rest of "
                                    "the layer refit by least squares (greedy)"),
}


def get_method(name: str) -> MetricMethod:
    if name not in METHODS:
        raise ConfigError(f"unknown metric method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def check_kinds(method: MetricMethod, kinds) -> tuple[str, ...]:
    kinds = parse_unit_kinds(kinds)
    bad = [k for k in kinds if k not in method.kinds]
    if bad:
        raise ConfigError(f"method {method.name!r} cannot score unit kind(s) {', '.join(bad)}; it scores "
                          f"{', '.join(method.kinds)}")
    return kinds


# --- assembling [L, units] tensors ------------------------------------------------------------------
def _stack(rows: list[torch.Tensor]) -> torch.Tensor:
    width = max([r.numel() for r in rows] + [1])
    out = torch.full((len(rows), width), float("nan"), dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r.double().cpu()
    return out


def standardize_per_kind(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the finite entries of x (all layers of one kind); NaN stays NaN."""
    ok = torch.isfinite(x)
    out = torch.full_like(x, float("nan"))
    out[ok] = _standardize_1d(x[ok])
    return out


def layer_scores(method: str | MetricMethod, adapter: ModelAdapter, i: int, stats: LayerStats | None,
                 kinds, seed: int = 0) -> dict[str, torch.Tensor]:
    """Raw scores of layer i only (used while walking the layers with pruned propagation)."""
    m = method if isinstance(method, MetricMethod) else get_method(method)
    return m.layer_scores(adapter, i, stats, check_kinds(m, kinds), seed)


def scores_from_stats(adapter: ModelAdapter, stats: list[LayerStats] | None, method: str, kinds,
                      seed: int = 0, per_layer: list[dict] | None = None) -> Scores:
    """per_layer: each layer's raw scores when already computed (by a walk that scored each layer as
    its statistics completed and then dropped their covariances)."""
    m = get_method(method)
    kinds = check_kinds(m, kinds)
    if m.needs_calibration and stats is None:
        raise ConfigError(f"method {method!r} needs calibration windows (calib_ids)")
    L = adapter.num_layers
    if per_layer is None:
        per_layer = [m.layer_scores(adapter, i, None if stats is None else stats[i], kinds, seed) for i in range(L)]
    raw = {k: _stack([d[k] for d in per_layer]) for k in kinds}
    std = {k: standardize_per_kind(v) for k, v in raw.items()}
    if m.global_per_param:
        costs = UnitCosts.from_adapter(adapter)
        std = {k: v / costs.unit_cost(k).double() for k, v in raw.items()}
    if m.layer_standardized is not None:
        per_layer_std = [m.layer_standardized(adapter, i, stats[i], kinds, seed) for i in range(L)]
        for k in kinds:
            if k in per_layer_std[0]:
                std[k] = _stack([d[k] for d in per_layer_std])
    return Scores(method=method, raw=raw, standardized=std, stats=stats)


def compute_scores(model, calib_ids: torch.Tensor | None, method: str, kinds=("channel", "head"), *,
                   batch_size: int = 8, seed: int = 0, progress: bool = True,
                   storage_device=None) -> Scores:
    """Scores of every unit of `kinds` by `method`, with dense propagation of the calibration
    windows (each layer sees the unpruned model's activations)."""
    m = get_method(method)
    check_kinds(m, kinds)
    adapter = get_adapter(model)
    stats = None
    if m.needs_calibration:
        if calib_ids is None:
            raise ConfigError(f"method {method!r} needs calibration windows (calib_ids); "
                              "get them from pgprune.data.get_calibration_windows(...)")
        stats = collect_layer_stats(model, calib_ids, batch_size=batch_size, progress=progress,
                                    storage_device=storage_device, adapter=adapter)
    return scores_from_stats(adapter, stats, method, kinds, seed)
