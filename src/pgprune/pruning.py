"""`prune()`: one call from settings to a pruned, exported, evaluated model.

    validate every setting, and the data, before anything heavy loads
    load_session  model, tokenizer, adapter, unit costs and layout          (benches use it too)
    dense perplexity, calibration windows
    metric method (scores, allocation)                          [method != "pg"]
    start_policy: the metric's mask as PG's start -> run_policy_gradient   [method == "pg"]
       (pg.reconstruct bias: every sampled mask is scored mean-filled, i.e. with FLAP's bias
        compensation)
    perplexity of the gated hard mask (as PG scored it; metrics: plain)
    reconstruction (settings.reconstruct: none | bias | lsq, pgprune.reconstruction)
    -> surgery -> export -> perplexity of the pruned model
    run folder (pgprune.run_folder): run.json, masks, metrics.jsonl, checkpoint, probabilities

The CLI's `pgprune prune` is a thin layer over this function. A run that fails before it has
written anything worth keeping (a checkpoint or run.json) leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pgprune import run_folder
from pgprune.config import RunSettings, differences
from pgprune.data import get_calibration_windows, get_eval_tokens, get_source, load_documents, read_once
from pgprune.errors import CheckpointError, ConfigError
from pgprune.evaluate.perplexity import perplexity_of_tokens
from pgprune.gating import FORWARDS, gated
from pgprune.masks import Masks, UnitCosts
from pgprune.models.adapter import ModelAdapter, get_adapter
from pgprune.policy.probabilities import Policy, UnitLayout

METRIC_NSAMPLES = 128  # windows of the metric that starts PG (the first of PG's pool)


@dataclass
class Session:
    """What every stage of a run shares: the loaded model and its unit bookkeeping."""
    settings: RunSettings
    model: torch.nn.Module
    tokenizer: object
    adapter: ModelAdapter
    costs: UnitCosts
    layout: UnitLayout
    forward: str  # the resolved --forward (gated | gathered)

    def ppl(self, tokens, masks: Masks | None = None, fill: dict | None = None, max_tokens=None,
            max_windows: int | None = None, refit=None) -> float:
        """Perplexity (DESIGN.md protocol at the eval seqlen) of the model, gated by `masks` if given:
        mean-filled with `fill`, or refit by `refit(masks) -> reconstruction.Refit` (hooks)."""
        from pgprune.reconstruction import refit_applied

        if masks is None:
            context = contextlib.nullcontext()
        elif refit is not None:
            context = refit_applied(self.model, masks, refit(masks), self.costs)
        else:
            context = gated(self.model, masks, costs=self.costs, fill=fill)
        with context:
            return perplexity_of_tokens(self.model, tokens, seqlen=self.settings.eval.seqlen, max_tokens=max_tokens,
                                        max_windows=max_windows).ppl

    def loss_fn(self, fill: dict | None = None, refit=None):
        """PG's K-mask loss (the resolved forward), mean-filled with `fill` when compensating, or on each
        mask's refit pruned view (`refit(mask) -> Refit`, gathered forward only)."""
        if refit is not None:
            from pgprune.gating import gathered_losses

            return functools.partial(gathered_losses, refit=refit)
        return functools.partial(FORWARDS[self.forward], fill=fill)

    def execution(self, world_size: int = 1) -> dict:
        """How the run executes, for run.json."""
        devices = sorted({str(p.device) for p in self.model.parameters()})
        return {"world_size": world_size, "devices": devices, "dtype": str(next(self.model.parameters()).dtype),
                "forward": self.forward, "threads": torch.get_num_threads()}


def resolve_forward(forward: str, device: torch.device) -> str:
    """`auto`: the forward measured faster on this kind of device. On CPUs the gathered forward took
    0.72x of the gated one at 50 % (bench/gating_cost.py); on CUDA nothing is measured yet, and the
    gated forward keeps the K masks in one batched launch."""
    if forward != "auto":
        return forward
    return "gathered" if device.type == "cpu" else "gated"


