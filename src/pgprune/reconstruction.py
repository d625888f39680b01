"""Reconstruction: what reads pruned features gets refit, from calibration statistics.

The layers that read prunable features are o_proj (over the kept heads) and down_proj (over the
kept channels). Three modes (`--reconstruct`, `MODES`):

- none: the kept columns stay as they are, dropped features contribute nothing;
- bias: FLAP's compensation, the rank-0 correction: every dropped input feature is replaced by its
  calibration mean, i.e. `W[:, dropped] @ mean[dropped]` is added to the projection's output;
- lsq: least squares. With x the projection's input on the calibration tokens, S the kept and D the
  dropped features, the kept columns and the bias are refit so that `W'_S x_S + b'` reproduces the
  dense `W x` (the target keeps the dense weights). Centred, the optimum is
      Delta = W_D C_DS (C_SS + lambda I)^-1,   W'_S = W_S + Delta,   b' = W_D mu_D - Delta mu_S,
  with C the input covariance and mu its mean; the ridge lambda = damp x mean(diag C) (over all the
  projection's inputs, as SparseGPT damps relative to its Hessian's diagonal) pulls Delta towards 0,
  i.e. towards `bias`, which is the lambda -> infinity limit. With P = (C + lambda I)^-1 the same
  Delta is -W_D P_DD^-1 P_DS (the block-inverse identity), a solve of the dropped size instead of the
  kept one: PG's per-mask refits (`--pg-reconstruct lsq`) factor P once per layer and take the
  cheaper of the two exact forms for each mask. Statistics are accumulated and solved in float64
  whatever the model dtype. The inputs come either from the dense model (`inputs="dense"`) or
  sequentially from the model pruned and refit so far (`"sequential"`, block by block as
  SparseGPT's true-sequential order: o_proj's statistics of layer i are read with layers < i pruned
  and refit, down_proj's with layer i's attention block refit too; the target is W x on those
  inputs). Each part of a layer then runs once (`collect_block_stats_sequentially`).

A removed block keeps its mean output as a constant (both modes agree there: nothing is kept to
refit); a removed layer's mean update goes to the last kept layer before it (see
`compensation_biases`). Under lsq a run of removed layers p+1 .. j right after a kept layer p whose
MLP stays is regressed instead: delta = h_j - h_p, what the run adds to the residual stream, is fit
by least squares on p's kept down_proj inputs x_S (the same ridge), and the fit is added to p's
down_proj, `W'_S += A`, `b' += mu_delta - A mu_S` (the mean fold is the A = 0 limit). Both come from
one more walk of the dense model over the calibration windows (`collect_removed_run_stats`), also
under sequential inputs. There the walk reads a removed layer's mean update as the dense walk does, from
the whole unedited layer on the stream that enters it, and adds the run's fit to the stream after the
run: the removed layers' means are read without it, the layers after it refit on the stream the pruned
model computes (bench/RESULTS.md "Sequential refits of layer masks").

`reconstruct(model, calib_ids, masks, mode)` returns a `Refit` (output biases and refit columns)
that `surgery.remove_units(..., output_bias=r.output_bias, input_weights=r.input_weights)` applies
and `refit_applied(model, masks, r)` reproduces with hooks on the unchanged model. The policy-gradient
loop scores its sampled masks with the mean fill (`--pg-reconstruct bias`: `gating.gated(...,
fill=feature_means(stats))`, the same function as these biases) or with each mask's own least-squares
refit (`--pg-reconstruct lsq`: `gating.gathered_losses(..., refit=...)`; with layer units its removed
runs regressed through `RunRegressions`, from the held dense residual stream). The metric methods' pruned
propagation walk compensates layer by layer with `layer_compensation_biases`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch

from pgprune.errors import ConfigError, DataError
from pgprune.masks import Masks, UnitCosts
from pgprune.models.adapter import ModelAdapter, get_adapter, read_weight

MODES = ("none", "bias", "lsq")
INPUTS = ("dense", "sequential", "auto")
DEFAULT_DAMP = 0.01
BLOCKS = ("attn", "mlp")


def may_use_sequential_inputs(inputs: str, unit_kinds) -> bool:
    """Whether a refit of masks over `unit_kinds` can take sequential inputs (the memory plan's question,
    asked before any mask exists): `auto` resolves to dense only for masks that remove whole layers alone."""
    return inputs == "sequential" or (inputs == "auto" and set(unit_kinds) != {"layer"})


def resolve_inputs(inputs: str, eff: dict[str, torch.Tensor], costs: UnitCosts) -> str:
    """`auto`: dense inputs when the mask only removes whole layers (every kept layer whole, so nothing is
    refit column-wise; the two walks differ only in the removed layers' mean folds, and the dense one was
    better on natural text on all four layer masks measured), else sequential (better by 6-11 % on
    channel/head masks); bench/RESULTS.md "Whole layers at 30 %, again"."""
    if inputs != "auto":
        return inputs
    kept = eff["layer"]
    heads = eff["head"] | ~costs.present("head")
    chans = eff["channel"] | ~costs.present("channel")
    whole = eff["attn"][kept].all() and eff["mlp"][kept].all() and heads[kept].all() and chans[kept].all()
    return "dense" if bool(whole) else "sequential"


@dataclass
class Refit:
    """What surgery applies to a pruned model besides removing units.

    output_bias: {"attn"|"mlp": [L, hidden] float32} added to o_proj / down_proj outputs (as FLAP's
    compensation; None: none). input_weights: {"attn"|"mlp": {layer: [hidden, kept inputs] float32}}
    replacing the kept columns of o_proj / down_proj (least squares; layers not listed keep theirs).
    info: how it was computed (mode, inputs, damping, tokens, warnings)."""
    output_bias: dict[str, torch.Tensor] | None = None
    input_weights: dict[str, dict[int, torch.Tensor]] = field(default_factory=lambda: {"attn": {}, "mlp": {}})
    info: dict = field(default_factory=dict)

    @classmethod
    def none(cls) -> "Refit":
        return cls(info={"mode": "none"})


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
    builder = _RefitBuilder(costs.num_layers, adapter.hidden_size)
    for i in range(costs.num_layers):
        inputs = {"attn": means["attn"][i], "mlp": means["mlp"][i]}
        builder.add(i, bool(eff["layer"][i]), layer_refit(adapter, i, inputs, eff["head"][i], eff["channel"][i], "bias"))
    return builder.refit.output_bias


def layer_compensation_biases(adapter: ModelAdapter, stats, i: int, keep: dict[str, torch.Tensor]):
    """(attn bias or None, mlp bias or None) of layer i alone, from its statistics `stats`
    (a `LayerStats`) and its unit keep-masks {"head": [G], "channel": [I]} (a kind left out: kept)."""
    heads = keep.get("head")
    channels = keep.get("channel")
    heads = torch.ones(adapter.num_kv_heads(i), dtype=torch.bool) if heads is None else heads
    channels = torch.ones(adapter.intermediate_size(i), dtype=torch.bool) if channels is None else channels
    parts = layer_refit(adapter, i, {"attn": stats.attn_in, "mlp": stats.mlp_in}, heads, channels, "bias")
    return tuple(None if parts[b][0] is None else parts[b][0].float() for b in BLOCKS)


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


# --- least squares ----------------------------------------------------------------------------------------
def lsq_columns(weight: torch.Tensor, stats, keep: torch.Tensor, damp: float = DEFAULT_DAMP, *,
                precision: bool = False):
    """(W'_S [out, |S|], b' [out]) in float64: the least-squares refit of a projection `weight`
    [out, in] whose inputs `keep` ([in] bool) keeps, from `stats` (a `FeatureStats` with covariance).
    With nothing dropped: (W_S, 0); with nothing kept: (empty, W mu), the mean compensation.
    precision: where fewer inputs are dropped than kept, solve through the damped precision matrix
    (`stats.damped_precision(damp)`, factored once and cached: worth it for many masks on the same
    statistics) instead of factoring C_SS; the two are the same refit to rounding."""
    from pgprune.metrics.calibration import damped_cholesky

    if damp < 0:
        raise ConfigError(f"the least-squares damping must be >= 0, got {damp}")
    w = weight.double()
    keep = keep.to(w.device)
    kept, dropped = keep.nonzero().flatten(), (~keep).nonzero().flatten()
    mean = stats.mean.to(w.device)
    bias = w[:, dropped] @ mean[dropped]
    if len(kept) == 0 or len(dropped) == 0:
        return w[:, kept], bias
    if stats.comoment is None:
        raise ConfigError("least squares needs input covariances; collect the statistics with covariance=True")
    lam = stats.ridge(damp)
    if lam is None:  # every input constant on the calibration tokens: only the mean helps
        return w[:, kept], bias
    if precision and len(dropped) < len(kept):  # Delta = -W_D P_DD^-1 P_DS
        rows = stats.damped_precision(damp).to(w.device)[dropped]
        chol = torch.linalg.cholesky(rows[:, dropped])  # a principal block of an SPD matrix
        delta = -(torch.cholesky_solve(w[:, dropped].T.contiguous(), chol).T @ rows[:, kept])
    else:  # Delta = W_D C_DS (C_SS + lambda I)^-1, from the kept rows of the covariance only
        rows = stats.comoment.to(w.device)[kept] / max(stats.count, 1)
        chol = damped_cholesky(rows[:, kept], lam)
        delta = torch.cholesky_solve(rows[:, dropped] @ w[:, dropped].T, chol).T  # [out, S]
    return w[:, kept] + delta, bias - delta @ mean[kept]


def removal_errors(weight: torch.Tensor, stats, group_width: int = 1, damp: float = DEFAULT_DAMP,
                   batches: int = 128) -> torch.Tensor:
    """[in / group_width] float64: the output error (per calibration token, squared norm) that removing each
    group of `group_width` consecutive inputs of `weight` [out, in] adds when groups are removed greedily,
    cheapest first, and each removal refits the remaining columns by least squares -- the structured
    Optimal Brain Surgeon that SlimGPT and ZipLM select with. With P = (C + lambda I)^-1 over the inputs
    still present (`lsq_columns`' ridge), removing group D costs tr(W_D P_DD^-1 W_D^T); the removal
    applies the refit W <- W - W_D P_DD^-1 P_D. and P <- its Schur complement (the precision of the rest).
    Groups go in up to `batches` rounds (the cheapest ceil(G / batches) per round, their errors read
    before the round), which costs about one inversion of C. The errors are made strictly increasing along
    the removal order (a running maximum, nudged up by a relative 1e-6 where it would tie, so that ranking
    them, and their logs, reproduces the greedy order exactly), in units that compare across layers. All
    zero when every input is constant (nothing to regress on)."""
    from pgprune.metrics.calibration import damped_cholesky

    if stats.comoment is None:
        raise ConfigError("removal errors need input covariances; collect the statistics with covariance=True")
    w = weight.detach().double().to(stats.comoment.device)
    n_in = w.shape[1]
    if group_width < 1 or n_in % group_width:
        raise ConfigError(f"cannot split {n_in} inputs into groups of {group_width}")
    groups = n_in // group_width
    errors = torch.zeros(groups, dtype=torch.float64)
    lam = stats.ridge(damp)
    if lam is None or groups == 0:
        return errors
    p = torch.cholesky_inverse(damped_cholesky(stats.covariance, lam))
    alive = torch.arange(groups)  # groups still present, in the order of w's and p's columns
    per_round = -(-groups // max(int(batches), 1))
    # the smallest step between consecutive errors where they would tie at 0 (dead inputs)
    floor = 1e-12 * max(float(w.pow(2).sum(0) @ stats.covariance.diagonal()) / groups, 1e-280)
    running, rank = 0.0, 0

    def columns(g: torch.Tensor) -> torch.Tensor:  # the input columns of groups at positions g
        return (g[:, None] * group_width + torch.arange(group_width)).flatten()

    while len(alive):
        if group_width == 1:
            cost = w.pow(2).sum(0) / p.diagonal()
        else:
            cost = torch.stack([torch.linalg.solve_triangular(
                torch.linalg.cholesky(p[s:s + group_width, s:s + group_width]), w[:, s:s + group_width].T,
                upper=False).pow(2).sum() for s in range(0, w.shape[1], group_width)])
        cost = cost.cpu()  # the bookkeeping stays on the CPU whatever device the statistics are on
        order = cost.argsort()
        take, stay = order[:per_round], order[per_round:]
        for g, e in zip(alive[take].tolist(), cost[take].tolist()):
            rank += 1
            running = max(e, running * (1 + 1e-6), floor * rank)
            errors[g] = running
        alive = alive[stay.sort().values]
        if not len(alive):
            break
        dropped, kept = columns(take.sort().values), columns(stay.sort().values)
        solved = torch.cholesky_solve(p[dropped][:, kept], torch.linalg.cholesky(p[dropped][:, dropped]))
        w = w[:, kept] - w[:, dropped] @ solved
        p = p[kept][:, kept] - p[kept][:, dropped] @ solved
    return errors


def check_finite(stats, i: int, block: str) -> None:
    """Refuse statistics that overflowed: no refit or score is computed from them."""
    if not stats.is_finite():
        raise DataError(f"layer {i} {block}: the calibration activations are not finite (an fp16/bf16 "
                        "overflow?); run with --dtype fp32")


def layer_refit(adapter: ModelAdapter, i: int, inputs: dict, heads: torch.Tensor, channels: torch.Tensor,
                mode: str, damp: float = DEFAULT_DAMP, precision: bool = False, blocks=BLOCKS) -> dict:
    """{block: (bias [hidden] float64 or None, kept-column weight [hidden, S] float64 or None)} of
    layer i's `blocks` for its unit keep-masks (`heads` [G] over KV groups, `channels` [I]). `inputs`:
    {"attn"|"mlp": the `FeatureStats` of o_proj's / down_proj's input (with covariance for lsq), or
    for mode bias just its mean}. A block whose inputs are all kept gets (None, None), a block with
    nothing kept only its mean output. precision: see `lsq_columns`."""
    m = adapter.layer(i)
    out = {}
    for block, proj, keep in (("attn", m.o_proj, adapter.expand_head_mask(heads, "o")),
                              ("mlp", m.down_proj, channels)):
        if block not in blocks:
            continue
        out[block] = (None, None)
        if proj is None or mode == "none":
            continue
        keep = keep[: proj.in_features].bool()
        if bool(keep.all()):
            continue
        fs = inputs[block]
        if isinstance(fs, torch.Tensor):
            mean = fs
        else:
            check_finite(fs, i, block)
            mean = fs.mean
        if mode == "bias" or not bool(keep.any()):
            out[block] = (_dropped_mean_output(proj, mean, keep), None)
        else:
            weight, bias = lsq_columns(read_weight(proj), fs, keep, damp, precision=precision)
            out[block] = (bias, weight)
    return out


class _RefitBuilder:
    """Collects per-layer refits into a `Refit`, folding a removed layer's mean update into the last
    kept layer before it (dropped when none precedes it), as `compensation_biases` does."""

    def __init__(self, num_layers: int, hidden: int):
        self.refit = Refit(output_bias={b: torch.zeros(num_layers, hidden) for b in BLOCKS})
        self.last_kept = None

    def add(self, i: int, kept_layer: bool, parts: dict) -> None:
        for block, (bias, weight) in parts.items():
            if bias is not None and (kept_layer or self.last_kept is not None):
                target = (block, i) if kept_layer else ("mlp", self.last_kept)
                self.refit.output_bias[target[0]][target[1]] += bias.float().cpu()
            if weight is not None:
                if not bool(torch.isfinite(weight).all()):
                    raise DataError(f"layer {i} {block}: the least-squares refit is not finite; raise the damping")
                self.refit.input_weights[block][i] = weight.float().cpu()
        if kept_layer:
            self.last_kept = i


def removed_runs(eff: dict, adapter: ModelAdapter) -> dict[int, int]:
    """{p: j}: each kept layer p whose MLP stays, followed by removed layers p+1 .. j (effective masks)."""
    layer, mlp = eff["layer"].tolist(), eff["mlp"].tolist()
    runs = {}
    for p in range(len(layer) - 1):
        if layer[p] and mlp[p] and not layer[p + 1] and adapter.layer(p).down_proj is not None:
            j = p + 1
            while j + 1 < len(layer) and not layer[j + 1]:
                j += 1
            runs[p] = j
    return runs


def regress_run(joint, n_inputs: int, keep: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A [hidden, S], b [hidden]) float64: the ridge least squares of delta on the kept inputs x_S from
    the joint statistics of [x (n_inputs), delta] (`collect_removed_run_stats`), without the mean of
    delta (the mean fold carries it): b = -A mu_S. The ridge is damp x the mean variance of all x, as
    `lsq_columns`'. None when x is constant."""
    cov = joint.covariance
    return ridge_fit(cov[:n_inputs, :n_inputs], cov[:n_inputs, n_inputs:], joint.mean[:n_inputs].to(cov.device),
                     keep, damp)


def ridge_fit(cov_x: torch.Tensor, cross: torch.Tensor, mean_x: torch.Tensor, keep: torch.Tensor, damp: float,
              precision: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A [out, S], b [out]) float64: the centred ridge regression of a target on the kept inputs x_S,
    from x's covariance `cov_x` [F, F], the cross-covariance `cross` [F, out] of x with the target and
    x's mean (b = -A mu_S); ridge damp x the mean variance of all x. `precision`: (C + ridge I)^-1
    when cached (`FeatureStats.damped_precision`): the same fit through its blocks, a solve of the
    dropped size. None when x is constant or nothing is kept."""
    from pgprune.metrics.calibration import damped_cholesky

    keep = keep.to(cov_x.device).bool()
    kept, dropped = keep.nonzero().flatten(), (~keep).nonzero().flatten()
    scale = float(cov_x.diagonal().mean())
    if not scale > 0 or len(kept) == 0:
        return None
    target = cross.to(cov_x.device, torch.float64)[kept]
    if precision is not None and len(dropped) < len(kept):
        # (C_SS + ridge I)^-1 = P_SS - P_SD P_DD^-1 P_DS (the block inverse of P)
        sol = precision[kept][:, kept] @ target
        if len(dropped):
            p_ds = precision[dropped][:, kept]
            chol = torch.linalg.cholesky(precision[dropped][:, dropped])
            sol = sol - p_ds.T @ torch.cholesky_solve(p_ds @ target, chol)
    else:
        sol = torch.cholesky_solve(target, damped_cholesky(cov_x[kept][:, kept], damp * scale))
    a = sol.T
    return a, -(a @ mean_x.to(a.device, torch.float64)[kept])


class RunRegressions:
    """The regressions of removed runs for many masks: PG's per-mask refits (`--pg-reconstruct lsq`)
    with layer units score each sampled mask with its runs regressed, as the export does (module
    doc). The dense residual stream of the calibration windows is held after every layer
    (`collect_residual_stream`); a run p+1 .. j's cross-covariance of p's down_proj inputs x_p with
    delta = h_j - h_p is computed the first time a mask removes it (rerunning layer p alone) and kept,
    up to `max_cached` runs (least recently used dropped first; default: as many as fit in the bytes of
    the held stream, so the two together take twice the stream). x_p's covariance comes from the dense
    statistics `x_stats` (`collect_layer_stats(..., covariance=True)` on the same windows: their
    `mlp_in`), whose cached precision serves every mask."""

    def __init__(self, model, calib_ids: torch.Tensor, x_stats: list, damp: float = DEFAULT_DAMP, *,
                 batch_size: int = 8, max_cached: int | None = None, progress: bool = True):
        from pgprune.metrics.calibration import collect_residual_stream

        self.adapter = get_adapter(model)
        self.x_stats, self.damp = x_stats, damp
        self.stream, self.inputs = collect_residual_stream(model, calib_ids, batch_size=batch_size,
                                                           adapter=self.adapter, progress=progress)
        if max_cached is None:
            stream_bytes = sum(t.numel() * t.element_size() for t in self.stream)
            entry_bytes = max(self.adapter.intermediate_size(i) for i in range(self.adapter.num_layers)) \
                * 4 * self.adapter.hidden_size
            max_cached = max(1, stream_bytes // entry_bytes)
        self.max_cached = max_cached
        self._cross: dict[tuple[int, int], torch.Tensor] = {}  # insertion order = use order

    def cross(self, p: int, j: int) -> torch.Tensor:
        """cov(x_p, delta) [I, hidden] float32 of the run p+1 .. j (x_p centred by `x_stats[p]`'s mean:
        the same windows)."""
        from pgprune.metrics.calibration import down_proj_inputs

        key = (p, j)
        if key in self._cross:
            self._cross[key] = self._cross.pop(key)  # most recently used last
            return self._cross[key]
        xs = down_proj_inputs(self.adapter, p, self.stream[p], self.inputs)
        delta = self.stream[j + 1] - self.stream[p + 1]
        n = sum(x.shape[0] * x.shape[1] for x in xs)
        mean_x = self.x_stats[p].mean.float()
        mean_d = (delta.flatten(0, -2).double().sum(0) / n).float()
        acc = torch.zeros(len(mean_x), len(mean_d), dtype=torch.float64, device=delta.device)
        # both sides centred by their exact means, so a large constant part cannot cancel in float32
        for b, x in zip(self.inputs.batches, xs):
            xc = x.flatten(0, -2).float() - mean_x.to(x.device)
            dc = delta[b].flatten(0, -2).float() - mean_d.to(x.device)
            acc += (xc.T @ dc).double().to(acc.device)
        value = (acc / n).float()
        if not bool(torch.isfinite(value).all()):
            raise DataError(f"layers {p + 1}-{j}: the calibration activations are not finite (an fp16/bf16 "
                            "overflow?); run with --dtype fp32")
        self._cross[key] = value
        while len(self._cross) > self.max_cached:
            self._cross.pop(next(iter(self._cross)))
        return value

    def fit(self, p: int, j: int, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`regress_run`'s (A, b) of the run p+1 .. j on p's kept down_proj inputs `keep`."""
        fs = self.x_stats[p]
        check_finite(fs, p, "mlp")
        if fs.ridge(self.damp) is None:
            return None
        return ridge_fit(fs.covariance, self.cross(p, j), fs.mean, keep, self.damp,
                         precision=fs.damped_precision(self.damp))


def per_mask_refit(model, stats, calib_ids: torch.Tensor, *, damp: float = DEFAULT_DAMP, costs: UnitCosts | None = None,
                   regress_layers: bool = False, batch_size: int = 8, progress: bool = True):
    """mask -> its least-squares `Refit` from the dense statistics `stats` (with covariances, on the
    windows `calib_ids`): how PG scores a sampled mask under `--pg-reconstruct lsq`. regress_layers
    (layer units): removed runs regressed too, through a `RunRegressions` on the same windows."""
    runs = RunRegressions(model, calib_ids, [st.mlp_in for st in stats], damp, batch_size=batch_size,
                          progress=progress) if regress_layers else None
    return functools.partial(reconstruct, model, None, mode="lsq", damp=damp, stats=stats, costs=costs, runs=runs)


def _kept_channels(adapter: ModelAdapter, eff: dict, p: int) -> torch.Tensor:
    """[intermediate_size(p)] bool: layer p's kept MLP channels (its down_proj's kept input columns)."""
    return eff["channel"][p][: adapter.intermediate_size(p)]


def _run_fits(adapter: ModelAdapter, eff: dict, fit) -> dict[int, tuple[int, torch.Tensor, torch.Tensor]]:
    """{p: (j, A, b)}: each removed run's regression (module doc) from fit(p, j, keep) -> (A, b) or None
    (a run whose fit is None keeps the mean fold)."""
    fits = {}
    for p, j in removed_runs(eff, adapter).items():
        fitted = fit(p, j, _kept_channels(adapter, eff, p))
        if fitted is None:
            continue
        a, shift = fitted
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(shift).all())):
            raise DataError(f"layers {p + 1}-{j}: the regression of their update is not finite; raise the damping")
        fits[p] = (j, a, shift)
    return fits


