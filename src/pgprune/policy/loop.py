"""The policy-gradient mask optimisation, top to bottom.

    for each step:
        batch  <- B calibration windows            (seeded by (seed, step): resumable exactly)
        m_1..K <- Bernoulli(s)                      (same generator; antithetic pairs for disarm)
        L_1..K <- masked_losses(model, batch, m)    (one gated forward, no gradients)
        (distributed: rank r seeds with (seed, step, r); masks and losses of all N ranks are
         all-gathered, so every rank updates s identically from N*K samples)
        g      <- estimator(m, s, L, baseline)      (REINFORCE)
        s      <- project(s - lr_t * g)             (back onto the parameter budget)
                  (policy="features": Adam step on a few shared logit parameters, then
                   the budget shift in logit space; policy/features.py)
    hard mask <- the most probable units that fit the budget
                 (select="best": the evaluated hard mask with the lowest held-out perplexity)

Every `eval_every` steps the current hard mask is evaluated (perplexity on held-out text) and a
checkpoint is written atomically; `resume` continues a run to the same result as an
uninterrupted one. NaN / inf losses skip the step (counted) and never touch `s`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from pgprune import atomic
from pgprune.errors import CheckpointError, ConfigError
from pgprune.gating import masked_losses
from pgprune.masks import Masks, UnitCosts
from pgprune.metrics.init import hard_mask
from pgprune.policy.budget import PROJECTIONS, project
from pgprune.policy.distributed import World
from pgprune.policy.estimators import ANTITHETIC, BaselineState, get_estimator
from pgprune.policy.probabilities import UnitLayout, mean_entropy, sample_masks

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
MAX_CONSECUTIVE_SKIPS = 20
SELECTIONS = ("final", "best")
POLICIES = ("units", "features")


@dataclass
class PGConfig:
    sparsity: float
    kinds: tuple[str, ...] = ("channel", "head")
    steps: int = 15000
    k: int = 2
    batch_size: int = 8
    lr: float = 2e-3
    lr_schedule: str = "cosine"  # cosine | constant
    estimator: str = "paper"
    control_variate: bool = False  # subtract what the masks' kept fraction explains (estimators.kept_control)
    projection: str = "cost"
    per_kind_budget: bool = False
    floor: float = 0.0  # keep probabilities within [floor, 1 - floor] so no unit freezes (exploration)
    select: str = "final"  # final | best: the result is the last hard mask, or the evaluated one with the lowest ppl
    policy: str = "units"  # units: one free probability per unit (paper) | features: policy/features.py
    baseline_window: int = 5
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 100

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.steps < 0 or self.batch_size < 1 or self.lr < 0:
            raise ConfigError("steps must be >= 0, batch size >= 1 and lr >= 0")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"lr schedule must be cosine or constant, got {self.lr_schedule!r}")
        if self.select not in SELECTIONS:
            raise ConfigError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.policy == "features" and (self.per_kind_budget or self.floor > 0):
            raise ConfigError("the features policy holds one global budget by a shift in logit space; it has no "
                              "per-kind budget or probability floor (drop --per-kind-budget / --floor)")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {', '.join(PROJECTIONS)}")
        get_estimator(self.estimator, self.k)

    def lr_at(self, step: int) -> float:
        if self.lr_schedule == "constant" or self.steps == 0:
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / self.steps))


@dataclass
class PGResult:
    probs: torch.Tensor  # final s, flat [N]
    masks: Masks  # hard mask under the budget (the final one, or the best evaluated: config.select)
    history: list[dict] = field(default_factory=list)
    selected_step: int | None = None  # the step whose hard mask `masks` is
    skipped_steps: int = 0
    seconds: float = 0.0


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    # One generator per step, derived from (seed, step): a resumed run draws the same batches
    # and masks as an uninterrupted one without saving RNG states. Rank 0 draws what a single
    # process draws; other ranks hash (seed, step, rank) into an independent stream.
    if rank == 0:
        return torch.Generator().manual_seed(seed * 1_000_003 + step)
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]) >> 1)


def read_hard_mask(s: torch.Tensor, layout: UnitLayout, costs: UnitCosts, sparsity: float) -> Masks:
    return hard_mask(layout.split(s.double()), costs, sparsity)


def run_policy_gradient(
    model,
    calib_windows: torch.Tensor,
    s0: torch.Tensor,
    layout: UnitLayout,
    costs: UnitCosts,
    config: PGConfig,
    *,
    out_dir: str | Path | None = None,
    eval_fn: Callable[[Masks], float] | None = None,
    fingerprint: dict | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    loss_fn: Callable = masked_losses,
    world: World | None = None,
    tensorboard: str | Path | None = None,
    policy=None,
) -> PGResult:
    """Optimise keep-probabilities starting at `s0` (flat, see UnitLayout).

    `calib_windows` [P, T]: the pool each step draws `batch_size` windows from.
    `eval_fn(masks) -> perplexity` evaluates a hard mask (None: no periodic evaluation).
    `fingerprint`: what a resumed run must share with the checkpoint (model, data, ...).
    `stop_after`: stop (with a checkpoint) after this many steps of this call: for tests of resume.
    `loss_fn(model, batch, masks, costs=...) -> [K]`: the K losses (default: gated LM loss); `batch`
    comes on the pool's device and loss_fn moves it where the model takes its inputs.
    `world`: distributed sampling (policy/distributed.py); only its rank 0 writes and evaluates.
    `tensorboard`: a folder for TensorBoard event files (loss, baseline, lr, entropy, hard-mask ppl).
    `policy`: a FeaturePolicy when config.policy == "features" (it replaces `s0`; the loop updates it).
    """
    world = world or World()
    config.validate()
    if config.select == "best" and eval_fn is None:
        raise ConfigError("select='best' picks the hard mask with the lowest held-out perplexity, so it needs "
                          "the periodic evaluation (eval_fn)")
    if calib_windows.shape[0] < config.batch_size:
        raise ConfigError(f"calibration pool has {calib_windows.shape[0]} windows, fewer than one batch "
                          f"of {config.batch_size}; raise --nsamples or lower --batch-size")
    estimator = get_estimator(config.estimator, config.k, layout.cost if config.control_variate else None)
    if (policy is None) != (config.policy == "units"):
        raise ConfigError(f"config.policy={config.policy!r} needs "
                          + ("a FeaturePolicy (policy=...)" if policy is None else "no policy object"))
    keep = 1.0 - config.sparsity
    ckpt_dir = Path(out_dir) if out_dir is not None else None
    out = ckpt_dir if world.is_main else None  # where this rank writes logs and checkpoints
    fingerprint = {**(fingerprint or {}), "config": asdict(config), "units": layout.size}
    if world.size > 1:  # the draws depend on the number of ranks
        fingerprint["world_size"] = world.size
    fingerprint = json.loads(json.dumps(fingerprint, default=str))

    if policy is not None:
        fingerprint["policy"] = json.loads(json.dumps(policy.describe()))
        s = policy.probs()
    else:
        s = project(s0.float(), layout, costs, keep, config.projection, config.per_kind_budget, floor=config.floor)
    baseline = BaselineState(window=config.baseline_window)
    start, skipped, history, best = 0, 0, [], None
    if resume:
        s, baseline, start, skipped, history, best, policy_state = _load_checkpoint(ckpt_dir, fingerprint,
                                                                                    rewrite_log=world.is_main)
        if policy is not None:
            policy.load_state_dict(policy_state)
            s = policy.probs()

    t0 = time.perf_counter()
    consecutive_skips = 0
    bar = tqdm(total=config.steps, initial=start, desc="pg", unit="step",
               disable=None if progress and world.is_main else True)
    eval_fn = eval_fn if world.is_main else None
    writer = _tensorboard_writer(tensorboard) if world.is_main else None
    last_ppl = None

    def evaluate(step: int) -> float:
        nonlocal best
        hard = read_hard_mask(s, layout, costs, config.sparsity)
        value = eval_fn(hard)
        if math.isfinite(value) and (best is None or value < best["ppl"]):
            best = {"ppl": value, "step": step, "masks": hard.tensors}
        return value

    if start == 0 and eval_fn is not None:
        last_ppl = evaluate(0)
        history.append({"step": 0, "forward_passes": 0, "hard_ppl": last_ppl, "entropy": mean_entropy(s, layout.present)})
        _append_log(out, history[-1], writer)
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    for step in range(start, end):
        gen = step_generator(config.seed, step, world.rank)
        idx = torch.randperm(calib_windows.shape[0], generator=gen)[: config.batch_size]
        batch = calib_windows[idx]  # loss_fn moves it to the model's input device
        m = sample_masks(s, config.k, gen, antithetic=config.estimator in ANTITHETIC)
        losses = loss_fn(model, batch, layout.masks(m), costs=costs).float().cpu()
        if world.size > 1:  # all N*K samples, rank-major, identical on every rank
            m = world.all_gather(m).reshape(-1, m.shape[-1])
            losses = world.all_gather(losses).reshape(-1)
        record = {"step": step + 1, "forward_passes": (step + 1) * config.k * world.size, "lr": config.lr_at(step)}
        if not torch.isfinite(losses).all():
            skipped += 1
            consecutive_skips += 1
            record.update(skipped=True, losses=[float(x) for x in losses])
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise ConfigError(f"{consecutive_skips} consecutive steps gave NaN/inf losses (step {step + 1}); "
                                  "the model may overflow in this dtype (try --dtype fp32) or the budget may "
                                  "remove whole layers it cannot do without")
        else:
            consecutive_skips = 0
            g, b = estimator(m, s, losses, baseline)
            if policy is not None:
                policy.update(g, s, config.lr_at(step))
                s = policy.probs()
            else:
                s = project(s - config.lr_at(step) * g, layout, costs, keep, config.projection,
                            config.per_kind_budget, floor=config.floor)
            record.update(loss=float(losses.mean()), baseline=b)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            record["entropy"] = mean_entropy(s, layout.present)
            if eval_fn is not None:
                last_ppl = record["hard_ppl"] = evaluate(step + 1)
        history.append(record)
        _append_log(out, record, writer)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in (("loss", record.get("loss")), ("base", record.get("baseline")),
                                                   ("ent", record.get("entropy")), ("ppl", last_ppl)) if v is not None})
        if out is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == end):
            _save_checkpoint(out, s, baseline, step + 1, skipped, history, fingerprint, best,
                             None if policy is None else policy.state_dict())
    bar.close()
    if writer is not None:
        writer.close()
    if config.select == "best" and best is not None:
        masks, selected = Masks(dict(best["masks"])), best["step"]
    else:
        masks, selected = read_hard_mask(s, layout, costs, config.sparsity), end
    return PGResult(probs=s, masks=masks, history=history, skipped_steps=skipped,
                    seconds=time.perf_counter() - t0, selected_step=selected)


TENSORBOARD_SCALARS = ("loss", "baseline", "lr", "entropy", "hard_ppl")


def require_tensorboard():
    """torch's SummaryWriter class, or a ConfigError saying how to install what it needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("TensorBoard logging needs the tensorboard package: pip install 'pgprune[tensorboard]'") from e
    return SummaryWriter