def load_session(settings: RunSettings) -> Session:
    """Load the model of `settings` and build its unit bookkeeping (the public setup of a run)."""
    from pgprune.models.load import load_model

    ex = settings.execution
    model, tokenizer = load_model(settings.model, dtype=ex.dtype, device=ex.device)
    adapter = get_adapter(model)
    costs = UnitCosts.from_adapter(adapter)
    forward = resolve_forward(ex.forward, next(model.parameters()).device)
    if settings.method == "pg" and settings.pg.reconstruct == "lsq":
        forward = "gathered"  # each sampled mask gets its own refit pruned view (validate() refused gated)
    return Session(settings, model, tokenizer, adapter, costs, UnitLayout.build(costs, settings.kinds), forward)


def start_policy(session: Session, metric, dense_stats=None) -> Policy:
    """PG's policy at its start: the init metric's mask (`metric`: a `run_metric` result, None for
    --init constant). `dense_stats`: a callable giving dense calibration statistics, for the feature
    policy of a data-free init metric."""
    from pgprune.policy.initial_probabilities import init_probabilities, per_layer_probabilities
    from pgprune.policy.probabilities import UnitPolicy

    settings, layout, costs = session.settings, session.layout, session.costs
    pg = settings.pg
    if pg.policy in ("features", "search"):  # validate() refused --init constant with them
        from pgprune.policy.features import FeaturePolicy
        from pgprune.policy.search import SearchPolicy

        kind = SearchPolicy if pg.policy == "search" else FeaturePolicy
        policy = kind.from_metric(metric, session.adapter, layout, costs, scale=pg.init_scale,
                                  stats=None if metric.scores.stats is not None else dense_stats())
        policy.width_multiple = settings.width_multiple
        policy.learn_offsets = pg.offsets == "learned"
        if pg.policy == "search":
            policy.sigma = pg.sigma
        return policy
    if metric is not None and pg.init_mapping == "per-layer":  # the reference code's start
        probs = per_layer_probabilities(metric.scores.raw, costs, 1.0 - settings.sparsity)
        s0, sparsity = layout.merge({k: probs[k] for k in layout.kinds}).float(), settings.sparsity
    elif metric is not None:
        init = init_probabilities(metric.allocation, costs, pg.init_mapping, scale=pg.init_scale)
        s0 = layout.merge({k: init.probs[k] for k in layout.kinds}).float()
        sparsity = init.sparsity  # the reachable budget closest to the request (± one unit)
    else:
        s0, sparsity = layout.present.float() * (1.0 - settings.sparsity), settings.sparsity
    policy = UnitPolicy(s0, layout, costs, sparsity, projection=pg.projection, per_kind_budget=pg.per_kind_budget,
                        floor=pg.floor)
    policy.width_multiple = settings.width_multiple
    return policy


def prune(settings: RunSettings, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, world=None) -> dict:
    """Run the whole pipeline into `out_dir`; returns the run record (also written as run.json).

    `world` (policy/distributed.py, method pg): ranks other than 0 only help the policy-gradient
    loop (their own batches and masks) and return {"rank": r} after it; rank 0 does the rest."""
    from pgprune.policy.distributed import World

    world = world or World()
    out = Path(out_dir)
    with contextlib.ExitStack() as reading:  # the documents the check reads serve the tokenising too
        reading.enter_context(read_once())
        _check_before_loading(settings, out, resume, overwrite, world)
        fresh = not out.exists() or not any(out.iterdir())
        try:
            return _prune(settings, out, resume, overwrite, progress, world, done_reading=reading.close)
        except BaseException:
            # nothing worth keeping (no checkpoint to resume, no finished run): leave no folder behind
            if world.is_main and fresh and out.exists() and not run_folder.worth_keeping(out):
                shutil.rmtree(out, ignore_errors=True)
            raise