def _add_run_fit(adapter: ModelAdapter, eff: dict, builder: "_RefitBuilder", p: int, a: torch.Tensor,
                 shift: torch.Tensor) -> None:
    """Add a run's regression (A, b) to the down_proj of the kept layer p before it (on top of p's own
    refit, or of its kept columns where p's channels are all kept)."""
    keep = _kept_channels(adapter, eff, p)
    down = read_weight(adapter.layer(p).down_proj).detach()
    base = builder.refit.input_weights["mlp"].get(p)
    base = down[:, keep.to(down.device)].float().cpu() if base is None else base
    builder.refit.input_weights["mlp"][p] = base + a.float().cpu()
    builder.refit.output_bias["mlp"][p] += shift.float().cpu()


def _dense_run_fits(model, adapter: ModelAdapter, calib_ids, eff: dict, damp: float, batch_size: int,
                    progress: bool) -> dict:
    """`_run_fits` from one more walk of the dense model (module doc)."""
    from pgprune.metrics.calibration import collect_removed_run_stats

    joint = collect_removed_run_stats(model, calib_ids, removed_runs(eff, adapter), batch_size=batch_size,
                                      adapter=adapter, progress=progress)
    return _run_fits(adapter, eff, lambda p, j, keep: regress_run(joint[p], int(keep.numel()), keep, damp))