def _tensorboard_writer(log_dir):
    return None if log_dir is None else require_tensorboard()(str(log_dir))


def _append_log(out: Path | None, record: dict, writer=None) -> None:
    if writer is not None:
        for key in TENSORBOARD_SCALARS:
            if record.get(key) is not None:
                writer.add_scalar(f"pg/{key}", record[key], record["step"])
        writer.flush()
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _save_checkpoint(out: Path, s, baseline, step, skipped, history, fingerprint, best=None, policy=None) -> None:
    state = {"step": step, "probs": s, "baseline": baseline.state_dict(), "skipped": skipped,
             "history": history, "fingerprint": fingerprint, "best": best, "policy": policy}
    with atomic.temp_path(out / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(out: Path | None, fingerprint: dict, rewrite_log: bool = True):
    path = None if out is None else out / CHECKPOINT_FILE
    if path is None or not path.is_file():
        raise CheckpointError(f"no checkpoint to resume in {out}; start a new run without --resume")
    state = torch.load(path, weights_only=False)
    diffs = _differences(state["fingerprint"], fingerprint)
    if diffs:
        raise CheckpointError(f"refusing to resume {out}: the run was started with different settings: "
                              + "; ".join(diffs) + ". Resume with the original settings or start a new run.")
    history = state["history"]
    # The log may hold records written after the checkpoint: rewrite it to the checkpoint's.
    if rewrite_log:
        atomic.write_text(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))
    return (state["probs"], BaselineState.from_state(state["baseline"]), state["step"], state["skipped"], history,
            state.get("best"), state.get("policy"))


def _differences(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} then, {new!r} now"]