def _check_before_loading(settings: RunSettings, out: Path, resume: bool, overwrite: bool, world) -> None:
    """Everything that can be refused without the model: options, the run folder, the data files."""
    settings.validate()
    if world.size > 1 and settings.method != "pg":
        raise ConfigError(f"only --method pg runs on several processes; run {settings.method} without torchrun")
    if resume and settings.method != "pg":
        raise ConfigError("--resume continues a policy-gradient run; metric methods have nothing to resume")
    if world.is_main and out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise ConfigError(f"{out} exists and is not empty; pass --resume to continue a run there, "
                          "--overwrite to replace it, or choose another --out")
    if resume:  # compare the stored settings now, not after minutes of loading and calibrating
        start = None if (out / run_folder.CHECKPOINT_FILE).is_file() else run_folder.load_start(out)
        # a run stopped before its first checkpoint goes on from the start its auto choice made
        stored = start["fingerprint"] if start else run_folder.load_checkpoint(out)["fingerprint"].get("settings")
        diffs = differences(stored, settings.resume_fingerprint())
        if diffs:
            raise CheckpointError(f"refusing to resume {out}: the run was started with different settings: "
                                  + "; ".join(diffs) + ". Resume with the original settings or start a new run.")
    # the text: a missing file or folder is reported before the model loads
    needed = [(settings.data.calib, "train")] + [(n, "test") for n in settings.eval_datasets]
    if settings.method == "pg":
        needed.append((settings.track_dataset, settings.track_split))
    for name, split in dict.fromkeys(needed):
        load_documents(name, split, settings.data.data_dir)


