"""The arithmetic of a parameter budget, shared by the metric allocations and the policies.

A budget is a sparsity: the fraction of the prunable parameters removed (DESIGN.md), nesting
included (a head's parameters count only while its attention block and layer are kept).

- which units exist (`present_units`) and what a valid sparsity is (`check_sparsity`);
- removal orders and their prefixes: the prefix of an order whose true sparsity is closest to the
  target (`closest_prefix`), the ascending-score order over every layer and kind
  (`global_positions`), and the hard mask that keeps the most probable units (`hard_mask`);
- expectations under independent Bernoulli keep-probabilities (`expected_keep_ratio`), the common
  logit shift that meets a budget (`solve_shift`), and the projection of probabilities onto the
  budget after a policy-gradient step (`project`):

      s <- clamp(s - v * c, 0, 1),   v found by bisection so that the expected kept fraction of
                                     the prunable parameters equals the keep ratio,

  `c` each unit's parameter cost (mode "cost", the default: the Euclidean projection onto the
  cost-weighted budget), or 1 for every unit (mode "uniform": the paper's plain shift); with
  `per_kind=True` every unit kind keeps the keep ratio of its own parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pgprune.errors import ConfigError
from pgprune.masks import UNIT_KINDS, Masks, UnitCosts

_NEVER = torch.iinfo(torch.long).max  # position of units that do not exist


def present_units(costs: UnitCosts, kind: str) -> torch.Tensor:
    """[L, units] True where a unit of `kind` exists (its block and layer included)."""
    U = costs.units_per_layer(kind)
    if kind in ("head", "channel"):
        width = costs.num_kv_heads if kind == "head" else costs.intermediate
        return torch.arange(U)[None, :] < width[:, None]
    attn, mlp = costs.num_kv_heads > 0, costs.intermediate > 0
    return {"attn": attn, "mlp": mlp, "layer": attn | mlp}[kind][:, None].clone()


def check_sparsity(sparsity: float) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ConfigError(f"sparsity must be in [0, 1) (the fraction of prunable parameters to remove), "
                          f"got {sparsity!r}")
    return s


# --- prefix of an order ------------------------------------------------------------------------------
def masks_from_positions(positions: dict[str, torch.Tensor], n: int) -> Masks:
    """The mask that removes the first n units of an order (`positions[kind]`: [L, units] long)."""
    return Masks({k: p >= n for k, p in positions.items()})


def _sparsity_at(positions, n, costs) -> float:
    return masks_from_positions(positions, n).sparsity(costs)


@dataclass
class Prefix:
    n: int  # units removed
    sparsity: float  # their true sparsity


def closest_prefix(positions: dict[str, torch.Tensor], costs: UnitCosts, target: float, *,
                   tolerance: float | None = None, what: str = "these units") -> Prefix:
    """The prefix of the order whose sparsity is closest to `target` (ties: the shorter one).

    Raises ConfigError when the target cannot be met: beyond what removing every unit gives,
    further than `tolerance` (default: the largest single unit) from any prefix, or rounding to
    removing nothing at all."""
    n_max = int(sum(int((p != _NEVER).sum()) for p in positions.values()))
    s_max = _sparsity_at(positions, n_max, costs)
    if target == 0.0:
        return Prefix(0, 0.0)
    unit = max_unit_fraction(costs, tuple(positions))
    tol = unit if tolerance is None else float(tolerance)
    if n_max == 0 or target > s_max + tol:
        raise ConfigError(f"sparsity {target:g} cannot be reached by removing {what}: removing all of them "
                          f"gives {s_max:.4f}. Lower the sparsity or add unit kinds (e.g. --units channel,head).")
    lo, hi = 0, n_max  # invariant: s(lo) <= target, and s(hi) > target unless hi == n_max
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _sparsity_at(positions, mid, costs) <= target:
            lo = mid
        else:
            hi = mid - 1
    s_lo = _sparsity_at(positions, lo, costs)
    best, s_best = lo, s_lo
    if lo < n_max:
        s_hi = _sparsity_at(positions, lo + 1, costs)
        if abs(s_hi - target) < abs(s_lo - target):
            best, s_best = lo + 1, s_hi
    if best == 0:
        s_one = _sparsity_at(positions, 1, costs)
        raise ConfigError(f"sparsity {target:g} rounds to removing nothing with {what}: the smallest step "
                          f"is one unit = sparsity {s_one:.4f}. Ask for at least that, or use finer units.")
    if abs(s_best - target) > tol:
        s_next = _sparsity_at(positions, min(lo + 1, n_max), costs)
        raise ConfigError(f"sparsity {target:g} cannot be met within {tol:.4g} with {what}: the nearest "
                          f"reachable sparsities are {s_lo:.4f} and {s_next:.4f}. Ask for one of them "
                          "or use finer units.")
    return Prefix(best, s_best)


def max_unit_fraction(costs: UnitCosts, kinds) -> float:
    """The largest single unit of `kinds`, as a fraction of the prunable parameters."""
    biggest = 0
    for k in kinds:
        c = costs.unit_cost(k)[present_units(costs, k)]
        if c.numel():
            biggest = max(biggest, int(c.max()))
    return biggest / max(costs.prunable_params, 1)


def finite_or_never(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    bad = present & ~torch.isfinite(scores)
    if bad.any():
        raise ConfigError("scores contain NaN or infinite values for existing units; check the "
                          "calibration data (all-constant inputs?) or the model weights")
    return present


def global_positions(keys: dict[str, torch.Tensor], costs: UnitCosts) -> dict[str, torch.Tensor]:
    """Ascending key over all layers and kinds; ties in (kind, layer, unit) order."""
    flat_keys, owners = [], []
    for kind in UNIT_KINDS:
        if kind not in keys:
            continue
        pres = finite_or_never(keys[kind], present_units(costs, kind))
        idx = pres.flatten().nonzero().squeeze(1)
        flat_keys.append(keys[kind].flatten()[idx].double())
        owners += [(kind, idx)]
    positions = {k: torch.full(keys[k].shape, _NEVER, dtype=torch.long) for k in keys}
    if not flat_keys:
        return positions
    allk = torch.cat(flat_keys)
    order = torch.sort(allk, stable=True).indices  # stable: ties keep (kind, layer, unit) order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    start = 0
    for kind, idx in owners:
        positions[kind].view(-1)[idx] = rank[start:start + idx.numel()]
        start += idx.numel()
    return positions


# --- expectations under Bernoulli keep-probabilities ---------------------------------------------
def expected_keep_ratio(probs: dict[str, torch.Tensor], costs: UnitCosts) -> torch.Tensor:
    """Expected kept fraction of the prunable parameters when each unit is kept independently
    with its probability (kinds absent from `probs` are kept). Accepts [L, units] tensors or
    [..., L, units] stacks (returns [...]). Ignores the rule that a block whose units are all
    removed loses its own small fixed parameters (biases, norms)."""
    ref = next(iter(probs.values()))
    lead = ref.shape[:-2]
    L = costs.num_layers
    dt = torch.float64

    def p(kind: str) -> torch.Tensor:
        if kind not in probs:
            return torch.ones(*lead, L, costs.units_per_layer(kind), dtype=dt)
        return probs[kind].to(dt) * present_units(costs, kind)

    heads = p("head").sum(-1) * costs.head_cost
    chans = p("channel").sum(-1) * costs.channel_cost
    attn = p("attn")[..., 0] * (costs.attn_fixed + heads) * (costs.num_kv_heads > 0)
    mlp = p("mlp")[..., 0] * (costs.mlp_fixed + chans) * (costs.intermediate > 0)
    layer = p("layer")[..., 0] * (costs.layer_fixed * ((costs.num_kv_heads > 0) | (costs.intermediate > 0)) + attn + mlp)
    return layer.sum(-1) / costs.prunable_params


def solve_shift(logits: dict[str, torch.Tensor], costs: UnitCosts, keep: float) -> float:
    """b such that expected_keep_ratio(sigmoid(logits + b)) == keep (monotone: bisection)."""
    f = lambda b: float(expected_keep_ratio({k: torch.sigmoid(z + b) for k, z in logits.items()}, costs))  # noqa: E731
    lo, hi = -60.0, 60.0
    if not (f(lo) < keep < f(hi)):
        raise ConfigError(f"keep ratio {keep:.4f} cannot be an expectation over these units: it must lie "
                          f"between {f(lo):.4f} (every unit dropped) and {f(hi):.4f} (every unit kept)")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) < keep:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def hard_mask(probs: dict[str, torch.Tensor], costs: UnitCosts, sparsity: float, *,
              tolerance: float | None = None, multiple: int = 1) -> Masks:
    """Top-k under the budget: keep the most probable units, removing the least probable prefix
    whose true sparsity is closest to `sparsity` (the same rule as the metric allocations; ties
    in (kind, layer, unit) order). `multiple` > 1: MLP widths then rounded by probability
    (`round_widths`)."""
    target = check_sparsity(sparsity)
    positions = global_positions({k: v.double() for k, v in probs.items()}, costs)
    pre = closest_prefix(positions, costs, target, tolerance=tolerance,
                         what="+".join(probs) + " units by probability")
    masks = masks_from_positions(positions, pre.n)
    if multiple > 1:
        masks = round_widths(masks, probs, costs, multiple, target)[0]
    return masks


def per_kind_hard_mask(probs: dict[str, torch.Tensor], costs: UnitCosts, sparsity: float) -> Masks:
    """The reference code's hard mask: each kind on its own removes the floor(n * sparsity) least
    probable of its n units (over all layers), units tied with the first kept one kept too."""
    target = check_sparsity(sparsity)
    out = {}
    for kind, p in probs.items():
        present = present_units(costs, kind)
        values = p.double()[present]
        keep = present.clone()
        n_remove = int(values.numel() * target)
        if n_remove:
            threshold = torch.sort(values).values[n_remove]
            keep[present] = values >= threshold
        out[kind] = keep
    return Masks(out)


# --- projection onto the budget -------------------------------------------------------------------
# cost: one budget over all kinds, shift proportional to unit cost; uniform: the same shift for every
# unit; reference: the authors' code, each kind keeps `keep` of its unit count, shifted down only
PROJECTIONS = ("cost", "uniform", "reference")


def project(s: torch.Tensor, layout, costs: UnitCosts, keep: float, mode: str = "cost",
            per_kind: bool = False, iters: int = 100, floor: float = 0.0) -> torch.Tensor:
    """Project `s` [N] onto {expected keep ratio == keep}; returns a new float32 vector.
    `floor` > 0 keeps every unit within [floor, 1 - floor] (exploration: no unit freezes)."""
    if mode not in PROJECTIONS:
        raise ConfigError(f"projection must be one of {', '.join(PROJECTIONS)}, got {mode!r}")
    if not 0.0 <= floor < 0.5:
        raise ConfigError(f"the probability floor must be in [0, 0.5), got {floor}")
    lo, hi = floor, 1.0 - floor
    s64 = s.double()
    if mode == "reference":
        return _project_down_per_kind(s64, layout, keep, lo, hi).float()
    scale = layout.cost / layout.cost[layout.present].max() if mode == "cost" else layout.present.double()
    if per_kind:
        # Each kind keeps `keep` of its own units' parameters (cost-weighted mean of s).
        out, scales, unit_cost = layout.split(s64.clone()), layout.split(scale), layout.split(layout.cost)
        for kind in layout.kinds:
            c = unit_cost[kind]
            f = lambda v, k=kind, c=c: float(((out[k] - v * scales[k]).clamp(lo, hi) * c).sum() / c.sum())  # noqa: E731
            v = _bisect(f, keep, f"the {kind} units", iters)
            out[kind] = (out[kind] - v * scales[kind]).clamp(lo, hi)
        return (layout.merge(out) * layout.present).float()

    def f(v: float) -> float:
        return float(expected_keep_ratio(layout.split((s64 - v * scale).clamp(lo, hi) * layout.present), costs))

    v = _bisect(f, keep, "+".join(layout.kinds) + " units", iters)
    return ((s64 - v * scale).clamp(lo, hi) * layout.present).float()


def _project_down_per_kind(s64: torch.Tensor, layout, keep: float, lo: float, hi: float,
                           iters: int = 100) -> torch.Tensor:
    """Each kind: clamp(s - v) with v >= 0 so that its units sum to keep x their count; a kind
    already under that budget is only clamped (the reference code never shifts up)."""
    out, present = layout.split(s64.clone()), layout.split(layout.present)
    for kind in layout.kinds:
        x, target = out[kind], keep * float(present[kind].sum())
        total = lambda v, x=x, p=present[kind]: float(((x - v).clamp(lo, hi) * p).sum())  # noqa: E731
        v = 0.0
        if total(0.0) > target:
            v_lo, v_hi = 0.0, max(float(x.max()), 0.0) + 1.0
            for _ in range(iters):
                mid = 0.5 * (v_lo + v_hi)
                v_lo, v_hi = (mid, v_hi) if total(mid) > target else (v_lo, mid)
            v = 0.5 * (v_lo + v_hi)
        out[kind] = (x - v).clamp(lo, hi)
    return layout.merge(out) * layout.present


def _bisect(f, keep: float, what: str, iters: int = 100) -> float:
    """v with f(v) == keep for f decreasing in v (f(-inf) = all kept, f(+inf) = none kept)."""
    lo, hi = -1.0, 1.0
    while f(lo) < keep:
        lo *= 2
        if lo < -1e6:
            raise ConfigError(f"keep ratio {keep:.4f} is above what {what} can reach even when all are kept "
                              f"({f(lo):.4f}); lower the budget or prune other unit kinds")
    while f(hi) > keep:
        hi *= 2
        if hi > 1e6:
            raise ConfigError(f"keep ratio {keep:.4f} is below what {what} can reach even when all are "
                              f"removed ({f(hi):.4f}): the rest of the model is larger than the budget")
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) > keep:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# --- widths that quantize ---------------------------------------------------------------------------
# llama.cpp's q8_0 / q4_0 need row lengths that are multiples of 32, its k-quants 256; GPU kernels
# like multiples of 64 or 128. `--width-multiple N` makes every kept MLP width a multiple of N.
# Attention is pruned in whole KV-head groups, whose row counts are already multiples of head_dim
# (64 for SmolLM2); a group count is not rounded (with 3 groups a layer, rounding to an even count
# would move a third of the layer's attention at once).
def check_width_multiple(multiple, costs: UnitCosts | None = None) -> int:
    """N as an int >= 1; with `costs`, N must divide every present layer's MLP width."""
    try:
        n = int(multiple)
    except (TypeError, ValueError):
        raise ConfigError(f"--width-multiple must be a whole number >= 1, got {multiple!r}") from None
    if n != multiple or n < 1:
        raise ConfigError(f"--width-multiple must be a whole number >= 1 (1: no constraint), got {multiple!r}")
    if costs is not None and n > 1:
        widths = [int(w) for w in costs.intermediate if int(w) > 0]
        bad = sorted({w for w in widths if w % n})
        if bad:
            raise ConfigError(f"--width-multiple {n} does not divide the model's MLP widths ({', '.join(map(str, bad))} "
                              f"channels): every kept width could not be a multiple of {n}. Choose a divisor of "
                              f"{math.gcd(*widths)} (e.g. 32 for llama.cpp's q8_0 / q4_0)")
    return n


