"""A low-dimensional policy: unit logits from metric scores and per-layer offsets (`--policy features`).

The paper's policy gives every unit its own free probability. With K=2 and a few hundred steps
that cannot re-rank tens of thousands of channels: each sampled mask yields one loss for all of
them, so a unit's own signal is buried under the others' (per-unit signal-to-noise ~ sqrt(T / N)
after T samples of N undecided units). This policy shares its parameters instead:

    logit_i = scale * (sum_f w[kind_i, f] * phi_f(i) + a[kind_i, layer_i]) + v

- phi_f(i): the log score of unit i by metric f, standardised over the units of its kind (the
  init metric first, then the other FEATURE_METRICS), then orthonormalised in that order (what
  metric f adds beyond the ones before it), for channels and heads. Blocks (attn, mlp, layer: one
  unit per layer) have no features: their logit is their offset, a per-unit policy.
- a: one offset per (kind, layer): learns each layer's width. w: learns how to rank the units
  inside a layer by mixing the metrics. v: one global shift, solved after every update so that
  the expected kept fraction meets the budget (the projection, in logit space).

At the start w selects the init metric's feature and the offsets put every layer's decision
boundary at 0, so the hard mask is the init metric's own mask (DESIGN.md). Updates: the
estimator's gradient with respect to the probabilities times ds/dlogit = s(1 - s) (the chain
rule; for the `loo` estimator that is exactly mean_k adv_k (m_k - s), bounded), pulled back to
(w, a) and applied with Adam, whose per-parameter step size does not depend on how many units
share a parameter.
"""

from __future__ import annotations

import math

import torch

from pgprune.errors import ConfigError
from pgprune.masks import UnitCosts
from pgprune.budget import present_units, solve_shift
from pgprune.metrics.allocation import Allocation
from pgprune.policy.probabilities import Policy, UnitLayout

FEATURE_METRICS = ("wanda-sp", "flap", "magnitude")
FEATURE_KINDS = ("channel", "head")
_ADAM_BETAS = (0.9, 0.99)
_ADAM_EPS = 1e-8


def log_features(raw: dict[str, torch.Tensor], costs: UnitCosts) -> dict[str, torch.Tensor]:
    """log(score) standardised over the present units of each kind; 0 where a unit is absent.
    A small floor (1e-6 x the kind's mean score) keeps dead units (score 0) finite."""
    from pgprune.metrics.scores import standardize_per_kind

    out = {}
    for kind, x in raw.items():
        present = present_units(costs, kind) & torch.isfinite(x)
        v = x.double()[present]
        logs = torch.full_like(x, float("nan"), dtype=torch.float64)
        logs[present] = torch.log(v.clamp_min(0) + 1e-6 * float(v.abs().mean()) + 1e-30)
        out[kind] = torch.nan_to_num(standardize_per_kind(logs), nan=0.0)
    return out