def _prune(settings: RunSettings, out: Path, resume: bool, overwrite: bool, progress: bool, world,
           done_reading=lambda: None) -> dict:
    from pgprune.export import save_pruned
    from pgprune.reconstruction import bias_params_added, reconstruct

    t_start = time.perf_counter()
    out_folder = _OutFolder(out, resume, overwrite)
    pg_run = settings.method == "pg"
    if world.is_main:
        print(f"[pgprune] settings (recipe {settings.recipe}): {settings.describe()}", flush=True)
    session = load_session(settings)
    model, costs, kinds = session.model, session.costs, session.layout.kinds
    _check_width_multiple(settings, costs)  # needs the model's widths; before any data pass
    if settings.gguf is not None:
        _check_gguf_widths(settings, session.adapter)
    if pg_run:  # fail now, not after the metric init, when a PG step cannot fit
        from pgprune.memory import check_fits, estimate_pg_memory

        pg = settings.pg
        plan = estimate_pg_memory(model, k=pg.k, batch_size=pg.batch_size, seqlen=settings.data.seqlen,
                                  units=settings.units, nsamples=settings.pool_size(world.size),
                                  metric_nsamples=0 if pg.init == "constant" else METRIC_NSAMPLES,
                                  metric_batch_size=settings.execution.metric_batch_size, world_size=world.size,
                                  forward=session.forward, reconstruct=settings.final_reconstruct,
                                  pg_reconstruct=settings.pg.reconstruct,
                                  reconstruct_inputs=settings.reconstruct_inputs,
                                  metric_covariance=_reads_covariances(pg.init))
        check_fits(plan, next(model.parameters()).device, weights_loaded=True)
    execution = session.execution(world.size)
    if world.is_main:
        print(f"[pgprune] execution: {execution}", flush=True)
    eval_tokens = {n: get_eval_tokens(session.tokenizer, n, "test", settings.data.data_dir)
                   for n in settings.eval_datasets}

    def ppl_all(masks: Masks | None, fill: dict | None = None, refit=None) -> dict:  # test perplexity, every --eval set
        return {n: session.ppl(t, masks, fill, settings.eval.max_tokens, get_source(n).eval_max_windows, refit=refit)
                for n, t in eval_tokens.items()}

    record: dict = {"settings": settings.to_dict(), "execution": execution,
                    "model": session.adapter.describe(), "machine": _machine(),
                    "perplexity_protocol": {"seqlen": settings.eval.seqlen, "max_tokens": settings.eval.max_tokens,
                                            "split": "test"}}
    ppl = {"dense": ppl_all(None) if world.is_main else {}}
    _print_ppl("dense", ppl["dense"])

    calib = get_calibration_windows(session.tokenizer, settings.data.calib, settings.pool_size(world.size),
                                    settings.data.seqlen, seed=settings.seed, data_dir=settings.data.data_dir)
    track_tokens = None
    metric_name = settings.metric
    choose = metric_name == "auto" or settings.layers_first == "auto"
    if pg_run or choose:  # the periodic evaluation (and --select best, and the auto choices) read held-out
        # calibration text by default: never the test split, and not the evaluation set's domain unless --track asks
        track_tokens = get_eval_tokens(session.tokenizer, settings.track_dataset, settings.track_split,
                                       settings.data.data_dir)
    done_reading()  # every text is tokenised: let the documents go
    metric = None
    metric_calib = calib[:METRIC_NSAMPLES] if pg_run else calib
    if choose:
        metric, record["start_choice"] = _auto_start(session, metric_calib, track_tokens, out_folder, resume, progress,
                                                     world)
    elif metric_name != "constant":
        metric = start_metric(session, metric_calib, metric_name, settings.allocation, settings.layers_first, progress)
    if metric is not None:
        record["metric"] = metric.info
    masks = metric.masks if metric is not None else None
    dense_stats = _dense_stats_once(model, calib[:METRIC_NSAMPLES], settings, metric,
                                    covariance=pg_run and settings.pg.reconstruct == "lsq")

    fill = refit_fn = cov_stats = None  # how PG scores a mask: mean fill (bias) or its own refit (lsq)

    def refit_stats():
        # what the export's refit (final, and each tracked mask's) reuses instead of a pass: the dense
        # means PG's mean fill read (bias), or the covariances PG kept (lsq; they serve dense inputs)
        return dense_stats() if settings.final_reconstruct == "bias" else cov_stats

    scored = {"bias": " (compensated)", "lsq": " (least-squares refit)"}.get(settings.pg.reconstruct, "") \
        if pg_run else ""
    if pg_run:
        from pgprune.reconstruction import feature_means

        if settings.pg.reconstruct == "bias":
            fill = feature_means(dense_stats())
        elif settings.pg.reconstruct == "lsq":  # every layer's dense input covariances, kept for the whole run
            from pgprune.reconstruction import per_mask_refit

            cov_stats = dense_stats()
            # with layer units a sampled mask's removed runs are regressed, as the export does
            refit_fn = per_mask_refit(model, cov_stats, calib[:METRIC_NSAMPLES], damp=settings.reconstruct_damp,
                                      costs=costs, regress_layers="layer" in settings.kinds,
                                      batch_size=settings.execution.metric_batch_size, progress=progress)
        resume_pg = resume and (out / run_folder.CHECKPOINT_FILE).is_file()  # not with start.json alone
        masks, pg_info, init_masks = _run_pg(session, calib, track_tokens, metric, out_folder, resume_pg, progress,
                                             dense_stats, world, fill, refit_fn, refit_stats,
                                             before_lsq=feature_means(cov_stats) if settings.pg.lsq_from else None)
        if not world.is_main:
            return {"rank": world.rank, "pg": pg_info}
        record["pg"] = pg_info
        ppl["init"] = ppl_all(init_masks, fill, refit_fn)
        _print_ppl("start" + scored, ppl["init"])
    ppl["gated"] = ppl_all(masks, fill, refit_fn)
    _print_ppl("final (gated" + scored + ")", ppl["gated"])

    # the final refit: dense means of the calibration windows PG's mean fill used (bias), or a
    # layer-by-layer least-squares pass on them (lsq; none when PG kept the covariances)
    mode = settings.final_reconstruct
    refit = reconstruct(model, calib[:METRIC_NSAMPLES], masks, mode,
                        inputs=settings.reconstruct_inputs, damp=settings.reconstruct_damp,
                        stats=refit_stats(),  # used where it serves (bias; lsq with dense inputs)
                        batch_size=settings.execution.metric_batch_size, progress=progress, costs=costs)
    record["reconstruction"] = refit.info
    # surgery adds a bias vector per compensated block without one: counted beside the mask's parameters
    record["bias_params_added"] = bias_params_added(session.adapter, masks, costs, refit.output_bias)
    out_folder()
    masks.save(out / run_folder.MASKS_FILE, metadata={"model": settings.model, "method": settings.method})
    from pgprune.surgery import remove_units

    remove_units(model, masks, output_bias=refit.output_bias, input_weights=refit.input_weights)
    ppl["pruned"] = ppl_all(None)
    _print_ppl(f"final (pruned model, reconstruction {mode})", ppl["pruned"])
    save_pruned(model, session.tokenizer, out / run_folder.MODEL_DIR, masks=masks, overwrite=True,
                extra={"method": settings.method, "sparsity_target": settings.sparsity})
    if settings.gguf is not None:
        from pgprune.gguf_export import export_gguf

        gguf_path = out / run_folder.gguf_file(settings.gguf)
        summary = export_gguf(out / run_folder.MODEL_DIR, gguf_path, outtype=settings.gguf, overwrite=True)
        record["gguf"] = {"path": str(gguf_path), "outtype": settings.gguf, "bytes": summary["bytes"]}
        print(f"[pgprune] wrote {gguf_path} ({summary['bytes'] / 2**20:.1f} MiB, llama.cpp `deci`)", flush=True)
    record.update(masks=masks.summary(costs), perplexity=ppl, seconds=time.perf_counter() - t_start,
                  pruned_model=str(out / run_folder.MODEL_DIR))
    run_folder.write_record(out, record)
    return record


