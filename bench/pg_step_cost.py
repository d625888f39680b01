"""Cost of one policy-gradient step against plain inference, on SmolLM2-135M.

Time: a PG step (sample K masks, one gated forward of the batch repeated K times, estimator,
budget projection, bookkeeping) vs K plain dense forwards `model(ids, labels=ids)` of the same
batch. Measured in alternating blocks of steps; the ratio is the median of per-block ratios.
Target: <= 1.15.

Memory: peak resident memory of a fresh process that runs PG steps vs one that runs a plain
inference forward of the K*B rows (`model(ids).logits`, as any inference would), each after
loading the model the same way; the high-water mark is reset after loading (loading alone peaks
higher than either forward), so peak = resident model + the work's own peak. Target: <= 1.3.

    python bench/pg_step_cost.py [--dtype bf16] [--blocks 5] [--steps-per-block 3] [--policy features --estimator loo]
    python bench/pg_step_cost.py --dtype fp32 --policy features --forward gathered --scoring lsq   # issue 18
    python bench/pg_step_cost.py --dtype fp32 --policy search --forward gathered --scoring bias

`--scoring` is how each sampled mask is scored (`--pg-reconstruct`): none (plain masks), bias (mean
fill) or lsq (each mask's own least-squares refit, on a gathered view; with layer units its removed
runs regressed too); the statistics they read are collected once before timing (16 windows) and held
during the memory measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_setup, save, table  # noqa: E402

from pgprune.policy.estimators import ESTIMATORS  # noqa: E402


def _setup(args):
    model, _, adapter, costs, layout = load_setup(args.model, args.dtype, args.units)
    ids = torch.randint(0, model.config.vocab_size, (max(args.batch_size, 16), args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    args.feature_policy = None
    if args.policy in ("features", "search"):  # built once, outside the timed work (a metric pass on 16 windows)
        from pgprune.metrics.pipeline import run_metric
        from pgprune.policy.features import FeaturePolicy
        from pgprune.policy.search import SearchPolicy

        r = run_metric(model, ids[:16], "wanda-sp", args.sparsity, layout.kinds, "uniform", progress=False)
        kind = SearchPolicy if args.policy == "search" else FeaturePolicy
        args.feature_policy = kind.from_metric(r, adapter, layout, costs, scale=8.0)
        args.feature_policy.sigma = args.sigma
        args.sparsity = r.allocation.sparsity
    args.loss_fn = _loss_fn(model, costs, ids[:16], args)
    return model, costs, layout, ids


def _loss_fn(model, costs, calib, args):
    """The K-mask loss of --forward / --scoring, with its statistics collected now."""
    import functools

    from pgprune.gating import FORWARDS, gathered_losses
    from pgprune.metrics.calibration import collect_layer_stats
    from pgprune.reconstruction import feature_means, per_mask_refit

    if args.scoring == "none":
        return FORWARDS[args.forward]
    stats = collect_layer_stats(model, calib, covariance=args.scoring == "lsq", progress=False)
    if args.scoring == "bias":
        return functools.partial(FORWARDS[args.forward], fill=feature_means(stats))
    if args.forward != "gathered":
        raise SystemExit("--scoring lsq needs --forward gathered")
    return functools.partial(gathered_losses, refit=per_mask_refit(model, stats, calib, costs=costs, progress=False,
                                                                   regress_layers="layer" in args.units.split(",")))


def _pg(model, costs, layout, pool, args, steps, seed):
    import copy

    from pgprune.config import PGSettings
    from pgprune.policy.loop import run_policy_gradient
    from pgprune.policy.probabilities import UnitPolicy

    config = PGSettings(steps=steps, k=args.k, batch_size=args.batch_size, eval_every=10**9, policy=args.policy,
                        estimator=args.estimator)
    policy = copy.deepcopy(args.feature_policy) if args.feature_policy is not None else \
        UnitPolicy(layout.present.float() * (1 - args.sparsity), layout, costs, args.sparsity)
    return run_policy_gradient(model, pool, policy, config, seed=seed, progress=False, loss_fn=args.loss_fn)


def _plain(model, ids, k):
    with torch.no_grad():
        for _ in range(k):
            model(input_ids=ids, labels=ids)


def measure_time(args) -> dict:
    model, costs, layout, pool = _setup(args)
    batch = pool[: args.batch_size]
    _pg(model, costs, layout, pool, args, 1, seed=99)  # warm-up
    _plain(model, batch, 1)
    pg_times, plain_times, ratios = [], [], []
    for b in range(args.blocks):
        order = ("pg", "plain") if b % 2 == 0 else ("plain", "pg")
        t = {}
        for what in order:
            start = time.perf_counter()
            if what == "pg":
                _pg(model, costs, layout, pool, args, args.steps_per_block, seed=b)
            else:
                for _ in range(args.steps_per_block):
                    _plain(model, batch, args.k)
            t[what] = (time.perf_counter() - start) / args.steps_per_block
        pg_times.append(t["pg"])
        plain_times.append(t["plain"])
        ratios.append(t["pg"] / t["plain"])
    return {"pg_step_s": statistics.median(pg_times), "k_plain_forwards_s": statistics.median(plain_times),
            "ratio": statistics.median(ratios), "ratios": ratios}


def child(args) -> None:
    """One memory measurement in this (fresh) process; prints JSON."""
    from pgprune.memory import _status_kb, measure_peak_growth

    model, costs, layout, pool = _setup(args)

    def work():
        if args.child == "pg":
            _pg(model, costs, layout, pool, args, 2, seed=0)
        else:
            ids = pool[: args.batch_size].repeat(args.k, 1)
            with torch.no_grad():
                model(input_ids=ids).logits.float().sum()

    growth, _ = measure_peak_growth(work)  # resets the high-water mark after loading
    peak = _status_kb("VmHWM") * 1024
    print(json.dumps({"peak_rss": peak, "after_load_rss": peak - growth}))


def measure_memory(args) -> dict:
    out = {}
    for mode in ("plain", "pg"):
        cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--dtype", args.dtype,
               "--k", str(args.k), "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen),
               "--units", args.units, "--sparsity", str(args.sparsity), "--policy", args.policy,
               "--sigma", str(args.sigma), "--estimator", args.estimator, "--forward", args.forward,
               "--scoring", args.scoring]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    out["ratio_peak"] = out["pg"]["peak_rss"] / out["plain"]["peak_rss"]
    out["ratio_above_load"] = ((out["pg"]["peak_rss"] - out["pg"]["after_load_rss"])
                               / max(1, out["plain"]["peak_rss"] - out["plain"]["after_load_rss"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--units", default="channel,head")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--policy", default="units", choices=["units", "features", "search"])
    ap.add_argument("--sigma", type=float, default=0.05, help="the search policy's --sigma")
    ap.add_argument("--estimator", default="paper", choices=list(ESTIMATORS))
    ap.add_argument("--forward", default="gated", choices=["gated", "gathered"])
    ap.add_argument("--scoring", default="none", choices=["none", "bias", "lsq"])
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--steps-per-block", type=int, default=3)
    ap.add_argument("--child", choices=["pg", "plain"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    timing = measure_time(args)
    memory = measure_memory(args)
    rows = [{"what": "step time", "pg": timing["pg_step_s"], "plain": timing["k_plain_forwards_s"],
             "ratio": timing["ratio"], "target": 1.15},
            {"what": "peak RSS (bytes)", "pg": memory["pg"]["peak_rss"], "plain": memory["plain"]["peak_rss"],
             "ratio": memory["ratio_peak"], "target": 1.3}]
    print(table(rows, ["what", "pg", "plain", "ratio", "target"]))
    print(f"(K={args.k}, batch {args.batch_size} x {args.seqlen}, {args.dtype}, units {args.units}, "
          f"policy {args.policy}, estimator {args.estimator}, {args.forward} forward, scoring {args.scoring}; "
          f"memory above the loaded model: ratio {memory['ratio_above_load']:.3f})")
    tag = f"pg_step_cost_{args.dtype}" + ("" if args.policy == "units" else f"_{args.policy}") + \
        ("" if (args.forward, args.scoring) == ("gated", "none") else f"_{args.forward}_{args.scoring}") + \
        ("" if args.units == "channel,head" else "_" + args.units.replace(",", "-"))
    save(tag, {"command": " ".join(sys.argv),
               "args": {k: v for k, v in vars(args).items() if k not in ("feature_policy", "loss_fn")},
               "timing": timing, "memory": memory, "rows": rows})


if __name__ == "__main__":
    main()