class FeaturePolicy(Policy):
    """Keep-probabilities s = sigmoid(logits) from a few shared parameters (see the module text)."""

    def __init__(self, layout: UnitLayout, costs: UnitCosts, sparsity: float, scale: float,
                 features: torch.Tensor, feature_names: tuple[str, ...], weights: torch.Tensor,
                 offsets: torch.Tensor):
        if scale <= 0:
            raise ConfigError(f"the policy scale must be > 0, got {scale}")
        self.layout, self.costs, self.scale = layout, costs, float(scale)
        self.sparsity, self.keep = float(sparsity), 1.0 - float(sparsity)
        self.features = features  # [N, F] float64, 0 for block kinds and absent units
        self.feature_names = tuple(feature_names)
        kind_index = torch.cat([torch.full((L * u,), i, dtype=torch.long)
                                for i, (L, u) in enumerate(layout.shapes)])
        layer_index = torch.cat([torch.arange(L).repeat_interleave(u) for L, u in layout.shapes])
        self.kind_of = kind_index
        self.group = kind_index * costs.num_layers + layer_index  # one offset per (kind, layer)
        self.weights = weights.double().clone()  # [kinds, F]
        self.offsets = offsets.double().clone()  # [kinds * L]
        self.adam = {"m": torch.zeros(self.num_params, dtype=torch.float64),
                     "v": torch.zeros(self.num_params, dtype=torch.float64), "t": 0}
        self.shift = 0.0
        self.learn_offsets = True  # False (--offsets fixed): widths move only with the shared weights w
        self._solve_shift()

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_allocation(cls, allocation: Allocation, feature_scores: dict[str, dict[str, torch.Tensor]],
                        layout: UnitLayout, costs: UnitCosts, scale: float = 4.0) -> "FeaturePolicy":
        """Start at `allocation`'s mask. `feature_scores`: {metric: {kind: raw [L, units]}}, the
        init metric first (its scores must order each layer's units as the allocation does)."""
        names = tuple(feature_scores)
        if not names:
            raise ConfigError("the feature policy needs at least one metric's scores")
        F = len(names)
        logs = {name: log_features({k: v for k, v in sc.items() if k in FEATURE_KINDS and k in layout.kinds}, costs)
                for name, sc in feature_scores.items()}
        cols = []
        for name in names:
            per_kind = {k: logs[name].get(k, torch.zeros(L, u, dtype=torch.float64))
                        for k, (L, u) in zip(layout.kinds, layout.shapes)}
            cols.append(layout.merge(per_kind))
        features = _orthonormalise(torch.stack(cols, dim=-1) * layout.present[:, None], layout)
        weights = torch.zeros(len(layout.kinds), F, dtype=torch.float64)
        for i, kind in enumerate(layout.kinds):
            if kind in FEATURE_KINDS:
                weights[i, 0] = 1.0
        offsets = _boundary_offsets(allocation, layout, costs, features[:, 0])
        policy = cls(layout, costs, allocation.sparsity, scale, features, names, weights, offsets)
        got = policy.hard_mask()
        # compared in effect: units of a removed layer cost nothing, so either prefix may hold them
        got, want = got.effective(costs), allocation.masks.effective(costs)
        if any(not torch.equal(got[k], want[k]) for k in got):
            raise ConfigError("internal error: the feature policy's initial hard mask is not the init "
                              "metric's mask")
        return policy

    @classmethod
    def from_metric(cls, metric, adapter, layout: UnitLayout, costs: UnitCosts, scale: float = 4.0,
                    stats=None) -> "FeaturePolicy":
        """Start at a `run_metric` result's mask, the features scored on the metric's own
        calibration statistics, else on `stats` (dense ones, for a data-free metric)."""
        stats = metric.scores.stats if metric.scores.stats is not None else stats
        if stats is None and any(k in FEATURE_KINDS for k in layout.kinds):
            raise ConfigError(f"the feature policy scores wanda-sp / flap features on calibration statistics; "
                              f"{metric.info['method']!r} collected none, so pass dense ones (stats=...)")
        scores = feature_scores(adapter, stats, layout.kinds, metric.info["method"], metric.scores.raw)
        return cls.from_allocation(metric.allocation, scores, layout, costs, scale=scale)

    # --- the policy ------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return self.weights.numel() + self.offsets.numel()

    def scores(self) -> torch.Tensor:
        """[N] float64: sum_f w phi + a, before scale and shift (-inf for absent units)."""
        return self.scores_at(self.weights, self.offsets)

    def scores_at(self, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """scores() with other parameters (w [kinds, F], a [kinds * L])."""
        z = (self.features * weights[self.kind_of]).sum(-1) + offsets[self.group]
        return torch.where(self.layout.present, z, torch.tensor(float("-inf"), dtype=torch.float64))

    def logits(self) -> torch.Tensor:
        return self.scale * self.scores() + self.shift

    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits()).float()

    def _solve_shift(self) -> None:
        self.shift = solve_shift(self.layout.split(self.scale * self.scores()), self.costs, self.keep)

    def param_gradient(self, grad_s: torch.Tensor) -> torch.Tensor:
        """An estimate of dE[L]/ds turned into the gradient of the policy's parameters (w, then a)."""
        s64 = self.probs().double()
        r = grad_s.double() * s64 * (1 - s64) * self.scale * self.layout.present  # dE[L]/d(score)
        g_w = torch.zeros_like(self.weights).index_add_(0, self.kind_of, self.features * r[:, None])
        g_a = torch.zeros_like(self.offsets).index_add_(0, self.group, r)
        return torch.cat([g_w.reshape(-1), g_a])

    def update(self, grad_s: torch.Tensor, lr: float) -> None:
        """One Adam step on (w, a) from an estimate of dE[L]/ds, then the budget shift."""
        self._adam_step(self.param_gradient(grad_s), lr)

    def _adam_step(self, g: torch.Tensor, lr: float) -> None:
        """theta <- theta - Adam(g) for theta = (w, a) flattened; offsets only if learned."""
        a = self.adam
        a["t"] += 1
        a["m"].mul_(_ADAM_BETAS[0]).add_(g, alpha=1 - _ADAM_BETAS[0])
        a["v"].mul_(_ADAM_BETAS[1]).addcmul_(g, g, value=1 - _ADAM_BETAS[1])
        m_hat = a["m"] / (1 - _ADAM_BETAS[0] ** a["t"])
        v_hat = a["v"] / (1 - _ADAM_BETAS[1] ** a["t"])
        step = lr * m_hat / (v_hat.sqrt() + _ADAM_EPS)
        nw = self.weights.numel()
        self.weights -= step[:nw].reshape(self.weights.shape)
        if self.learn_offsets:
            self.offsets -= step[nw:]
        self._solve_shift()

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"weights": self.weights.clone(), "offsets": self.offsets.clone(), "shift": self.shift,
                "adam": {"m": self.adam["m"].clone(), "v": self.adam["v"].clone(), "t": self.adam["t"]}}

    def load_state_dict(self, state: dict) -> None:
        self.weights, self.offsets, self.shift = state["weights"].clone(), state["offsets"].clone(), state["shift"]
        self.adam = {"m": state["adam"]["m"].clone(), "v": state["adam"]["v"].clone(), "t": state["adam"]["t"]}

    def describe(self) -> dict:
        """What the run learned, for run.json: the feature weights per kind."""
        return {"policy": "features", "scale": self.scale, "features": list(self.feature_names), "orthonormalised": True,
                "params": self.num_params, "offsets": "learned" if self.learn_offsets else "fixed",
                "weights": {k: [float(x) for x in self.weights[i]] for i, k in enumerate(self.layout.kinds)}}