class _OutFolder:
    """The run folder, created right before the first write (so a run refused early leaves none);
    --overwrite clears an old run's files at that moment, once."""

    def __init__(self, path: Path, resume: bool, overwrite: bool):
        self.path, self.clear, self.ready = path, overwrite and not resume, False

    def __call__(self) -> Path:
        if not self.ready:
            if self.clear and self.path.exists():
                for child in self.path.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
            self.ready = True
        return self.path


def _reads_covariances(init: str) -> bool:
    """Whether PG's start (a candidate of it, for auto) scores from full input covariances (obs)."""
    from pgprune.metrics.scores import METHODS

    return any(m in METHODS and METHODS[m].needs_covariance for m in (AUTO_STARTS if init == "auto" else (init,)))


# --init auto's candidates: the metric methods that were best at their best reconstruction on SmolLM2
# (bench/RESULTS.md "Which start", "obs"), each at its own allocation: FLAP at its global widths (best at
# 30 %, level with obs), obs at uniform widths (best at 50 %), Wanda-sp at uniform widths (best at 50 %
# before obs). None wins at every budget and seed, and which one does is read off held-out calibration
# text, not guessed from the sparsity.
AUTO_STARTS = ("wanda-sp", "flap", "obs")


# --remove-layers auto goes on past a count that is not lower: obs at 50 % on SmolLM2 (Wikipedia s0) scored
# 222.0, 192.9, 198.6, 179.4 for 0 to 3 layers, so stopping at the first rise would have kept one
LAYER_COUNT_PATIENCE = 2


def start_metric(session: Session, calib, method: str, allocation: str | None, remove_layers, progress: bool):
    """The run's metric mask (or a start candidate's): `method` at `allocation` with `remove_layers` layers first
    (None: off), uncompensated (the reconstruction comes after), on the metric's calibration windows `calib`."""
    from pgprune.metrics.pipeline import run_metric

    settings = session.settings
    return run_metric(session.model, calib, method, settings.sparsity, session.layout.kinds, allocation,
                      batch_size=settings.execution.metric_batch_size, seed=settings.seed, bias_compensation=False,
                      progress=progress, width_multiple=settings.width_multiple, remove_layers=remove_layers)


