"""Reconstruction: what reads pruned features gets refit, from calibration statistics.

Today the rank-0 correction, FLAP's bias compensation: every dropped input feature of o_proj /
down_proj is replaced by its calibration mean, i.e. `W[:, dropped] @ mean[dropped]` is added to the
projection's output. It serves three places with the same numbers:

- the metric methods (FLAP adds these biases; the pruned-propagation walk compensates layer by layer),
- the policy-gradient loop (`--compensate`: the gated forward fills dropped features with their
  means, `gating.gated(..., fill=feature_means(stats))`, so each sampled mask is scored as the model
  it would export),
- surgery and export (`surgery.remove_units(..., output_bias=compensation_biases(...))`).
"""

from __future__ import annotations

import torch

from pgprune.masks import Masks, UnitCosts
from pgprune.models.adapter import ModelAdapter, read_weight


def feature_means(stats) -> dict[str, list]:
    """{"attn": [L], "mlp": [L]}: the calibration means of the inputs of o_proj / down_proj per layer
    (None where the block is absent), from `metrics.calibration.collect_layer_stats`: the values the
    compensation and the gated forward's mean fill put in place of dropped features."""
    return {"attn": [None if st.attn_in is None else st.attn_in.mean for st in stats],
            "mlp": [None if st.mlp_in is None else st.mlp_in.mean for st in stats]}


def _dropped_mean_output(proj, mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """W[:, dropped] @ mean[dropped] in float64 (`keep`: [in_features] bool)."""
    w = read_weight(proj).double()
    return w @ (mean.double().to(w.device) * (~keep).to(w.device))


def compensation_biases(adapter: ModelAdapter, means: dict[str, list], masks: Masks,
                        costs: UnitCosts | None = None) -> dict[str, torch.Tensor]:
    """The output biases of a mask's compensation: {"attn": [L, hidden], "mlp": [L, hidden]} float32.
    A removed block of a kept layer becomes its constant mean output. A removed layer's mean update
    (both blocks) goes to the MLP output of the last kept layer before it: the removed layers in
    between pass the residual stream through unchanged, so adding it there is the same; with no
    kept layer before it, it is dropped. `means`: `feature_means(stats)`."""
    costs = costs or UnitCosts.from_adapter(adapter)
    eff = masks.effective(costs)
    L, H = costs.num_layers, adapter.hidden_size
    out = {"attn": torch.zeros(L, H), "mlp": torch.zeros(L, H)}
    last_kept = None
    for i in range(L):
        kept_layer = bool(eff["layer"][i])
        if not kept_layer and last_kept is None:
            continue
        m = adapter.layer(i)
        for block, proj, keep in (("attn", m.o_proj, adapter.expand_head_mask(eff["head"][i], "o")),
                                  ("mlp", m.down_proj, eff["channel"][i])):
            if proj is None:
                continue
            keep = keep[: proj.in_features]
            if bool(keep.all()):
                continue
            bias = _dropped_mean_output(proj, means[block][i], keep).float().cpu()
            out[block if kept_layer else "mlp"][i if kept_layer else last_kept] += bias
        if kept_layer:
            last_kept = i
    return out


def layer_compensation_biases(adapter: ModelAdapter, stats, i: int, keep: dict[str, torch.Tensor]):
    """(attn bias or None, mlp bias or None) of layer i alone, from its statistics `stats`
    (a `LayerStats`) and its unit keep-masks {"head": [G], "channel": [I]} (a kind left out: kept)."""
    m = adapter.layer(i)
    out = []
    for proj, fs, k in ((m.o_proj, stats.attn_in, keep.get("head")), (m.down_proj, stats.mlp_in, keep.get("channel"))):
        if proj is None or k is None or bool(k.all()):
            out.append(None)
            continue
        features = adapter.expand_head_mask(k, "o") if proj is m.o_proj else k
        out.append(_dropped_mean_output(proj, fs.mean, features).float())
    return out[0], out[1]


def bias_params_added(adapter: ModelAdapter, masks: Masks, costs: UnitCosts, bias) -> int:
    """Parameters surgery adds for the compensation: a new bias vector for every kept block whose
    projection had none (and a residual constant for removed blocks of kept layers)."""
    if bias is None:
        return 0
    eff = masks.effective(costs)
    n = 0
    for i in range(costs.num_layers):
        lm = adapter.layer(i)
        for block, proj in (("attn", lm.o_proj), ("mlp", lm.down_proj)):
            if bool(bias[block][i].ne(0).any()) and (proj is None or proj.bias is None
                                                     or not bool(eff[block][i])):
                n += adapter.hidden_size
    return n
