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
import functools
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, calibration_windows, load_setup, save, table  # noqa: E402

from pgprune.data import get_eval_tokens  # noqa: E402
from pgprune.evaluate.perplexity import perplexity_of_tokens  # noqa: E402
from pgprune.gating import FORWARDS, gated  # noqa: E402
from pgprune.metrics.calibration import collect_layer_stats, feature_means  # noqa: E402
from pgprune.metrics.init import init_probabilities  # noqa: E402
from pgprune.metrics.prune import compensation_biases, run_metric  # noqa: E402
from pgprune.policy.features import FeaturePolicy  # noqa: E402
from pgprune.policy.loop import POLICIES, PGConfig, run_policy_gradient  # noqa: E402
from pgprune.surgery import prune_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--units", default="channel,head", help="unit kinds; 'layer' compares with block-influence")
    ap.add_argument("--methods", default="wanda-sp,flap,flap:uniform,magnitude,random",
                    help="metric baselines, each METHOD or METHOD:ALLOCATION (default allocation: global for "
                         "flap and block-influence, --allocation otherwise)")
    ap.add_argument("--init", default="wanda-sp", help="METHOD or METHOD:ALLOCATION of PG's initial mask")
    ap.add_argument("--allocation", default="uniform")
    ap.add_argument("--init-scale", type=float, default=1.0,
                    help="sigmoid scale of the standardised init scores: larger = probabilities nearer 0/1, so "
                         "PG explores only near the metric's decision boundary")
    ap.add_argument("--policy", default="units", choices=list(POLICIES),
                    help="units: a probability per unit (paper); features: shared logits from metric scores "
                         "and per-layer offsets (policy/features.py; --init-scale is its scale)")
    ap.add_argument("--estimators", default="paper,loo")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lrs", default=None, help="per-estimator lr, e.g. paper:0.05,loo:0.01")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--control-variate", action="store_true", help="PG's kept-fraction control variate")
    ap.add_argument("--floor", type=float, default=0.0, help="probability floor (exploration), see PGConfig")
    ap.add_argument("--select", default="final", choices=["final", "best"],
                    help="final hard mask, or the tracked one with the lowest validation perplexity")
    ap.add_argument("--forward", default="gated", choices=list(FORWARDS),
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
    args = ap.parse_args()

    model, tok, adapter, costs, layout = load_setup(args.model, args.dtype, args.units)
    kinds = layout.kinds
    test = get_eval_tokens(tok, "wikitext2", "test", args.data_dir)
    track = get_eval_tokens(tok, "wikitext2", "validation", args.data_dir)  # held out from the final test
    pool = calibration_windows(tok, args.calib, args.pool, args.seqlen, args.data_dir, track, args.track_max_tokens)
    calib = pool[: args.nsamples]
    lrs = dict(x.split(":") for x in args.lrs.split(",")) if args.lrs else {}

    def ppl(masks, tokens=test, max_tokens=args.max_tokens, fill=None):
        if masks is None:
            return perplexity_of_tokens(model, tokens, seqlen=128, batch_size=8, max_tokens=max_tokens).ppl
        with gated(model, masks, costs=costs, fill=fill):
            return perplexity_of_tokens(model, tokens, seqlen=128, batch_size=8, max_tokens=max_tokens).ppl

    def compensated_ppl(masks, bias):
        import copy

        pruned = prune_model(copy.deepcopy(model), masks, output_bias=bias)
        return perplexity_of_tokens(pruned, test, seqlen=128, batch_size=8, max_tokens=args.max_tokens).ppl

    rows, runs = [], []
    payload = {"command": " ".join(sys.argv), "args": vars(args), "rows": rows, "runs": runs}
    dense = ppl(None)
    rows.append({"sparsity": 0.0, "method": "dense", "true_sparsity": 0.0, "wikitext2_ppl": dense})
    print(f"dense: {dense:.3f}", flush=True)
    stats = collect_layer_stats(model, calib, batch_size=8, propagate="dense", adapter=adapter, progress=False)
    fill = feature_means(stats) if args.compensate else None  # mean fill = FLAP's compensation, same stats
    loss_fn = FORWARDS[args.forward] if fill is None else functools.partial(FORWARDS[args.forward], fill=fill)
    if set(kinds) <= {"attn", "mlp", "layer"} and args.init == "wanda-sp":  # block units only
        args.init = "block-influence"
    baselines = [_method_allocation(m, args.allocation) for m in [args.init] + args.methods.split(",") if m]
    init_method, init_alloc = baselines[0]  # --init METHOD[:ALLOCATION]
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
        init = init_probabilities(metric_results[init_method].allocation, costs, "sigmoid", scale=args.init_scale)
        s0 = layout.merge({k: init.probs[k] for k in kinds}).float()
        init_result = metric_results[init_method]
        for est in args.estimators.split(","):
            policy = None
            if args.policy == "features":  # features scored on the init metric's own statistics
                policy = FeaturePolicy.from_metric(init_result, adapter, layout, costs, scale=args.init_scale,
                                                   stats=stats)
            lr = float(lrs.get(est, args.lr))
            config = PGConfig(sparsity=init.sparsity, kinds=kinds, steps=args.steps, k=args.k,
                              batch_size=args.batch_size, lr=lr, estimator=est, eval_every=args.eval_every,
                              checkpoint_every=10**9, floor=args.floor, select=args.select, policy=args.policy,
                              seed=args.seed, control_variate=args.control_variate)
            t0 = time.perf_counter()
            res = run_policy_gradient(model, pool, s0, layout, costs, config, progress=True,
                                      loss_fn=loss_fn, policy=policy,
                                      eval_fn=lambda m: _logged(ppl(m, track, args.track_max_tokens, fill)))
            seconds = time.perf_counter() - t0
            final = ppl(res.masks) if fill is None else \
                compensated_ppl(res.masks, compensation_biases(adapter, fill, res.masks, costs))
            if args.save_masks:
                res.masks.save(Path(args.save_masks) / f"{sp}_{est}.safetensors",
                               metadata={"model": args.model, "method": f"pg-{est}", "command": " ".join(sys.argv)})
            step_times = seconds / max(args.steps, 1)
            name = est + ("+cv" if args.control_variate else "")
            label = (f"pg-{name}{' features' if policy else ''} (init {init_method} {init_alloc} x{args.init_scale}, lr {lr}, floor {args.floor}, select {args.select}"
                     f"{', compensated' if fill else ''})")
            rows.append({"sparsity": sp, "method": label,
                         "true_sparsity": res.masks.sparsity(costs), "wikitext2_ppl": final, "seconds": seconds})
            if "layer" not in kinds and fill is None:  # compensation added after PG chose the masks
                comp = compensated_ppl(res.masks, compensation_biases(adapter, feature_means(stats), res.masks, costs))
                rows.append({"sparsity": sp, "method": f"pg-{est} + bias compensation",
                             "true_sparsity": res.masks.sparsity(costs), "wikitext2_ppl": comp})
            runs.append({"sparsity": sp, "estimator": name, "lr": lr, "steps": args.steps,
                         "selected_step": res.selected_step, "policy": args.policy,
                         "learned": None if policy is None else policy.describe(),
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


def _method_allocation(entry: str, default: str) -> tuple[str, str]:
    method, _, alloc = entry.partition(":")
    return method, alloc or ("global" if method in ("flap", "block-influence") else default)


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