def _auto_start(session: Session, calib, track_tokens, out_folder: _OutFolder, resume: bool, progress: bool, world):
    """--init auto / --remove-layers auto: `_choose_metric`'s search. A PG run keeps what it chose in start.json
    (the search costs minutes to hours), and --resume runs that start alone instead of searching again.
    Returns (the start's run_metric result, run.json's start_choice)."""
    settings = session.settings
    saved = run_folder.load_start(out_folder.path) if resume else None
    if saved is None:
        metric, choice = _choose_metric(session, calib, track_tokens, progress)
        if settings.method == "pg" and world.is_main:
            layers = metric.info["remove_layers"]
            run_folder.save_start(out_folder(), {
                "fingerprint": settings.resume_fingerprint(), "method": metric.info["method"],
                "allocation": metric.info["allocation"], "remove_layers": None if layers is None else layers["count"],
                "choice": choice})
        return metric, choice
    print(f"[pgprune] start: {saved['choice']['chosen']}, {saved['remove_layers'] or 0} layer(s) first, as chosen "
          f"before (--resume; {run_folder.START_FILE})", flush=True)
    metric = start_metric(session, calib, saved["method"], saved["allocation"], saved["remove_layers"], progress)
    return metric, {**saved["choice"], "resumed": True}


def _choose_metric(session: Session, calib, track_tokens, progress: bool):
    """The metric mask a run starts from (PG) or prunes with, chosen on PG's tracking text (held-out calibration
    text by default), each candidate refit as the export refits (--reconstruct, its inputs and damping):
    --init auto, every AUTO_STARTS method at the run's --remove-layers count (0 for auto); then, for
    --remove-layers auto, the lowest one's layers-first count chosen by `lowest_count` (the same scores
    re-allocated for each count, no calibration pass), and at that count the method chosen again among
    every AUTO_STARTS one. Returns (the chosen run_metric result, what run.json records)."""
    from pgprune.metrics.allocation import removable_layers
    from pgprune.metrics.pipeline import remove_layers_first, resolve_allocation

    settings = session.settings
    mode = settings.final_reconstruct
    auto_layers = settings.layers_first == "auto"
    count = 0 if auto_layers else settings.layers_first
    init, fine = settings.metric, settings.metric_kinds

    def score(label: str, masks) -> float:
        value = exported_ppl(session, calib, masks, track_tokens, progress)
        print(f"[pgprune] candidate {label}: {settings.track_dataset} {settings.track_split} perplexity "
              f"{value:.3f} (reconstruction {mode})", flush=True)
        return value

    results, candidates = {}, {}  # per method label: its metric result (scores and means: small), its score
    for method in AUTO_STARTS if init == "auto" else (init,):
        allocation = resolve_allocation(method, "auto" if init == "auto" else settings.allocation, fine)
        label = f"{method} ({allocation})"
        results[label] = start_metric(session, calib, method, allocation, count, progress)
        candidates[label] = score(label, results[label].masks)
    label = min(candidates, key=candidates.get)
    record = {"candidates": candidates, "chosen": label, "reconstruct": mode,
              "track": {"dataset": settings.track_dataset, "split": settings.track_split,
                        "max_tokens": settings.eval.track_max_tokens}}
    if not auto_layers:
        return results[label], record

    def with_layers(method: str, n: int):  # that candidate's scores re-allocated with n layers first, and its score
        trial = remove_layers_first(results[method], n, session.costs)
        return trial, score(f"{method}, {n} layer(s) first {trial.info['remove_layers']['layers']}", trial.masks)

    trials = {0: (results[label], candidates[label])}

    def score_count(n: int) -> float:
        if n not in trials:
            trials[n] = with_layers(label, n)
        return trials[n][1]

    best, by_count = lowest_count(score_count, removable_layers(results[label].layer_influence, session.costs,
                                                                settings.sparsity))
    # the count is swept for the method lowest without layers, but with layers gone another may be lower (50 % on
    # SmolLM2, Wikipedia s2: Wanda-sp 226.6, obs 235.3 without layers; with four, 211.6 and 181.1): the others are
    # scored again at that count
    at_best = {m: (results[m], candidates[m]) for m in results}
    if best:
        at_best = {m: trials[best] if m == label else with_layers(m, best) for m in results}
    starts = {m: value for m, (_, value) in at_best.items()}
    record["chosen"] = min(starts, key=starts.get)
    metric = at_best[record["chosen"]][0]
    record["remove_layers"] = {"candidates": by_count, "chosen": best, "swept": label, "starts": starts,
                               "layers": metric.info["remove_layers"]["layers"]}
    return metric, record


