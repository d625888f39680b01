"""Policy-gradient pruning quality on SmolLM2-135M against the metric methods, in one run.

For each sparsity: the metric baselines (wanda-sp, flap, magnitude, random for channel,head;
block-influence for layer) and PG runs started from the wanda-sp mask (block-influence for
layer), one per estimator, with the paper's K=2 and batch 8 x 128 from the Wikipedia sample.
Every PG run logs the hard-mask perplexity against forward passes (the curve). Final numbers:
WikiText-2 test perplexity at seqlen 128 on the first --max-tokens tokens (DESIGN.md protocol).

    python bench/pg_quality.py --sparsities 0.3,0.5 --steps 300 --estimators paper,loo

Writes bench/results/pg_quality.json (after every run) and bench/results/pg_quality.png if
matplotlib is installed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, calibration_windows, save, table  # noqa: E402

from pgprune.config import RECIPES, RunSettings  # noqa: E402
from pgprune.data import get_eval_tokens  # noqa: E402
from pgprune.evaluate.perplexity import perplexity_of_tokens  # noqa: E402
from pgprune.metrics.calibration import collect_layer_stats
from pgprune.reconstruction import feature_means  # noqa: E402
from pgprune.metrics.pipeline import run_metric
from pgprune.reconstruction import compensation_biases  # noqa: E402
from pgprune.policy.loop import run_policy_gradient  # noqa: E402
from pgprune.pruning import load_session, start_policy  # noqa: E402
from pgprune.surgery import remove_units  # noqa: E402

# this bench's flags -> the RunSettings paths they set (the rest of a run's settings: the recipe's)
SETTINGS_OF_FLAGS = {"model": "model", "dtype": "execution.dtype", "units": "units", "allocation": "allocation",
                     "init_scale": "pg.init_scale", "policy": "pg.policy", "steps": "pg.steps", "lr": "pg.lr",
                     "k": "pg.k", "control_variate": "pg.control_variate", "floor": "pg.floor", "select": "pg.select",
                     "forward": "execution.forward", "batch_size": "pg.batch_size",
                     "seqlen": "data.seqlen", "seed": "seed", "eval_every": "pg.eval_every",
                     "track_max_tokens": "eval.track_max_tokens"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--units", default="channel,head", help="unit kinds; 'layer' compares with block-influence")
    ap.add_argument("--methods", default="wanda-sp,flap,flap:uniform,magnitude,random",
                    help="metric baselines, each METHOD or METHOD:ALLOCATION (default: --allocation)")
    ap.add_argument("--init", default="wanda-sp", help="METHOD or METHOD:ALLOCATION of PG's initial mask")
    ap.add_argument("--allocation", default="auto", help="auto: each method's own (flap, block-influence: global)")
    ap.add_argument("--init-scale", type=float, default=1.0,
                    help="sigmoid scale of the standardised init scores: larger = probabilities nearer 0/1, so "
                         "PG explores only near the metric's decision boundary")
    ap.add_argument("--recipe", default=None, choices=list(RECIPES),
                    help="take the defaults of the PG flags below from this pgprune recipe (explicit flags win)")
    ap.add_argument("--policy", default="units", choices=["units", "features"],
                    help="units: a probability per unit (paper); features: shared logits from metric scores "
                         "and per-layer offsets (policy/features.py; --init-scale is its scale)")
    ap.add_argument("--estimators", default="paper,loo")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lrs", default=None, help="per-estimator lr, e.g. paper:0.05,loo:0.01")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--control-variate", action="store_true", help="PG's kept-fraction control variate")
    ap.add_argument("--floor", type=float, default=0.0, help="probability floor (exploration), see pgprune.config.PGSettings")
    ap.add_argument("--select", default="final", choices=["final", "best"],
                    help="final hard mask, or the tracked one with the lowest validation perplexity")
    ap.add_argument("--forward", default="gated", choices=["auto", "gated", "gathered"],
                    help="how the K masked models run (same losses to float rounding; gathered skips removed work)")
    ap.add_argument("--compensate", action="store_true",
                    help="PG evaluates and exports the mean-filled (FLAP-compensated) model; the init is "
                         "reported compensated too")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--calib", default="wiki-sample",
                    help="calibration source (PG's batches and the metrics' windows); 'valid-tail': WikiText-2 "
                         "validation after the first --track-max-tokens (in-domain text PG's tracking does not use); "
                         "'wiki-sample-wikitext': the Wikipedia sample written the way WikiText-2 is")
    ap.add_argument("--pool", type=int, default=1024, help="calibration windows PG draws its batches from")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows of the metric methods")
    ap.add_argument("--seed", type=int, default=0, help="PG's seed (its batches and masks)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--track-max-tokens", type=int, default=16384)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--tag", default="pg_quality")
    ap.add_argument("--save-masks", default=None,
                    help="folder for the PG runs' masks (SPARSITY_ESTIMATOR.safetensors, for `pgprune apply`)")
    recipe = ap.parse_known_args()[0].recipe
    if recipe:  # the recipe's values become the defaults of the flags that set them
        values = {**RECIPES[recipe]["values"]}
        ap.set_defaults(**{flag: values[path] for flag, path in SETTINGS_OF_FLAGS.items() if path in values})
        if "pg.estimator" in values:
            ap.set_defaults(estimators=values["pg.estimator"])
        ap.set_defaults(compensate=values.get("pg.reconstruct") == "bias")
    args = ap.parse_args()

    def settings_for(**overrides) -> RunSettings:
        """The run's settings as `pgprune prune` would hold them (data and evaluation are this bench's)."""
        values = {path: getattr(args, flag) for flag, path in SETTINGS_OF_FLAGS.items()}
        values["pg.reconstruct"] = values["reconstruct"] = "bias" if args.compensate else "none"
        return RunSettings.from_recipe(args.recipe or "paper", {**values, "execution.device": "cpu", **overrides})

    session = load_session(settings_for())
    model, tok, adapter, costs, layout = session.model, session.tokenizer, session.adapter, session.costs, session.layout
    kinds = layout.kinds
    test = get_eval_tokens(tok, "wikitext2", "test", args.data_dir)
    track = get_eval_tokens(tok, "wikitext2", "validation", args.data_dir)  # held out from the final test
    pool = calibration_windows(tok, args.calib, args.pool, args.seqlen, args.data_dir, track, args.track_max_tokens)
    calib = pool[: args.nsamples]
    lrs = dict(x.split(":") for x in args.lrs.split(",")) if args.lrs else {}

    def ppl(masks, tokens=test, max_tokens=args.max_tokens, fill=None):
        return session.ppl(tokens, masks, fill, max_tokens)

    def compensated_ppl(masks, bias):
        import copy

        pruned = remove_units(copy.deepcopy(model), masks, output_bias=bias)
        return perplexity_of_tokens(pruned, test, seqlen=128, batch_size=8, max_tokens=args.max_tokens).ppl

    rows, runs = [], []
    payload = {"command": " ".join(sys.argv), "args": vars(args), "rows": rows, "runs": runs}
    dense = ppl(None)
    rows.append({"sparsity": 0.0, "method": "dense", "true_sparsity": 0.0, "wikitext2_ppl": dense})
    print(f"dense: {dense:.3f}", flush=True)
    stats = collect_layer_stats(model, calib, batch_size=8, propagate="dense", adapter=adapter, progress=False)
    fill = feature_means(stats) if args.compensate else None  # mean fill = FLAP's compensation, same stats
    loss_fn = session.loss_fn(fill)
    init_method, init_alloc = _method_allocation(args.init, args.allocation, kinds)
    if set(kinds) <= {"attn", "mlp", "layer"} and init_method == "wanda-sp":  # block units only
        init_method, init_alloc = _method_allocation("block-influence", args.allocation, kinds)
    baselines = [(init_method, init_alloc)] + [_method_allocation(m, args.allocation, kinds)
                                              for m in args.methods.split(",") if m]
    for sp in [float(x) for x in args.sparsities.split(",")]:
        metric_results = {}
        for method, alloc in dict.fromkeys(baselines):
            t0 = time.perf_counter()
            r = run_metric(model, calib, method, sp, kinds, alloc, seed=0, progress=False,
                           stats=stats if method != "wanda-sp" or alloc != "uniform" else None,
                           propagate="dense" if method != "wanda-sp" or alloc != "uniform" else None)
            metric_results.setdefault(method, r)  # the init uses the first (the --allocation) one
            value = ppl(r.masks) if r.output_bias is None else compensated_ppl(r.masks, r.output_bias)
            rows.append({"sparsity": sp, "method": f"{method} ({alloc})", "true_sparsity": r.info["sparsity"],
                         "wikitext2_ppl": value, "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
            save(args.tag, payload)
        if fill is not None:
            init_masks = metric_results[init_method].masks
            rows.append({"sparsity": sp, "method": f"{init_method} ({init_alloc}) + bias compensation",
                         "true_sparsity": init_masks.sparsity(costs),
                         "wikitext2_ppl": compensated_ppl(init_masks, compensation_biases(adapter, fill, init_masks, costs))})
            print(rows[-1], flush=True)
        init_result = metric_results[init_method]
        for est in args.estimators.split(","):
            lr = float(lrs.get(est, args.lr))
            session.settings = settings = settings_for(**{"pg.estimator": est, "sparsity": sp, "pg.lr": lr,
                                                          "pg.init": init_method})
            # as prune() starts it (features scored on the init metric's statistics, else the dense ones)
            policy = start_policy(session, init_result, lambda: stats)
            t0 = time.perf_counter()
            res = run_policy_gradient(model, pool, policy, settings.pg, seed=settings.seed, progress=True,
                                      loss_fn=loss_fn,
                                      eval_fn=lambda m: _logged(ppl(m, track, args.track_max_tokens, fill)))
            seconds = time.perf_counter() - t0
            final = ppl(res.masks) if fill is None else \
                compensated_ppl(res.masks, compensation_biases(adapter, fill, res.masks, costs))
            if args.save_masks:
                res.masks.save(Path(args.save_masks) / f"{sp}_{est}.safetensors",
                               metadata={"model": args.model, "method": f"pg-{est}", "command": " ".join(sys.argv)})
            step_times = seconds / max(args.steps, 1)
            name = est + ("+cv" if args.control_variate else "")
            label = (f"pg-{name}{' features' if args.policy == 'features' else ''} (init {init_method} {init_alloc} x{args.init_scale}, lr {lr}, floor {args.floor}, select {args.select}"
                     f"{', compensated' if fill else ''})")
            rows.append({"sparsity": sp, "method": label,
                         "true_sparsity": res.masks.sparsity(costs), "wikitext2_ppl": final, "seconds": seconds})
            if "layer" not in kinds and fill is None:  # compensation added after PG chose the masks
                comp = compensated_ppl(res.masks, compensation_biases(adapter, feature_means(stats), res.masks, costs))
                rows.append({"sparsity": sp, "method": f"pg-{est} + bias compensation",
                             "true_sparsity": res.masks.sparsity(costs), "wikitext2_ppl": comp})
            runs.append({"sparsity": sp, "estimator": name, "lr": lr, "steps": args.steps,
                         "selected_step": res.selected_step, "policy": args.policy,
                         "learned": policy.describe(), "settings": settings.to_dict(),
                         "seconds_per_step_incl_eval": step_times, "pg_seconds": res.seconds,
                         "curve": [{"forward_passes": h["forward_passes"], "hard_ppl_valid": h["hard_ppl"]}
                                   for h in res.history if "hard_ppl" in h],
                         "final_test_ppl": final})
            runs[-1]["init_test_ppl"] = next(r["wikitext2_ppl"] for r in reversed(rows)
                                              if r["sparsity"] == sp and r["method"].startswith(f"{init_method} ({init_alloc})"))
            print(rows[-1], flush=True)
            save(args.tag, payload)
    print(table(rows, ["sparsity", "method", "true_sparsity", "wikitext2_ppl", "seconds"]))
    print(f"(WikiText-2 test, seqlen 128, first {args.max_tokens} tokens; PG curve on WikiText-2 validation, "
          f"first {args.track_max_tokens} tokens)")
    save(args.tag, payload)
    _plot(runs, RESULTS_DIR / f"{args.tag}.png")


def _logged(value: float) -> float:
    print(f"  hard-mask perplexity (validation): {value:.2f}  [{time.strftime('%H:%M:%S')}]", flush=True)
    return value


def _method_allocation(entry: str, default: str, kinds) -> tuple[str, str]:
    from pgprune.metrics.pipeline import resolve_allocation

    method, _, alloc = entry.partition(":")
    return method, resolve_allocation(method, alloc or default, kinds)


def _plot(runs, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        xs = [c["forward_passes"] for c in r["curve"]]
        ys = [c["hard_ppl_valid"] for c in r["curve"]]
        ax.plot(xs, ys, marker="o", label=f"{r['estimator']} lr={r['lr']} sparsity={r['sparsity']}")
    ax.set_xlabel("forward passes (masked models evaluated)")
    ax.set_ylabel("hard-mask perplexity (WikiText-2 valid, seqlen 128)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
