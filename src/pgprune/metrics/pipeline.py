"""Prune with a metric, end to end: calibration -> scores -> allocation (-> FLAP biases).

`metric_masks(...) -> (masks, output_bias or None, info)` is the one-call API; the masks and
biases go straight into `pgprune.surgery.remove_units(model, masks, output_bias=...)`.
`run_metric(...)` returns the same plus the `Allocation` and `Scores`, which the
policy-gradient method needs to build its initial probabilities (`pgprune.policy.initial_probabilities`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from pgprune.errors import ConfigError, DataError
from pgprune.masks import BLOCK_KINDS, Masks, UnitCosts, parse_unit_kinds
from pgprune.budget import check_kept_widths, check_sparsity, check_width_multiple, round_widths
from pgprune.metrics.allocation import (ALLOCATIONS, Allocation, _removed_counts, allocate, layers_first,
                                        lowest_in_layer, uniform_plan)
from pgprune.metrics.calibration import LayerEdit, LayerStats, collect_layer_stats
from pgprune.metrics.scores import Scores, check_kinds, get_method, layer_scores, scores_from_stats
from pgprune.models.adapter import get_adapter
from pgprune.reconstruction import (bias_params_added, compensation_biases, feature_means,
                                    layer_compensation_biases)


@dataclass
class MetricResult:
    masks: Masks
    output_bias: dict[str, torch.Tensor] | None  # {"attn"|"mlp": [L, hidden]} for surgery, or None
    allocation: Allocation  # the scores' allocation, before any width rounding (PG starts from it)
    scores: Scores
    info: dict
    dense_stats: list[LayerStats] | None = None  # the calibration statistics, when dense-propagated (reusable)
    layer_influence: torch.Tensor | None = None  # [L] block influence, when whole layers were removed first


def resolve_allocation(method: str, allocation: str, kinds) -> str:
    """`auto`: the method's reference allocation (FLAP's global structure search, ShortGPT's global
    layer ranking, Wanda-sp's uniform widths) -- but uniform when channels / heads share the budget
    with whole blocks, where a global order removes layers the model cannot do without
    (bench/RESULTS.md), and global for whole blocks alone (what `allocate` does for them either way).
    Any other value is checked and returned."""
    if allocation == "auto":
        kinds = parse_unit_kinds(kinds)
        blocks = [k in BLOCK_KINDS for k in kinds]
        if all(blocks):
            return "global"
        return "uniform" if any(blocks) else get_method(method).allocation
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation must be auto or one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    return allocation


def _walks_fine_kinds(allocation: str, kinds) -> bool:
    """Whether a pruned-propagation walk can decide each layer as it goes: a uniform allocation of
    channel / head units (their per-layer counts known up front; beside them every block is kept)."""
    return allocation == "uniform" and any(k not in BLOCK_KINDS for k in kinds)


def _default_propagate(method, allocation: str, kinds) -> str:
    return method.uniform_propagate if _walks_fine_kinds(allocation, kinds) else "dense"


def run_metric(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    method: str,
    sparsity: float,
    kinds=("channel", "head"),
    allocation: str = "auto",
    *,
    batch_size: int = 8,
    propagate: str | None = None,
    bias_compensation: bool | None = None,
    seed: int = 0,
    tolerance: float | None = None,
    nsamples: int | None = None,
    storage_device=None,
    progress: bool = True,
    stats: list[LayerStats] | None = None,
    width_multiple: int = 1,
    remove_layers: int | None = None,
) -> MetricResult:
    """Scores, allocation and (for FLAP) compensation biases; the model is not modified.

    allocation: uniform, global, or auto (the method's reference: `resolve_allocation`).

    propagate: "dense" (each layer's statistics come from the unpruned model) or "pruned" (each
    layer sees the outputs of the already pruned layers before it, as in Wanda; only with a
    uniform allocation of channel/head units, whose per-layer counts are known up front).
    Default: the method's reference recipe (wanda-sp + uniform: pruned; otherwise dense).
    bias_compensation: default True for flap, False otherwise; needs calibration windows.
    stats: dense statistics from an earlier `collect_layer_stats(model, calib_ids)` to reuse (they
    do not depend on the method or the budget); only with propagate="dense".
    width_multiple: N > 1 rounds every kept MLP width to a multiple of N by the method's own
    (standardised) scores (`budget.round_widths`); `masks`, the biases and `info` are the rounded
    ones, `allocation` the one before rounding. With pruned propagation the walk prunes the
    unrounded counts: later layers' scores see the earlier layers before rounding.
    remove_layers: N (0 included) removes the N layers of lowest block influence (ShortGPT, read from the same
    dense statistics) first and gives the rest of the budget to the method's channel / head order over the kept
    layers (`allocation.layers_first`); `kinds` must then be channel and/or head beside layer. Every layer's
    influence comes back with the result: `remove_layers_first` re-allocates it for another N without a pass.
    None: no layer is removed first (layer units, if any, are allocated like the others)."""
    t0 = time.perf_counter()
    m = get_method(method)
    kinds = parse_unit_kinds(kinds)
    layer_first = remove_layers is not None
    if layer_first:
        kinds = check_layers_first(kinds, propagate)
    kinds = check_kinds(m, kinds)
    target = check_sparsity(sparsity)
    allocation = resolve_allocation(method, allocation, kinds)
    propagate = propagate or ("dense" if layer_first else _default_propagate(m, allocation, kinds))
    if propagate == "pruned" and not _walks_fine_kinds(allocation, kinds):
        raise ConfigError("propagate='pruned' needs allocation='uniform' with channel/head units: "
                          "a global or block-only allocation is known only after every layer is scored; "
                          "use propagate='dense'")
    compensate = m.bias_compensation if bias_compensation is None else bool(bias_compensation)
    if calib_ids is not None and nsamples is not None:
        if nsamples < 1 or nsamples > calib_ids.shape[0]:
            raise DataError(f"nsamples={nsamples} but only {calib_ids.shape[0]} calibration windows were "
                            "given; ask get_calibration_windows for more windows or lower nsamples")
        calib_ids = calib_ids[:nsamples]
    need_stats = m.needs_calibration or compensate or layer_first
    if stats is not None:
        if propagate != "dense":
            raise ConfigError("precomputed stats are dense statistics; they cannot serve propagate='pruned'")
        if len(stats) != get_adapter(model).num_layers:
            raise ConfigError(f"stats cover {len(stats)} layers, the model has {get_adapter(model).num_layers}")
    if need_stats and calib_ids is None and stats is None:
        why = f"method {method!r}" if m.needs_calibration else "bias compensation"
        raise ConfigError(f"{why} needs calibration windows (calib_ids); get them from "
                          "pgprune.data.get_calibration_windows(...)")

    adapter = get_adapter(model)
    costs = UnitCosts.from_adapter(adapter)
    multiple = check_width_multiple(width_multiple, costs)
    # refuse before calibrating (with layers first the kept layers keep more: round_widths checks them)
    if multiple > 1 and allocation == "uniform" and "channel" in kinds and not layer_first:
        plan = uniform_plan(costs, kinds, target, tolerance=tolerance)
        check_kept_widths(costs.intermediate - plan.counts["channel"], multiple)
    if stats is not None and m.needs_covariance and not _hold_covariances(stats):
        stats = None  # reuse is only a saving: collect them with covariances
    reused = stats is not None
    walk_masks: dict[int, dict[str, torch.Tensor]] = {}
    per_layer: dict[int, dict] = {}
    if need_stats and stats is None:
        on_layer = None
        if propagate == "pruned":
            plan = uniform_plan(costs, kinds, target, tolerance=tolerance)  # fails fast if unreachable
            on_layer = _pruning_walker(m, adapter, seed, plan, compensate, walk_masks, per_layer)
        elif m.needs_covariance:
            on_layer = _scoring_walker(m, adapter, kinds, seed, per_layer)
        stats = collect_layer_stats(model, calib_ids, batch_size=batch_size, propagate=propagate,
                                    on_layer=on_layer, storage_device=storage_device, progress=progress,
                                    adapter=adapter, covariance=m.needs_covariance)
    scores = scores_from_stats(adapter, stats if m.needs_calibration else None, method, kinds, seed,
                               per_layer=[per_layer[i] for i in range(len(stats))] if per_layer else None)
    influence = None
    if layer_first:
        influence = scores_from_stats(adapter, stats, "block-influence", ("layer",)).raw["layer"][:, 0]
        alloc = layers_first(scores, influence, costs, target, allocation, remove_layers, tolerance=tolerance)
    else:
        alloc = allocate(scores, costs, target, allocation, tolerance=tolerance)
    if walk_masks:  # the walk pruned with the same plan and scores; make sure nothing drifted
        for i, keep in walk_masks.items():
            for kind, k in keep.items():
                if not torch.equal(alloc.masks[kind][i, : k.numel()], k):
                    raise RuntimeError(f"internal error: layer {i} {kind} mask differs between the walk "
                                       "and the final allocation")
    masks, rounding = _round(alloc, costs, multiple, target)
    bias = compensation_biases(adapter, feature_means(stats), masks, costs) if compensate else None
    info = {
        "method": method,
        "allocation": allocation,
        "unit_kinds": list(kinds) + (["layer"] if layer_first else []),
        "remove_layers": _layers_first_info(alloc) if layer_first else None,
        "target_sparsity": target,
        "width_multiple": multiple,
        **_mask_info(alloc, masks, rounding, costs),
        "propagate": propagate if need_stats else None,
        "bias_compensation": compensate,
        "bias_params_added": bias_params_added(adapter, masks, costs, bias),
        "calibration": None if not need_stats else {
            "nsamples": None if calib_ids is None else int(calib_ids.shape[0]),
            "seqlen": None if calib_ids is None else int(calib_ids.shape[1]),
            "tokens": stats[0].tokens, "batch_size": batch_size, "reused_stats": reused},
        "seed": seed,
        "seconds": time.perf_counter() - t0,
    }
    return MetricResult(masks=masks, output_bias=bias, allocation=alloc, scores=scores, info=info,
                        dense_stats=stats if need_stats and propagate == "dense" else None, layer_influence=influence)


def _round(alloc: Allocation, costs: UnitCosts, multiple: int, target: float) -> tuple[Masks, dict | None]:
    """The allocation's masks with every kept MLP width rounded to `multiple` (and what rounding did), or as
    they are for 1."""
    if multiple == 1:
        return alloc.masks, None
    masks, rounding = round_widths(alloc.masks, alloc.keys, costs, multiple, target)
    return masks, rounding.to_dict()


def _mask_info(alloc: Allocation, masks: Masks, rounding: dict | None, costs: UnitCosts) -> dict:
    """What `info` says of the final (possibly rounded) masks."""
    return {"sparsity": float(masks.sparsity(costs)), "width_rounding": rounding,
            "removed_units": _removed_counts(masks, costs) if rounding else alloc.removed,
            "masks": masks.summary(costs)}


def _layers_first_info(alloc: Allocation) -> dict:
    layers = (~alloc.masks["layer"][:, 0]).nonzero().flatten().tolist()
    return {"count": len(layers), "by": "block-influence", "layers": layers}


def remove_layers_first(result: MetricResult, n_layers: int, costs: UnitCosts, *,
                        tolerance: float | None = None) -> MetricResult:
    """`result` (a `run_metric(..., remove_layers=...)` result) with `n_layers` layers removed first instead:
    the same scores and block influence allocated again, as `run_metric(..., remove_layers=n_layers)` would,
    without a calibration pass (rounded to the result's width multiple). Not for compensated results (their
    biases belong to the old mask)."""
    if result.layer_influence is None:
        raise ConfigError("remove_layers_first needs a run_metric result that removed whole layers first")
    if result.output_bias is not None:
        raise ConfigError("remove_layers_first cannot move compensation biases: run_metric with "
                          "bias_compensation=False, or run it again for this count")
    info = result.info
    alloc = layers_first(result.scores, result.layer_influence, costs, info["target_sparsity"], info["allocation"],
                         n_layers, tolerance=tolerance)
    masks, rounding = _round(alloc, costs, info["width_multiple"], info["target_sparsity"])
    info = {**info, "remove_layers": _layers_first_info(alloc), **_mask_info(alloc, masks, rounding, costs)}
    return MetricResult(masks=masks, output_bias=None, allocation=alloc, scores=result.scores, info=info,
                        dense_stats=result.dense_stats, layer_influence=result.layer_influence)


def check_layers_first(kinds: tuple[str, ...], propagate: str | None) -> tuple[str, ...]:
    """The channel / head kinds that meet the rest of the budget once whole layers are removed first."""
    fine = tuple(k for k in kinds if k in ("channel", "head"))
    if "layer" not in kinds or not fine or set(kinds) - {"channel", "head", "layer"}:
        raise ConfigError(f"removing whole layers first (--remove-layers) needs --units layer beside channel and/or "
                          f"head, nothing else (got {','.join(kinds)})")
    if propagate not in (None, "dense"):
        raise ConfigError("removing whole layers first scores every unit on the dense model's statistics: "
                          "propagate='pruned' cannot be combined with it")
    return fine


def _hold_covariances(stats: list[LayerStats]) -> bool:
    return all(fs is None or fs.comoment is not None for st in stats for fs in (st.attn_in, st.mlp_in))


def _drop_covariances(st: LayerStats) -> None:
    """A layer's input covariances are in_features^2 float64 each: a covariance-reading method scores
    the layer as soon as its statistics are complete and keeps only means and variances."""
    st.attn_in = None if st.attn_in is None else st.attn_in.without_covariance()
    st.mlp_in = None if st.mlp_in is None else st.mlp_in.without_covariance()


def _scoring_walker(m, adapter, kinds, seed, record: dict):
    """on_layer callback of a dense walk for a covariance-reading method: score layer i into
    `record[i]`, then drop its covariances."""

    def on_layer(i: int, st: LayerStats) -> None:
        record[i] = layer_scores(m, adapter, i, st, kinds, seed)
        _drop_covariances(st)

    return on_layer


def _pruning_walker(m, adapter, seed, plan, compensate: bool, record: dict, scored: dict):
    """on_layer callback of a uniform pruned-propagation walk: prune each layer's lowest-scoring
    units by the plan's counts (and compensate), remembering the masks in `record` (and, for a
    covariance-reading method, the scores in `scored`, its covariances then dropped)."""

    fine = tuple(plan.counts)  # blocks, if any, are all kept

    def on_layer(i: int, st: LayerStats) -> LayerEdit:
        sc = layer_scores(m, adapter, i, st if m.needs_calibration else None, fine, seed)
        if m.needs_covariance:
            scored[i] = sc
            _drop_covariances(st)
        keep = {}
        for kind in fine:
            width = adapter.num_kv_heads(i) if kind == "head" else adapter.intermediate_size(i)
            keep[kind] = lowest_in_layer(sc[kind], int(plan.counts[kind][i]), width)
        record[i] = keep
        edit = LayerEdit(head_keep=keep.get("head"), channel_keep=keep.get("channel"))
        if compensate:
            edit.attn_bias, edit.mlp_bias = layer_compensation_biases(adapter, st, i, keep)
        return edit

    return on_layer


def metric_masks(model: nn.Module, calib_ids: torch.Tensor | None, method: str, sparsity: float,
                      kinds=("channel", "head"), allocation: str = "auto", **kwargs):
    """(masks, output_bias or None, info): see `run_metric` for the options. Feed the first two
    to `pgprune.surgery.remove_units(model, masks, output_bias=output_bias)`."""
    r = run_metric(model, calib_ids, method, sparsity, kinds, allocation, **kwargs)
    return r.masks, r.output_bias, r.info
