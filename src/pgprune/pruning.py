"""`prune()`: one call from a model name to a pruned, exported, evaluated model.

    load -> calibration windows -> dense perplexity
         -> metric method (scores, allocation)            [method != "pg"]
         -> metric init -> policy-gradient optimisation   [method == "pg"]
            (--compensate: the masked models are evaluated mean-filled, i.e. with FLAP's bias
             compensation, and the exported model gets the same biases)
         -> perplexity of the gated hard mask -> surgery -> export -> perplexity of the pruned model
         -> run.json (config, versions, machine, results), masks.safetensors, metrics.jsonl

The CLI's `pgprune prune` is a thin layer over this function.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pgprune import atomic
from pgprune.data import get_calibration_windows, get_eval_tokens, get_source
from pgprune.errors import ConfigError
from pgprune.evaluate.perplexity import perplexity_of_tokens
from pgprune.gating import FORWARDS, gated
from pgprune.masks import Masks, UnitCosts, parse_unit_kinds
from pgprune.models.adapter import get_adapter

RUN_FILE = "run.json"
MODEL_DIR = "model"


@dataclass
class PruneOptions:
    model: str = "smollm2-135m"
    method: str = "pg"  # pg | a metric method (wanda-sp, flap, magnitude, random, block-influence)
    sparsity: float = 0.3
    units: str = "channel,head"
    allocation: str = "uniform"  # for metric methods and the metric init of pg
    calib: str = "wiki-sample"
    nsamples: int | None = None  # default: 128 for metrics, 1024 for pg's pool
    seqlen: int = 128
    seed: int = 0
    data_dir: str | None = None
    dtype: str = "auto"
    device: str | None = None
    # policy gradient
    init: str = "wanda-sp"  # a metric method, or "constant"
    init_mapping: str = "sigmoid"  # sigmoid | constant (how metric scores become probabilities)
    init_scale: float = 1.0  # sigmoid: scale of the standardised scores (larger = nearer 0/1, less exploration)
    steps: int = 15000  # the paper's 120k samples at batch 8
    k: int = 2
    batch_size: int = 8
    lr: float = 2e-3
    lr_schedule: str = "cosine"
    estimator: str = "paper"
    control_variate: bool = False  # subtract from each loss what the mask's kept fraction explains
    forward: str = "gated"  # gated | gathered: how the K masked models of a step run (gating.FORWARDS)
    projection: str = "cost"
    per_kind_budget: bool = False
    floor: float = 0.0  # probabilities stay in [floor, 1 - floor] while optimising (exploration)
    select: str = "final"  # final | best: last hard mask, or the evaluated one with the lowest track ppl
    policy: str = "units"  # units: a probability per unit (paper) | features: shared logits (policy/features.py)
    eval_every: int = 100
    checkpoint_every: int = 100
    # evaluation
    eval: str = "wikitext2"  # comma-separated perplexity datasets
    eval_seqlen: int = 128
    eval_max_tokens: int | None = 32768  # per dataset, for the dense / init / final numbers
    track: str | None = None  # dataset (validation split) of the periodic hard-mask perplexity (default: first of eval)
    track_max_tokens: int = 8192
    compensate: bool = False  # pg: optimise and export the FLAP-compensated (mean-filled) model
    tensorboard: str | None = None  # event-file folder for the pg loop ("" = RUN_DIR/tensorboard)
    metric_batch_size: int = 8
    extra: dict = field(default_factory=dict)


def _ppl(model, tokens, o: PruneOptions, masks: Masks | None, costs: UnitCosts, max_tokens,
         max_windows: int | None = None, fill: dict | None = None) -> float:
    with gated(model, masks, costs=costs, fill=fill) if masks is not None else contextlib.nullcontext():
        return perplexity_of_tokens(model, tokens, seqlen=o.eval_seqlen, max_tokens=max_tokens,
                                    max_windows=max_windows).ppl


def prune(o: PruneOptions, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, world=None) -> dict:
    """Run the whole pipeline into `out_dir`; returns the run record (also written as run.json).

    `world` (policy/distributed.py, method pg): ranks other than 0 only help the policy-gradient
    loop (their own batches and masks) and return {"rank": r} after it; rank 0 does the rest."""
    from pgprune.export import save_pruned
    from pgprune.metrics.prune import run_metric
    from pgprune.models.load import load_model

    from pgprune.policy.distributed import World

    world = world or World()
    if world.size > 1 and o.method != "pg":
        raise ConfigError(f"only --method pg runs on several processes; run {o.method} without torchrun")
    out = Path(out_dir)
    if world.is_main and out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise ConfigError(f"{out} exists and is not empty; pass --resume to continue a run there, "
                          "--overwrite to replace it, or choose another --out")
    if not 0.0 <= o.sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {o.sparsity}")
    if o.forward not in FORWARDS:
        raise ConfigError(f"forward must be one of {', '.join(FORWARDS)}, got {o.forward!r}")
    kinds = parse_unit_kinds(o.units)
    if o.method == "pg":  # refuse a bad PG setting now, not after loading the model and running the init metric
        _pg_config(o, o.sparsity, kinds).validate()
        if o.policy == "features" and o.init == "constant":
            raise ConfigError("--policy features starts from a metric's scores; choose --init wanda-sp (or another "
                              "metric), not constant")
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_model(o.model, dtype=o.dtype, device=o.device)
    if o.method == "pg":  # fail now, not after the metric init, when a PG step cannot fit
        from pgprune.memory import check_fits, estimate_pg_memory

        plan = estimate_pg_memory(model, k=o.k, batch_size=o.batch_size, seqlen=o.seqlen, units=o.units,
                                  nsamples=o.nsamples or 1024, metric_nsamples=0 if o.init == "constant" else 128,
                                  metric_batch_size=o.metric_batch_size, world_size=world.size, forward=o.forward)
        check_fits(plan, next(model.parameters()).device, weights_loaded=True)
    adapter = get_adapter(model)
    costs = UnitCosts.from_adapter(adapter)
    eval_sets = [n.strip() for n in o.eval.split(",") if n.strip()]
    eval_tokens = {n: get_eval_tokens(tokenizer, n, "test", o.data_dir) for n in eval_sets}

    def ppl_all(masks: Masks | None, fill: dict | None = None) -> dict:  # test perplexity, every --eval set
        return {n: _ppl(model, t, o, masks, costs, o.eval_max_tokens, get_source(n).eval_max_windows, fill)
                for n, t in eval_tokens.items()}

    record: dict = {"options": asdict(o), "model": adapter.describe(), "machine": _machine(),
                    "perplexity_protocol": {"seqlen": o.eval_seqlen, "max_tokens": o.eval_max_tokens,
                                            "split": "test"}}
    ppl = {"dense": ppl_all(None) if world.is_main else {}}
    _print_ppl("dense", ppl["dense"])

    nsamples = o.nsamples or (1024 if o.method == "pg" else 128)
    calib = get_calibration_windows(tokenizer, o.calib, nsamples, o.seqlen, seed=o.seed, data_dir=o.data_dir)
    metric_name = o.init if o.method == "pg" else o.method
    metric = None
    if metric_name != "constant":
        metric = run_metric(model, calib[:128] if o.method == "pg" else calib, metric_name, o.sparsity, kinds,
                            o.allocation, batch_size=o.metric_batch_size, seed=o.seed,
                            bias_compensation=False if o.method == "pg" else None, progress=progress)
        record["metric"] = metric.info
    masks, bias = (metric.masks, metric.output_bias) if metric is not None else (None, None)

    fill = None
    if o.method == "pg":
        from pgprune.metrics.calibration import feature_means

        dense_stats = _dense_stats_once(model, calib[:128], o, metric)
        fill = feature_means(dense_stats()) if o.compensate else None
        masks, pg_info, init_masks = _run_pg(model, tokenizer, calib, costs, kinds, metric, o, out, eval_tokens,
                                             resume, progress, dense_stats, world, fill)
        if not world.is_main:
            return {"rank": world.rank, "pg": pg_info}
        record["pg"] = pg_info
        ppl["init"] = ppl_all(init_masks, fill)
        _print_ppl("init" + (" (compensated)" if fill else ""), ppl["init"])
        if fill is not None:
            from pgprune.metrics.prune import compensation_biases

            bias = compensation_biases(adapter, fill, masks, costs)
    ppl["gated"] = ppl_all(masks, fill)
    _print_ppl("final (gated)", ppl["gated"])

    masks.save(out / "masks.safetensors", metadata={"model": o.model, "method": o.method})
    from pgprune.surgery import prune_model

    prune_model(model, masks, output_bias=bias)
    ppl["pruned"] = ppl_all(None)
    _print_ppl("final (pruned model)", ppl["pruned"])
    save_pruned(model, tokenizer, out / MODEL_DIR, masks=masks, overwrite=True,
                extra={"method": o.method, "sparsity_target": o.sparsity})
    record.update(masks=masks.summary(costs), perplexity=ppl, seconds=time.perf_counter() - t_start,
                  pruned_model=str(out / MODEL_DIR))
    atomic.write_json(out / RUN_FILE, record)
    return record


def _run_pg(model, tokenizer, calib, costs, kinds, metric, o: PruneOptions, out: Path, eval_tokens, resume,
            progress, dense_stats, world=None, fill=None):
    from pgprune.metrics.init import init_probabilities
    from pgprune.policy.loop import read_hard_mask, run_policy_gradient
    from pgprune.policy.probabilities import UnitLayout

    layout = UnitLayout.build(costs, kinds)
    sparsity = o.sparsity
    policy = None
    if o.policy == "features":  # prune() refused --init constant with it
        from pgprune.policy.features import FeaturePolicy

        # features come from the metric's own statistics; a data-free metric's from one dense pass
        policy = FeaturePolicy.from_metric(metric, get_adapter(model), layout, costs, scale=o.init_scale,
                                           stats=None if metric.scores.stats is not None else dense_stats())
    if metric is not None:
        init = init_probabilities(metric.allocation, costs, o.init_mapping, scale=o.init_scale)
        s0 = layout.merge({k: init.probs[k] for k in kinds}).float()
        sparsity = init.sparsity  # the reachable budget closest to the request (± one unit)
    else:
        s0 = layout.present.float() * (1.0 - o.sparsity)
    config = _pg_config(o, sparsity, kinds)
    print(f"[pgprune] policy gradient: {config}")
    # The periodic evaluation reads the validation split, so the test numbers stay untouched by it.
    track = o.track or next(iter(eval_tokens))
    track_tokens = get_eval_tokens(tokenizer, track, "validation", o.data_dir)

    def eval_fn(masks: Masks) -> float:
        return _ppl(model, track_tokens, o, masks, costs, o.track_max_tokens, fill=fill)

    fingerprint = {"model": o.model, "calib": o.calib, "nsamples": calib.shape[0], "seqlen": o.seqlen,
                   "init": o.init, "init_mapping": o.init_mapping, "init_scale": o.init_scale, "allocation": o.allocation,
                   "dtype": str(next(model.parameters()).dtype), "track": track,
                   "track_max_tokens": o.track_max_tokens, "forward": o.forward, "compensate": o.compensate}
    init_masks = metric.masks if metric is not None else read_hard_mask(s0, layout, costs, sparsity)
    tensorboard = None if o.tensorboard is None else (o.tensorboard or out / "tensorboard")
    result = run_policy_gradient(model, calib, s0, layout, costs, config, out_dir=out, eval_fn=eval_fn,
                                 fingerprint=fingerprint, resume=resume, progress=progress, world=world,
                                 tensorboard=tensorboard, loss_fn=functools.partial(FORWARDS[o.forward], fill=fill),
                                 policy=policy)
    if world is None or world.is_main:
        with atomic.temp_path(out / "probabilities.pt") as tmp:
            torch.save({k: v.cpu() for k, v in layout.split(result.probs).items()}, tmp)
    info = {"config": asdict(config), "skipped_steps": result.skipped_steps, "seconds": result.seconds,
            "selected_step": result.selected_step,
            "policy": None if policy is None else policy.describe(),
            "track": {"dataset": track, "split": "validation", "max_tokens": o.track_max_tokens},
            "history_tail": result.history[-3:]}
    return result.masks, info, init_masks


def _pg_config(o: PruneOptions, sparsity: float, kinds: tuple[str, ...]):
    from pgprune.policy.loop import PGConfig

    return PGConfig(sparsity=sparsity, kinds=kinds, steps=o.steps, k=o.k, batch_size=o.batch_size, lr=o.lr,
                    lr_schedule=o.lr_schedule, estimator=o.estimator,
                    control_variate=o.control_variate, projection=o.projection,
                    per_kind_budget=o.per_kind_budget, floor=o.floor, select=o.select, seed=o.seed,
                    eval_every=o.eval_every, checkpoint_every=o.checkpoint_every, policy=o.policy)


def _dense_stats_once(model, calib, o: PruneOptions, metric=None):
    """A callable giving the dense model's calibration statistics of the o_proj / down_proj inputs
    on `calib` (the mean fill; the features of a data-free init metric): the init metric's when it
    collected dense ones on the same windows (FLAP does), else one pass, run at most once."""
    from pgprune.metrics.calibration import collect_layer_stats

    @functools.cache
    def stats():
        if metric is not None and metric.dense_stats is not None:
            return metric.dense_stats
        return collect_layer_stats(model, calib, batch_size=o.metric_batch_size, propagate="dense")

    return stats


def _print_ppl(label: str, values: dict) -> None:
    print(f"[pgprune] perplexity {label}: " + ", ".join(f"{n} {v:.3f}" for n, v in values.items()), flush=True)


def _machine() -> dict:
    from pgprune import __version__
    from pgprune.evaluate.speed import machine_info

    return {"pgprune": __version__, **machine_info()}