def _orthonormalise(features: torch.Tensor, layout: UnitLayout) -> torch.Tensor:
    """Gram-Schmidt over the feature columns of each kind's units (init metric first, so column 0
    is unchanged), each residual rescaled to unit standard deviation. Metric scores are strongly
    correlated (wanda-sp and flap ~0.98 within a layer on SmolLM2), and Adam's per-parameter steps
    cannot separate parameters whose gradients nearly coincide; on orthonormal columns, the weight
    of column f is the weight of what metric f says beyond the metrics before it."""
    out = features.clone()
    start = 0
    for L, u in layout.shapes:
        rows = torch.zeros(layout.size, dtype=torch.bool)
        rows[start:start + L * u] = True
        rows &= layout.present
        start += L * u
        x = out[rows]
        for f in range(1, x.shape[1]):
            for prev in range(f):
                norm = float((x[:, prev] * x[:, prev]).sum())
                if norm > 0:
                    x[:, f] -= (x[:, f] * x[:, prev]).sum() / norm * x[:, prev]
            sd = float(x[:, f].std()) if x.shape[0] > 1 else 0.0
            x[:, f] = x[:, f] / sd if sd > 1e-6 else 0.0  # a metric that adds nothing: a dead column
        out[rows] = x
    return out


def _boundary_offsets(allocation: Allocation, layout: UnitLayout, costs: UnitCosts,
                      feature: torch.Tensor) -> torch.Tensor:
    """Offsets a[kind, layer] that put every layer's decision boundary at 0: kept units above,
    removed ones below. Channels / heads: the init feature's midpoint between the layer's lowest
    kept and highest removed unit. Blocks: the standardised key, centred on the kind's boundary
    (all kept or all removed: the nearest 0.5 from it, as a layer's channels)."""
    L = costs.num_layers
    kept_flat = layout.merge({k: allocation.masks[k] for k in layout.kinds}).bool() & layout.present
    removed_flat = ~kept_flat & layout.present
    offsets = torch.zeros(len(layout.kinds) * L, dtype=torch.float64)
    kept, removed, feat = layout.split(kept_flat), layout.split(removed_flat), layout.split(feature)
    for ki, kind in enumerate(layout.kinds):
        if kind in FEATURE_KINDS:
            for i in range(L):
                k_vals, r_vals = feat[kind][i][kept[kind][i]], feat[kind][i][removed[kind][i]]
                lo_kept = float(k_vals.min()) if k_vals.numel() else None
                hi_rem = float(r_vals.max()) if r_vals.numel() else None
                if lo_kept is not None and hi_rem is not None:
                    if not lo_kept > hi_rem:
                        raise ConfigError(f"the init metric's {kind} mask of layer {i} does not follow its "
                                          "scores, so the feature policy cannot start from it")
                    offsets[ki * L + i] = -0.5 * (lo_kept + hi_rem)
                elif lo_kept is not None:  # every unit kept: the lowest sits just above the boundary
                    offsets[ki * L + i] = -lo_kept + 0.5
                elif hi_rem is not None:
                    offsets[ki * L + i] = -hi_rem - 0.5
        else:
            key = torch.nan_to_num(allocation.keys[kind][:, 0].double(), nan=0.0)
            k_mask, r_mask = kept[kind][:, 0], removed[kind][:, 0]
            lo_kept = float(key[k_mask].min()) if k_mask.any() else None
            hi_rem = float(key[r_mask].max()) if r_mask.any() else None
            # kept above removed by at least 0.5 (the metric's global order may interleave them)
            z = key + torch.where(k_mask, 0.5, -0.5).double()
            if lo_kept is not None and hi_rem is not None:
                delta = max(0.0, hi_rem - lo_kept)
                z = z + torch.where(k_mask, delta / 2, -delta / 2).double()
                centre = 0.5 * (float(z[k_mask].min()) + float(z[r_mask].max()))
            elif lo_kept is not None:  # every block kept (beside channels / heads): the lowest 0.5 above
                centre = lo_kept
            elif hi_rem is not None:
                centre = hi_rem
            else:
                centre = 0.0
            offsets[ki * L: (ki + 1) * L] = z - centre
    if not math.isfinite(float(offsets.abs().max())):
        raise ConfigError("non-finite initial offsets: the init metric's scores are not finite")
    return offsets


def feature_scores(adapter, stats, kinds, init_method: str, init_raw: dict[str, torch.Tensor]) -> dict:
    """{metric: {kind: raw [L, units]}} for the feature policy: the init metric's own scores first
    (they define its mask), then FEATURE_METRICS scored on `stats` (the init metric's calibration
    statistics, or dense ones)."""
    from pgprune.metrics.scores import scores_from_stats

    fine = tuple(k for k in kinds if k in FEATURE_KINDS)
    out = {init_method: {k: init_raw[k] for k in fine if k in init_raw}}
    if not fine:
        return out
    for name in FEATURE_METRICS:
        if name not in out:
            out[name] = scores_from_stats(adapter, stats, name, fine).raw
    return out