def lowest_count(score_count, most: int, patience: int = LAYER_COUNT_PATIENCE) -> tuple[int, dict[int, float]]:
    """The count in 0..`most` of lowest `score_count(n)`, trying 0, 1, 2, ... and stopping once `patience`
    counts in a row were not lower than the best so far. Returns (that count, every tried count's score)."""
    scores = {0: score_count(0)}
    best = 0
    for n in range(1, most + 1):
        if n - best > patience:
            break
        scores[n] = score_count(n)
        if scores[n] < scores[best]:
            best = n
    return best, scores


def exported_ppl(session: Session, calib, masks: Masks, tokens, progress: bool = False, stats=None) -> float:
    """Perplexity on PG's tracking text (first --track-max-tokens) of `masks` refit as the export will
    refit them (--reconstruct, its inputs and damping, on the metric's calibration windows `calib`);
    `stats`: dense statistics of `calib`, reused where the refit can (see `reconstruct`) instead of a pass."""
    from pgprune.reconstruction import reconstruct

    settings = session.settings
    refit = reconstruct(session.model, calib, masks, settings.final_reconstruct, inputs=settings.reconstruct_inputs,
                        damp=settings.reconstruct_damp, stats=stats, batch_size=settings.execution.metric_batch_size,
                        progress=progress, costs=session.costs)
    return session.ppl(tokens, masks, max_tokens=settings.eval.track_max_tokens, refit=lambda _masks: refit)


def _run_pg(session: Session, calib, track_tokens, metric, out_folder: _OutFolder, resume, progress, dense_stats,
            world, fill, refit, refit_stats, before_lsq: dict | None = None):
    """`before_lsq`: with --pg-lsq-from, the mean fill that scores the steps before it."""
    from pgprune.policy.loop import run_policy_gradient

    settings, out = session.settings, out_folder.path
    policy = start_policy(session, metric, dense_stats)
    # the start: the metric's mask, except where the start is not built to be it (--init constant, per-layer)
    init_masks = metric.masks if metric is not None and settings.pg.init_mapping != "per-layer" else policy.hard_mask()
    print(f"[pgprune] policy gradient: {policy.describe()}, budget sparsity {policy.sparsity:.4f}")
    track, split = settings.track_dataset, settings.track_split

    def eval_fn(masks: Masks) -> float:
        if settings.eval.track_reconstruct == "export":
            # refit from the statistics the final refit reuses: no calibration pass per evaluation where they serve
            return exported_ppl(session, calib[:METRIC_NSAMPLES], masks, track_tokens, stats=refit_stats())
        return session.ppl(track_tokens, masks, fill, settings.eval.track_max_tokens, refit=refit)

    fingerprint = {"settings": settings.resume_fingerprint(), "nsamples": int(calib.shape[0]),
                   "dtype": str(next(session.model.parameters()).dtype), "forward": session.forward}
    ex = settings.execution
    tensorboard = None if ex.tensorboard is None else (ex.tensorboard or out / run_folder.TENSORBOARD_DIR)
    if world.is_main:
        out_folder()
    result = run_policy_gradient(session.model, calib, policy, settings.pg, seed=settings.seed, out_dir=out,
                                 eval_fn=eval_fn, fingerprint=fingerprint, resume=resume, progress=progress,
                                 world=world, tensorboard=tensorboard, loss_fn=session.loss_fn(fill, refit),
                                 loss_fn_before=None if before_lsq is None else
                                 (settings.pg.lsq_from, session.loss_fn(before_lsq)))
    if world.is_main:
        run_folder.save_probabilities(out, session.layout.split(result.probs))
    info = {"policy": policy.describe(), "start_sparsity": policy.sparsity, "skipped_steps": result.skipped_steps,
            "seconds": result.seconds, "resumed_at": result.resumed_at, "selected_step": result.selected_step,
            "track": {"dataset": track, "split": split, "max_tokens": settings.eval.track_max_tokens,
                      "reconstruct": settings.final_reconstruct if settings.eval.track_reconstruct == "export"
                      else settings.pg.reconstruct},
            "history_tail": result.history[-3:]}
    return result.masks, info, init_masks


