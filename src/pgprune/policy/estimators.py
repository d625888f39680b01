"""Score-function (REINFORCE) gradient estimators of E_{m ~ Bernoulli(s)}[L(m)] with respect to s.

Each takes the K sampled masks m [K, N] (0/1), the probabilities s [N], the K losses L [K] and a
baseline state, and returns the gradient estimate g [N] (the loop steps s <- s - lr * g).

- `paper`: the reference code's estimator. Moving-average baseline b over the last `window` mean
  losses; per-unit term (m - s) / sqrt(s (1 - s)); sum over samples divided by (K - 1). Its
  baseline mode "others" instead gives sample k the mean loss of the other K - 1 masks of the same
  step (same batch): a batch's difficulty is then no longer part of any advantage.
- `loo`: the exact Bernoulli score (m - s) / (s (1 - s)) with the leave-one-out baseline
  b_k = mean of the other K - 1 losses (unbiased, needs K >= 2); mean over samples.
- `disarm`: DisARM (Dong, Mnih & Tucker, 2020), unbiased, for antithetic pairs: masks 2j and 2j+1
  share one uniform draw u, m = [u < s] and m~ = [1 - u < s] (`sample_masks(..., antithetic=True)`,
  K even). A unit gets signal only from pairs where its two masks differ:
  dE/d logit_i ~ 1/2 (L(m) - L(m~)) (-1)^m~_i [m_i != m~_i] max(s_i, 1 - s_i), mean over pairs.
  Units the pair agrees on (most confident ones) get exactly zero instead of the loss noise.

Optional control variate (`kept_control`, `--control-variate`), for any estimator: independent
masks keep a random amount of the model, and much of the spread of their losses is that amount,
which says nothing about which units to keep. Each loss gets beta * (r_k - E[r]) subtracted, r_k
= the cost-weighted kept fraction of mask k (linear in the mask), beta = the slope of loss on r
fitted on earlier steps (within-step differences, exponential moving average), and the
estimator's own expected response to a loss linear in the mask is added back, so the estimate
keeps its expectation (exactly, as beta does not depend on the current samples).
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from pgprune.errors import ConfigError

# Probabilities are kept away from {0, 1} in the denominators: a unit at exactly 0 or 1 is
# deterministic (m == s), so its numerator is 0 anyway.
_EPS = 1e-6
_KEPT_DECAY = 0.95  # the control variate's moving average (~20 steps)


@dataclass
class BaselineState:
    """The `paper` estimator's baseline. mode "previous": the mean of the last `window` mean losses,
    the current one excluded; "ema": the reference code's, b_t = (1 - 1/window) b_(t-1) + mean loss_t / window,
    the current step included (b_0 = the first mean loss); "others": per sample, the mean loss of the
    step's other K - 1 masks (`paper_estimator` computes it; no state)."""
    window: int = 5
    history: deque = field(default_factory=deque)
    mode: str = "previous"
    ema: float | None = None
    # control variate: moving averages of the within-step products of kept fraction and loss
    kept_cov: float = 0.0
    kept_var: float = 0.0

    def value(self, current_mean: float) -> float:
        if self.mode == "ema":
            return current_mean if self.ema is None else self.ema + (current_mean - self.ema) / self.window
        return sum(self.history) / len(self.history) if self.history else current_mean

    def push(self, mean_loss: float) -> None:
        if self.mode == "ema":
            self.ema = self.value(mean_loss)
        self.history.append(mean_loss)
        while len(self.history) > self.window:
            self.history.popleft()

    def kept_slope(self) -> float:
        """Least-squares slope of loss on kept fraction over the earlier steps (0 before any)."""
        return self.kept_cov / self.kept_var if self.kept_var > 0 else 0.0

    def push_kept(self, kept: torch.Tensor, losses: torch.Tensor) -> None:
        dr, dl = kept.double() - kept.double().mean(), losses.double() - losses.double().mean()
        a = _KEPT_DECAY
        self.kept_cov = a * self.kept_cov + (1 - a) * float((dr * dl).sum())
        self.kept_var = a * self.kept_var + (1 - a) * float((dr * dr).sum())

    def state_dict(self) -> dict:
        return {"window": self.window, "history": list(self.history), "kept_cov": self.kept_cov,
                "kept_var": self.kept_var, "mode": self.mode, "ema": self.ema}

    @classmethod
    def from_state(cls, d: dict) -> "BaselineState":
        return cls(window=d["window"], history=deque(d["history"]), kept_cov=d["kept_cov"], kept_var=d["kept_var"],
                   mode=d["mode"], ema=d["ema"])