def _holds_covariance(stats) -> bool:
    return any(fs is not None and fs.comoment is not None for st in stats for fs in (st.attn_in, st.mlp_in))


def reconstruct(model, calib_ids: torch.Tensor | None, masks: Masks, mode: str = "lsq", *, inputs: str = "dense",
                damp: float = DEFAULT_DAMP, stats=None, batch_size: int = 8, progress: bool = True,
                costs: UnitCosts | None = None, runs: RunRegressions | None = None) -> Refit:
    """The `Refit` of `masks` (one mask) under `mode` (none | bias | lsq) from the calibration windows
    `calib_ids`; `stats`: dense `collect_layer_stats` results to reuse with inputs dense (for lsq they
    must hold covariances: `collect_layer_stats(..., covariance=True)`; then no pass runs). `runs`:
    the removed runs' regressions to reuse (`RunRegressions` on the same windows) where `calib_ids` is
    None; without either, removed runs keep the mean fold.
    Memory: lsq holds one layer's input covariances at a time (in_features^2 float64 per projection);
    sequential inputs also one layer's o_proj and down_proj inputs of every window."""
    if mode not in MODES:
        raise ConfigError(f"reconstruction must be one of {', '.join(MODES)}, got {mode!r}")
    if inputs not in INPUTS:
        raise ConfigError(f"reconstruction inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    adapter = get_adapter(model)
    costs = costs or UnitCosts.from_adapter(adapter)
    masks.check(costs)
    if masks.num_masks is not None:
        raise ConfigError("reconstruct takes one mask, not a stack; pick one with masks.select(k)")
    if mode == "none":
        return Refit.none()
    eff = masks.to("cpu").effective(costs)
    # the mean compensation reads the dense model: the PG's mean fill, FLAP's biases
    inputs = "dense" if mode == "bias" else resolve_inputs(inputs, eff, costs)
    builder = _RefitBuilder(costs.num_layers, adapter.hidden_size)
    info = {"mode": mode, "inputs": inputs, "damp": damp if mode == "lsq" else None}
    # removed runs: regressed from the dense model whatever the inputs (module doc); without windows or
    # `runs` the mean fold stays
    run_fits = {}
    if mode == "lsq" and removed_runs(eff, adapter):
        if calib_ids is not None:
            run_fits = _dense_run_fits(model, adapter, calib_ids, eff, damp, batch_size, progress)
        elif runs is not None:
            run_fits = _run_fits(adapter, eff, runs.fit)
    if inputs == "dense" and stats is not None and (mode == "bias" or _holds_covariance(stats)):
        for i in range(costs.num_layers):
            inputs_i = {"attn": stats[i].attn_in, "mlp": stats[i].mlp_in}
            # reused covariances serve many masks (PG's per-mask refits): factor each projection once
            builder.add(i, bool(eff["layer"][i]), layer_refit(adapter, i, inputs_i, eff["head"][i], eff["channel"][i],
                                                              mode, damp, precision=True))
        info.update(tokens=stats[0].tokens, reused_stats=True)
    elif calib_ids is None:
        raise ConfigError(f"--reconstruct {mode} needs calibration windows")
    else:
        info.update(_refit_by_walk(model, adapter, calib_ids, eff, builder, mode, inputs, damp, batch_size, progress,
                                   run_fits))
    for p, (_j, a, shift) in run_fits.items():
        _add_run_fit(adapter, eff, builder, p, a, shift)
    if run_fits:
        info["removed_runs_regressed"] = {p: j for p, (j, _a, _b) in run_fits.items()}
    builder.refit.info = info
    return builder.refit


def _refit_by_walk(model, adapter: ModelAdapter, calib_ids, eff: dict, builder: _RefitBuilder, mode: str, inputs: str,
                   damp: float, batch_size: int, progress: bool, run_fits: dict) -> dict:
    """Fill `builder` from a calibration walk: the dense model's statistics layer by layer, or
    (sequential) each block's statistics read from the model pruned and refit up to that block, with
    the removed runs' regressions `run_fits` ({p: (j, A, b)}) in the walk's stream after their runs,
    so that the layers after a run are refit on the stream the pruned model computes (the caller adds
    them to the refit); returns what the walk adds to the refit's info."""
    from pgprune.metrics.calibration import collect_block_stats_sequentially, collect_layer_stats

    narrow = []

    def refit_blocks(i: int, stats: dict) -> dict:
        """layer i's refit of the blocks in `stats` ({block: FeatureStats or None}), added to `builder`."""
        parts = layer_refit(adapter, i, stats, eff["head"][i], eff["channel"][i], mode, damp, blocks=tuple(stats))
        builder.add(i, bool(eff["layer"][i]), parts)
        for block, fs in stats.items():
            weight = parts[block][1]
            if fs is not None and fs.comoment is not None and weight is not None and fs.count < weight.shape[1]:
                narrow.append(f"layer {i} {block}")
        return parts

    if inputs == "dense":
        def on_layer(i: int, st) -> None:
            refit_blocks(i, {"attn": st.attn_in, "mlp": st.mlp_in})
            for block in BLOCKS:  # free the covariances now: one layer's at a time
                fs = getattr(st, f"{block}_in")
                if fs is not None:
                    setattr(st, f"{block}_in", fs.without_covariance())

        tokens = collect_layer_stats(model, calib_ids, batch_size=batch_size, adapter=adapter, progress=progress,
                                     on_layer=on_layer, covariance=mode == "lsq")[0].tokens
    else:
        def on_block(i: int, block: str, fs):
            folded = bool(eff["layer"][i]) or builder.last_kept is not None  # else dropped (module doc)
            bias, weight = refit_blocks(i, {block: fs})[block]
            return _layer_edit(adapter, i, eff["head"][i], eff["channel"][i],
                               {block: bias if folded else None}, {block: weight})

        def regression(keep: torch.Tensor, a: torch.Tensor, shift: torch.Tensor):
            """A x_S + b of a run's regression on p's down_proj inputs x (one window batch)."""
            kept = keep.nonzero().flatten()
            return lambda x: x[..., kept.to(x.device)].float() @ a.T.float().to(x.device) + shift.float().to(x.device)

        # a removed layer's mean fold is the mean of what the unedited layer adds to the stream entering it
        # (as with dense inputs); a run's regression joins the stream after the run, where the exported
        # model has it, not before its removed layers' means are read
        runs_out = {p: (j, regression(_kept_channels(adapter, eff, p), a, shift))
                    for p, (j, a, shift) in run_fits.items()}
        tokens = collect_block_stats_sequentially(model, calib_ids, on_block, batch_size=batch_size,
                                                  adapter=adapter, progress=progress,
                                                  own_attention=lambda i: not bool(eff["layer"][i]),
                                                  run_outputs=runs_out)
    extra = {"tokens": tokens}
    if narrow:  # damping keeps the solve defined, but the refit of these is poorly determined
        extra["fewer_tokens_than_kept_inputs"] = narrow
    return extra


def _layer_edit(adapter: ModelAdapter, i: int, heads: torch.Tensor, channels: torch.Tensor, biases: dict,
                weights: dict):
    """The `LayerEdit` that makes layer i compute its pruned-and-refit self (by hooks): `biases` /
    `weights` {block: output bias [hidden] / kept-column weight [hidden, S], or None}."""
    from pgprune.metrics.calibration import LayerEdit

    m = adapter.layer(i)
    edit = LayerEdit(head_keep=heads, channel_keep=channels)
    for block, proj, keep in (("attn", m.o_proj, adapter.expand_head_mask(heads, "o")), ("mlp", m.down_proj, channels)):
        if biases.get(block) is not None and bool(biases[block].ne(0).any()):
            setattr(edit, f"{block}_bias", biases[block].float())
        if weights.get(block) is not None:
            full = read_weight(proj).detach().float().clone()
            full[:, keep[: proj.in_features].bool().to(full.device)] = weights[block].float().to(full.device)
            setattr(edit, f"{block}_weight", full)
    return edit


@contextlib.contextmanager
def refit_applied(model, masks: Masks, refit: Refit, costs: UnitCosts | None = None):
    """The model computing its pruned-and-refit self by hooks, weights untouched (one mask): what
    `surgery.remove_units(model, masks, output_bias=refit.output_bias, input_weights=refit.input_weights)`
    computes, without copying a weight."""
    from pgprune.metrics.calibration import apply_layer_edit

    adapter = get_adapter(model)
    costs = costs or UnitCosts.from_adapter(adapter)
    eff = masks.to("cpu").effective(costs)
    bias = refit.output_bias or {}
    handles = []
    try:
        for i in range(costs.num_layers):
            edit = _layer_edit(adapter, i, eff["head"][i], eff["channel"][i],
                               {b: bias[b][i] if b in bias else None for b in BLOCKS},
                               {b: refit.input_weights.get(b, {}).get(i) for b in BLOCKS})
            handles += apply_layer_edit(adapter.layer(i), adapter, edit)
        yield model
    finally:
        for h in handles:
            h.remove()