def start_allocation(settings: RunSettings) -> str | None:
    """The allocation of the run's metric method, or of PG's start: --allocation resolved for it (`auto`:
    the method's own); None where none applies (--init auto, whose candidates each take their own, and
    --init constant)."""
    from pgprune.metrics.pipeline import resolve_allocation
    from pgprune.metrics.scores import METHODS

    method = settings.metric
    return resolve_allocation(method, settings.allocation, settings.metric_kinds) if method in METHODS else None


def _check_width_multiple(settings: RunSettings, costs: UnitCosts) -> None:
    """--width-multiple against the loaded model: it divides every MLP width, and (uniform allocation,
    whose per-layer counts are known now) no layer keeps fewer channels than the multiple."""
    from pgprune.budget import check_kept_widths, check_width_multiple
    from pgprune.metrics.allocation import uniform_plan

    n = check_width_multiple(settings.width_multiple, costs)
    # --init auto's candidates include Wanda-sp's uniform widths
    uniform = start_allocation(settings) == "uniform" or (settings.method == "pg" and settings.pg.init == "auto")
    if n > 1 and uniform and "channel" in settings.kinds and not set(settings.kinds) & {"attn", "mlp", "layer"}:
        plan = uniform_plan(costs, settings.kinds, settings.sparsity)
        check_kept_widths(costs.intermediate - plan.counts["channel"], n)


def _check_gguf_widths(settings: RunSettings, adapter) -> None:
    """--gguf against the loaded model's sizes: what no mask can change (the hidden size; with head units
    the o_proj rows of kept heads x head_dim) must fit the type's row blocks."""
    from pgprune.gguf_types import row_block

    block = row_block(settings.gguf)
    if adapter.hidden_size % block:
        raise ConfigError(f"--gguf {settings.gguf} stores rows in blocks of {block} values; this model's hidden size "
                          f"{adapter.hidden_size} is not a multiple of {block}: choose a type with smaller blocks "
                          "(f16, q8_0, q4_0 ..)")
    if "head" in settings.kinds and adapter.head_dim % block:
        raise ConfigError(f"--gguf {settings.gguf} stores rows in blocks of {block} values, but with --units head "
                          f"o_proj keeps rows of (kept heads x {adapter.head_dim}): choose a type with blocks of "
                          f"{adapter.head_dim} or fewer values, or prune without head units")


def _dense_stats_once(model, calib, settings: RunSettings, metric=None, covariance: bool = False):
    """A callable giving the dense model's calibration statistics of the o_proj / down_proj inputs
    on `calib` (the mean fill; the features of a data-free init metric; with `covariance`, PG's
    per-mask least-squares refits too): the init metric's when it collected dense ones on the same
    windows (FLAP does, without covariances), else one pass, run at most once."""
    from pgprune.metrics.calibration import collect_layer_stats

    @functools.cache
    def stats():
        if metric is not None and metric.dense_stats is not None and not covariance:
            return metric.dense_stats
        return collect_layer_stats(model, calib, batch_size=settings.execution.metric_batch_size, propagate="dense",
                                   covariance=covariance)

    return stats


def _print_ppl(label: str, values: dict) -> None:
    print(f"[pgprune] perplexity {label}: " + ", ".join(f"{n} {v:.3f}" for n, v in values.items()), flush=True)


def _machine() -> dict:
    from pgprune import __version__
    from pgprune.evaluate.speed import machine_info

    return {"pgprune": __version__, **machine_info()}