def paper_estimator(m: torch.Tensor, s: torch.Tensor, losses: torch.Tensor,
                    baseline: BaselineState) -> tuple[torch.Tensor, float]:
    k = m.shape[0]
    if baseline.mode == "others":  # leave-one-out: the same batch's other masks (K >= 2, checked in config)
        b_k = (losses.double().sum() - losses.double()) / (k - 1)
        b = float(b_k.mean())
    else:
        b = b_k = baseline.value(float(losses.mean()))
    adv = (losses.double() - b_k)[:, None]
    score = (m.double() - s.double()) / torch.sqrt((s.double() * (1 - s.double())).clamp_min(_EPS))
    g = (adv * score).sum(0) / max(k - 1, 1)
    baseline.push(float(losses.mean()))
    return g.float(), b


def loo_estimator(m: torch.Tensor, s: torch.Tensor, losses: torch.Tensor,
                  baseline: BaselineState) -> tuple[torch.Tensor, float]:
    k = m.shape[0]
    total = losses.double().sum()
    b_k = (total - losses.double()) / (k - 1)
    adv = (losses.double() - b_k)[:, None]
    score = (m.double() - s.double()) / (s.double() * (1 - s.double())).clamp_min(_EPS)
    g = (adv * score).mean(0)
    baseline.push(float(losses.mean()))
    return g.float(), float(b_k.mean())


def disarm_estimator(m: torch.Tensor, s: torch.Tensor, losses: torch.Tensor,
                     baseline: BaselineState) -> tuple[torch.Tensor, float]:
    m, m_anti = m[0::2].double(), m[1::2].double()
    s64 = s.double()
    half_diff = 0.5 * (losses[0::2].double() - losses[1::2].double())[:, None]
    g_logit = half_diff * (1 - 2 * m_anti) * (m != m_anti) * torch.maximum(s64, 1 - s64)
    g = g_logit.mean(0) / (s64 * (1 - s64)).clamp_min(_EPS)  # d/ds = d/dlogit / (s (1 - s))
    baseline.push(float(losses.mean()))  # no baseline needed; kept for the log and checkpoints
    return g.float(), float(losses.mean())


@dataclass(frozen=True)
class Estimator:
    """One registry entry: the estimate, what it needs of K, and its expected response to a loss
    linear in the mask, L(m) = c . m (what the control variate adds back)."""
    name: str
    estimate: Callable  # (m [K, N], s [N], losses [K], BaselineState) -> (g [N], baseline value)
    linear_response: Callable  # (c [N], s [N], K) -> E[estimate] for L(m) = c . m
    min_samples: int = 1
    antithetic: bool = False  # its K masks are drawn as antithetic pairs (K even)
    summary: str = ""


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    # the rescaled score summed over K and divided by K - 1 gives c sqrt(s (1 - s)) K / (K - 1)
    Estimator("paper", paper_estimator, lambda c, s, k: c * torch.sqrt(s * (1 - s)) * k / max(k - 1, 1),
              summary="the reference code's: (m - s) / sqrt(s (1 - s)), moving-average baseline"),
    Estimator("loo", loo_estimator, lambda c, s, k: c, min_samples=2,
              summary="exact Bernoulli score with the leave-one-out baseline (unbiased)"),
    Estimator("disarm", disarm_estimator, lambda c, s, k: c, min_samples=2, antithetic=True,
              summary="antithetic pairs, DisARM (unbiased)"),
)}


def get_estimator(name: str, k: int, control_cost: torch.Tensor | None = None):
    """The estimate function of `name`, checked against K; with `control_cost` (each unit's parameter
    cost) it carries the kept-fraction control variate (`kept_control`), same call signature."""
    if name not in ESTIMATORS:
        raise ConfigError(f"unknown estimator {name!r}; choose from {', '.join(ESTIMATORS)}")
    e = ESTIMATORS[name]
    if k < e.min_samples:
        raise ConfigError(f"the {name!r} estimator needs K >= {e.min_samples} masks per step (got K={k})")
    if e.antithetic and k % 2:
        raise ConfigError(f"the {name!r} estimator draws its masks in antithetic pairs: K must be even (got K={k})")
    if control_cost is not None:
        return functools.partial(kept_control, name, cost=control_cost)
    return e.estimate


def kept_control(name: str, m: torch.Tensor, s: torch.Tensor, losses: torch.Tensor, baseline: BaselineState,
                 cost: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Estimator `name` with the kept-fraction control variate (module text). `cost` [N]: each
    unit's parameter cost (0 for absent units)."""
    c = cost.double() / cost.double().sum()
    kept = m.double() @ c  # [K]
    beta = baseline.kept_slope()
    adjusted = losses.double() - beta * (kept - float(s.double() @ c))
    e = ESTIMATORS[name]
    g, b = e.estimate(m, s, adjusted.float(), baseline)
    g = g.double() + beta * e.linear_response(c, s.double(), m.shape[0])
    baseline.push_kept(kept, losses)
    return g.float(), b
