"""The policy-gradient mask optimisation, top to bottom.

    for each step:
        batch  <- B calibration windows            (seeded by (seed, step): resumable exactly;
                                                    batches="stream": the pool's next B windows)
        m_1..K <- policy.sample(K)                  (same generator; Bernoulli(probs), antithetic pairs
                                                    for disarm; the search policy: perturbed hard masks)
        L_1..K <- loss_fn(model, batch, m)          (gated or gathered forward, no gradients)
        (distributed: rank r seeds with (seed, step, r); masks and losses of all N ranks are
         all-gathered, so every rank updates identically from N*K samples)
        policy.learn(m, L)                          (REINFORCE: g <- estimator(m, s, L, baseline), then
                                                    policy.update(g, lr_t) and back onto the budget)
        log; every eval_every steps: evaluate the hard mask, checkpoint
    hard mask <- policy.hard_mask()   (select="best": the evaluated one with the lowest perplexity)

Every `eval_every` steps the current hard mask is evaluated (perplexity on held-out text) and a
checkpoint is written atomically; `resume` continues a run to the same result as an
uninterrupted one. NaN / inf losses skip the step (counted) and never touch the policy.
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

from pgprune import run_folder
from pgprune.config import PGSettings, differences
from pgprune.errors import CheckpointError, ConfigError
from pgprune.gating import masked_losses
from pgprune.masks import Masks
from pgprune.policy.distributed import World
from pgprune.policy.estimators import ESTIMATORS, BaselineState, get_estimator
from pgprune.policy.probabilities import Policy, mean_entropy

MAX_CONSECUTIVE_SKIPS = 20


@dataclass
class PGResult:
    probs: torch.Tensor  # final s, flat [N]
    masks: Masks  # hard mask under the budget (the final one, or the best evaluated: pg.select)
    history: list[dict] = field(default_factory=list)
    selected_step: int | None = None  # the step whose hard mask `masks` is
    skipped_steps: int = 0
    seconds: float = 0.0  # the loop's time over every process that ran it (a resumed run: the earlier ones too)
    resumed_at: int | None = None  # the step a resumed run went on from


def lr_at(pg: PGSettings, step: int) -> float:
    if pg.lr_schedule == "constant" or pg.steps == 0:
        return pg.lr
    return pg.lr * 0.5 * (1.0 + math.cos(math.pi * step / pg.steps))


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    # One generator per step, derived from (seed, step): a resumed run draws the same batches
    # and masks as an uninterrupted one without saving RNG states. Rank 0 draws what a single
    # process draws; other ranks hash (seed, step, rank) into an independent stream.
    if rank == 0:
        return torch.Generator().manual_seed(seed * 1_000_003 + step)
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]) >> 1)


def run_policy_gradient(
    model,
    calib_windows: torch.Tensor,
    policy: Policy,
    pg: PGSettings,
    *,
    seed: int = 0,
    out_dir: str | Path | None = None,
    eval_fn: Callable[[Masks], float] | None = None,
    fingerprint: dict | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    loss_fn: Callable = masked_losses,
    loss_fn_before: tuple[int, Callable] | None = None,
    world: World | None = None,
    tensorboard: str | Path | None = None,
) -> PGResult:
    """Optimise `policy` (a UnitPolicy or FeaturePolicy, at its start) with the settings `pg`.

    `calib_windows` [P, T]: the pool each step draws `pg.batch_size` windows from.
    `eval_fn(masks) -> perplexity` evaluates a hard mask (None: no periodic evaluation, and then
    select="best" has nothing to choose among: the final mask, `selected_step` says so).
    `fingerprint`: what else a resumed run must share with the checkpoint (model, data, ...).
    `stop_after`: stop (with a checkpoint) after this many steps of this call: for tests of resume.
    `loss_fn(model, batch, masks, costs=...) -> [K]`: the K losses (default: gated LM loss); `batch`
    comes on the pool's device and loss_fn moves it where the model takes its inputs.
    `loss_fn_before=(n, fn)`: the first n steps score with `fn` instead (a cheap objective before a costly one).
    `world`: distributed sampling (policy/distributed.py); only its rank 0 writes and evaluates.
    `tensorboard`: a folder for TensorBoard event files (loss, baseline, lr, entropy, hard-mask ppl).
    """
    world = world or World()
    layout, costs = policy.layout, policy.costs
    if calib_windows.shape[0] < pg.batch_size:
        raise ConfigError(f"calibration pool has {calib_windows.shape[0]} windows, fewer than one batch "
                          f"of {pg.batch_size}; raise --nsamples or lower --batch-size")
    estimator = get_estimator(pg.estimator, pg.k, layout.cost if pg.control_variate else None)
    antithetic = ESTIMATORS[pg.estimator].antithetic
    ckpt_dir = Path(out_dir) if out_dir is not None else None
    out = ckpt_dir if world.is_main else None  # where this rank writes logs and checkpoints
    fingerprint = {**(fingerprint or {}), "pg": asdict(pg), "seed": seed, "units": layout.size,
                   "policy": policy.describe()}
    if world.size > 1:  # the draws depend on the number of ranks
        fingerprint["world_size"] = world.size
    fingerprint = json.loads(json.dumps(fingerprint, default=str))

    if pg.batches == "stream" and calib_windows.shape[0] < pg.steps * pg.batch_size * world.size:
        raise ConfigError(f"streamed batches use each window once: the pool has {calib_windows.shape[0]} windows, "
                          f"{pg.steps} steps x {pg.batch_size} x {world.size} rank(s) need more")
    baseline = BaselineState(window=pg.baseline_window, mode=pg.baseline)
    start, skipped, history, best, seconds_before = 0, 0, [], None, 0.0
    if resume:
        state = _load_checkpoint(ckpt_dir, fingerprint, rewrite_log=world.is_main)
        policy.load_state_dict(state["policy"])
        baseline = BaselineState.from_state(state["baseline"])
        start, skipped, history, best = state["step"], state["skipped"], state["history"], state.get("best")
        seconds_before = state.get("seconds", 0.0)  # older checkpoints lack it: their earlier time is lost

    t0 = time.perf_counter()
    consecutive_skips = 0
    bar = tqdm(total=pg.steps, initial=start, desc="pg", unit="step",
               disable=None if progress and world.is_main else True)
    eval_fn = eval_fn if world.is_main else None
    writer = _tensorboard_writer(tensorboard) if world.is_main else None
    last_ppl = None

    def evaluate(step: int) -> float:
        nonlocal best
        hard = policy.hard_mask()
        value = eval_fn(hard)
        if math.isfinite(value) and (best is None or value < best["ppl"]):
            best = {"ppl": value, "step": step, "masks": hard.tensors}
        return value

    if start == 0 and eval_fn is not None:
        last_ppl = evaluate(0)
        history.append({"step": 0, "forward_passes": 0, "hard_ppl": last_ppl,
                        "entropy": mean_entropy(policy.probs(), layout.present)})
        _log(out, history[-1], writer)
    end = pg.steps if stop_after is None else min(pg.steps, start + stop_after)
    for step in range(start, end):
        s = policy.probs()
        gen = step_generator(seed, step, world.rank)
        if pg.batches == "stream":  # the next windows, each used once
            first = (step * world.size + world.rank) * pg.batch_size
            idx = torch.arange(first, first + pg.batch_size)
        else:
            idx = torch.randperm(calib_windows.shape[0], generator=gen)[: pg.batch_size]
        batch = calib_windows[idx]  # loss_fn moves it to the model's input device
        m = policy.sample(pg.k, gen, antithetic=antithetic)
        scorer = loss_fn_before[1] if loss_fn_before is not None and step < loss_fn_before[0] else loss_fn
        losses = scorer(model, batch, layout.masks(m), costs=costs).float().cpu()
        if world.size > 1:  # all N*K samples, rank-major, identical on every rank
            m = world.all_gather(m).reshape(-1, m.shape[-1])
            losses = world.all_gather(losses).reshape(-1)
            policy.gather_draws(world)
        record = {"step": step + 1, "forward_passes": (step + 1) * pg.k * world.size, "lr": lr_at(pg, step)}
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
            b = policy.learn(m, s, losses, estimator, baseline, lr_at(pg, step))
            record.update(loss=float(losses.mean()), baseline=b)
        if (step + 1) % pg.eval_every == 0 or step + 1 == pg.steps:
            record["entropy"] = mean_entropy(policy.probs(), layout.present)
            if eval_fn is not None:
                last_ppl = record["hard_ppl"] = evaluate(step + 1)
        history.append(record)
        _log(out, record, writer)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in (("loss", record.get("loss")), ("base", record.get("baseline")),
                                                   ("ent", record.get("entropy")), ("ppl", last_ppl)) if v is not None})
        if out is not None and ((step + 1) % pg.eval_every == 0 or step + 1 == end):
            run_folder.save_checkpoint(out, {
                "step": step + 1, "policy": policy.state_dict(), "baseline": baseline.state_dict(),
                "skipped": skipped, "history": history, "best": best, "fingerprint": fingerprint,
                "seconds": seconds_before + time.perf_counter() - t0})
    bar.close()
    if writer is not None:
        writer.close()
    if pg.select == "best" and best is not None:
        masks, selected = Masks(dict(best["masks"])), best["step"]
    else:
        masks, selected = policy.hard_mask(), end
    return PGResult(probs=policy.probs(), masks=masks, history=history, skipped_steps=skipped,
                    seconds=seconds_before + time.perf_counter() - t0, selected_step=selected,
                    resumed_at=start if resume else None)


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


def _log(out: Path | None, record: dict, writer=None) -> None:
    if writer is not None:
        for key in TENSORBOARD_SCALARS:
            if record.get(key) is not None:
                writer.add_scalar(f"pg/{key}", record[key], record["step"])
        writer.flush()
    if out is not None:
        run_folder.append_metrics(out, record)


def _load_checkpoint(out: Path | None, fingerprint: dict, rewrite_log: bool = True) -> dict:
    state = run_folder.load_checkpoint(out)
    diffs = differences(state["fingerprint"], fingerprint)
    if diffs:
        raise CheckpointError(f"refusing to resume {out}: the run was started with different settings: "
                              + "; ".join(diffs) + ". Resume with the original settings or start a new run.")
    # The log may hold records written after the checkpoint: rewrite it to the checkpoint's.
    if rewrite_log:
        run_folder.rewrite_metrics(out, state["history"])
    return state