def check_kept_widths(kept: torch.Tensor, multiple: int) -> None:
    """Refuse a layer that keeps fewer MLP channels than the multiple (rounding would remove the
    block or more than double it). `kept`: [L] channels each layer keeps (0: block removed)."""
    small = [(i, int(k)) for i, k in enumerate(kept.tolist()) if 0 < k < multiple]
    if small:
        where = ", ".join(f"layer {i}: {k}" for i, k in small[:6]) + (" ..." if len(small) > 6 else "")
        raise ConfigError(f"--width-multiple {multiple} is larger than the MLP width some layers keep at this "
                          f"sparsity ({where} channels). Lower --width-multiple or the sparsity")


@dataclass
class Rounding:
    """What `round_widths` changed: per layer the channels before and after, and which layers went up."""
    before: list[int]
    after: list[int]
    rounded_up: list[int]
    rounded_down: list[int]
    sparsity: float

    def to_dict(self) -> dict:
        return {"channels_before": self.before, "channels_after": self.after, "rounded_up": self.rounded_up,
                "rounded_down": self.rounded_down, "sparsity": self.sparsity}


def round_widths(masks: Masks, keys: dict[str, torch.Tensor], costs: UnitCosts, multiple: int,
                 target: float) -> tuple[Masks, Rounding]:
    """Round every kept MLP width of `masks` to a multiple of `multiple`, by the scores `keys`
    (higher = more important; `keys["channel"]` [L, units]).

    Each layer whose kept count k is not a multiple either rounds down (drops its k mod N least
    important kept channels) or up (keeps its N - k mod N most important removed ones): the N
    channels between the two choices are the layer's boundary chunk. Chunks are ranked globally by
    their mean key; the best ones are kept, as many as bring the true sparsity closest to `target`
    (ties: the fewer kept). So a layer moves by less than N channels and the total lands within
    about half a chunk of the target."""
    n = check_width_multiple(multiple)
    if n == 1 or "channel" not in masks.kinds:
        kept = masks.effective(costs)["channel"].sum(-1).tolist() if "channel" in masks.kinds else []
        return masks, Rounding(kept, kept, [], [], float(masks.sparsity(costs)))
    if masks.num_masks is not None:
        raise ConfigError("round_widths rounds one mask, not a stack")
    eff = masks.effective(costs)
    chans = eff["channel"]
    kept = chans.sum(-1)
    check_kept_widths(kept, n)
    key = keys["channel"].double()
    base = masks["channel"].clone()
    down = base & eff["mlp"][:, None]
    chunks: list[tuple[float, int, torch.Tensor]] = []  # (mean key, layer, the units of the up choice)
    for i in range(costs.num_layers):
        k, w = int(kept[i]), int(costs.intermediate[i])
        r = k % n
        if r == 0 or not bool(eff["mlp"][i]):
            continue
        present = torch.arange(key.shape[1]) < w
        finite_or_never(key[i], present)
        kept_idx = chans[i].nonzero().squeeze(1)
        removed_idx = (present & ~chans[i]).nonzero().squeeze(1)
        # least important kept first; most important removed first (ties: lower index less important)
        lo = kept_idx[torch.sort(key[i, kept_idx], stable=True).indices[:r]]
        asc = removed_idx[torch.sort(key[i, removed_idx], stable=True).indices]
        hi = asc[asc.numel() - (n - r):]
        down[i, lo] = False
        chunks.append((float(key[i, torch.cat([lo, hi])].mean()), i, torch.cat([lo, hi])))
    chunks.sort(key=lambda c: (-c[0], c[1]))

    def with_up(m: int) -> Masks:
        t = down.clone()
        for _, i, units in chunks[:m]:
            t[i, units] = True
        return Masks({**masks.tensors, "channel": t})

    best, best_gap = None, None
    for m in range(len(chunks) + 1):
        cand = with_up(m)
        gap = abs(float(cand.sparsity(costs)) - target)
        if best_gap is None or gap < best_gap - 1e-15:
            best, best_gap = m, gap
    out = with_up(best)
    after = out.effective(costs)["channel"].sum(-1)
    up = sorted(i for _, i, _ in chunks[:best])
    dn = sorted(i for _, i, _ in chunks[best:])
    return out, Rounding(kept.tolist(), after.tolist(), up, dn, float(out.sparsity(costs)))
