"""How noisy is each PG gradient estimator on the real model, at PG's starting point?

Draws N steps (batch 8 x 128 from --calib, default the Wikipedia sample; K masks each) at the initial
probabilities of a metric (held fixed), and feeds the same samples to every estimator (antithetic
pairs, drawn on the same batches, for the estimators that need them: disarm). For each
it reports, in logit space (g * s(1 - s), what the features policy steps along) and with the
budget direction removed (the projection cancels it):
- snr: |mean g|^2 / mean |g - mean g|^2 (per step; higher = fewer steps to see the direction), and
  snr_debiased = snr - 1/steps (the mean of N pure-noise steps has |mean|^2 ~ noise / N),
- split_half_cos: cosine between the mean g of the first and of the second half of the steps.
It also reports how much of the difference between two masks' losses on the same batch is explained
by how much of each unit kind they keep (R^2 of a least-squares fit): independent Bernoulli masks
keep a random amount of the model (30 layers at 30 %: 9 +- 2 removed), and that part of the loss
says nothing about which units to keep.

    python bench/estimator_variance.py --units layer --init block-influence --init-scale 2
    python bench/estimator_variance.py --units channel,head --init wanda-sp --sparsity 0.3
    python bench/estimator_variance.py ... --estimators paper --baselines previous,others
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, load_setup, save, table  # noqa: E402

from pgprune.data import get_calibration_windows  # noqa: E402
from pgprune.gating import FORWARDS  # noqa: E402
from pgprune.metrics.calibration import collect_layer_stats
from pgprune.reconstruction import feature_means  # noqa: E402
from pgprune.policy.features import FeaturePolicy  # noqa: E402
from pgprune.policy.initial_probabilities import init_probabilities  # noqa: E402
from pgprune.metrics.pipeline import resolve_allocation, run_metric  # noqa: E402
from pgprune.budget import project  # noqa: E402
from pgprune.policy.estimators import ESTIMATORS, BaselineState, get_estimator  # noqa: E402
from pgprune.policy.loop import step_generator  # noqa: E402
from pgprune.policy.probabilities import sample_masks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--calib", default="wiki-sample", help="calibration source")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--units", default="layer")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--init", default="block-influence")
    ap.add_argument("--allocation", default="auto", help="the metric's allocation (auto: as pgprune prune resolves it)")
    ap.add_argument("--init-scale", type=float, default=2.0)
    ap.add_argument("--policy", default="units", choices=("units", "features"),
                    help="features: start at the feature policy's probabilities and also report the noise of the "
                         "gradient of its parameters (what its Adam steps on)")
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--forward", default="gathered", choices=list(FORWARDS))
    ap.add_argument("--compensate", action="store_true", help="losses of the mean-filled (compensated) models")
    ap.add_argument("--baselines", default="previous",
                    help="the paper estimator's baseline modes to compare (previous, ema, others), same samples")
    ap.add_argument("--control-variate", action="store_true",
                    help="also each estimator with the kept-fraction control variate (NAME+cv), same samples")
    ap.add_argument("--tag", default="estimator_variance")
    args = ap.parse_args()

    model, tok, adapter, costs, layout = load_setup(args.model, args.dtype, args.units)
    kinds = layout.kinds
    pool = get_calibration_windows(tok, args.calib, 1024, args.seqlen, seed=0, data_dir=args.data_dir)
    stats = collect_layer_stats(model, pool[:128], batch_size=8, propagate="dense", adapter=adapter, progress=False)
    loss_fn = FORWARDS[args.forward]
    if args.compensate:
        loss_fn = functools.partial(loss_fn, fill=feature_means(stats))
    allocation = resolve_allocation(args.init, args.allocation, kinds)
    metric = run_metric(model, pool[:128], args.init, args.sparsity, kinds, allocation, progress=False,
                        stats=stats, propagate="dense")
    init = init_probabilities(metric.allocation, costs, "sigmoid", scale=args.init_scale)
    s = project(layout.merge({k: init.probs[k] for k in kinds}).float(), layout, costs, 1.0 - init.sparsity)
    policy = None
    if args.policy == "features":
        policy = FeaturePolicy.from_metric(metric, adapter, layout, costs, scale=args.init_scale, stats=stats)
        s = policy.probs().float()
        # a change common to every score is what the budget shift cancels: the offsets' common direction
        uniform = torch.cat([torch.zeros(policy.weights.numel()), torch.ones(policy.offsets.numel())]).double()
        uniform = uniform / uniform.norm()

    estimators = args.estimators.split(",")
    t0 = time.perf_counter()
    samples = {False: [], True: []}  # independent / antithetic draws
    for step in range(args.steps):  # PG's draws at fixed probabilities
        gen = step_generator(0, step)
        batch = pool[torch.randperm(pool.shape[0], generator=gen)[: args.batch_size]]
        for antithetic in sorted({ESTIMATORS[name].antithetic for name in estimators}):
            m = sample_masks(s, args.k, gen, antithetic=antithetic)
            samples[antithetic].append((m, loss_fn(model, batch, layout.masks(m), costs=costs).float()))
    seconds = time.perf_counter() - t0

    direction = layout.cost.double() * s.double() * (1 - s.double())  # the budget shift, in logit space
    direction = direction / direction.norm().clamp_min(1e-30)
    rows = []
    modes = args.baselines.split(",")
    plain = [(name, mode) for name in estimators for mode in (modes if name == "paper" else ["previous"])]
    variants = [(n, mode, False) for n, mode in plain] + [(n, mode, True) for n, mode in plain if args.control_variate]

    def noise_stats(grads: list[torch.Tensor], prefix: str = "") -> dict:
        g = torch.stack(grads)
        mean = g.mean(0)
        noise = ((g - mean) ** 2).sum(1).mean()
        half = len(grads) // 2
        cos = torch.nn.functional.cosine_similarity(g[:half].mean(0), g[half:].mean(0), dim=0)
        snr = float(mean.norm() ** 2 / noise)  # |mean g|^2 carries noise / steps of its own: snr >= ~1/steps
        return {prefix + "snr": snr, prefix + "snr_debiased": snr - 1.0 / len(grads),
                prefix + "split_half_cos": float(cos)}

    for name, mode, controlled in variants:
        estimator = get_estimator(name, args.k, layout.cost if controlled else None)  # as in the loop
        baseline, grads, param_grads = BaselineState(mode=mode), [], []
        for m, losses in samples[ESTIMATORS[name].antithetic]:
            g, _ = estimator(m, s, losses, baseline)
            if policy is not None:
                p = policy.param_gradient(g)
                param_grads.append(p - (p @ uniform) * uniform)
            g = g.double() * s.double() * (1 - s.double())
            grads.append(g - (g @ direction) * direction)
        label = name + (f"[{mode}]" if name == "paper" and len(modes) > 1 else "") + ("+cv" if controlled else "")
        rows.append({"estimator": label, **noise_stats(grads),
                     **(noise_stats(param_grads, "params_") if param_grads else {})})

    def kept_fractions(m):  # [K, kinds]: the fraction of each kind's parameters the mask keeps
        parts, unit_costs = layout.split(m.double()), layout.split(layout.cost)
        return torch.stack([(parts[k] * unit_costs[k]).sum((-1, -2)) / unit_costs[k].sum() for k in layout.kinds], -1)

    independent = samples[False] or samples[True]
    kept = torch.cat([f - f.mean(0) for f in (kept_fractions(m) for m, _ in independent)])
    dl = torch.cat([losses.double() - losses.double().mean() for _, losses in independent])
    fit = torch.linalg.lstsq(kept, dl[:, None]).solution
    r2 = 1.0 - float(((dl[:, None] - kept @ fit) ** 2).sum() / (dl ** 2).sum())
    columns = ["estimator", "snr", "snr_debiased", "split_half_cos"]
    print(table(rows, columns + (["params_snr_debiased", "params_split_half_cos"] if policy is not None else [])))
    print(f"{args.steps} steps x K={args.k} ({seconds:.0f} s); within-step loss differences explained by the kept "
          f"amount per kind: R^2 = {r2:.3f}")
    save(args.tag, {"command": command_line("estimator_variance.py", sys.argv[1:]), "args": vars(args),
                    "rows": rows, "kept_amount_r2": r2, "sampling_seconds": seconds})


if __name__ == "__main__":
    main()
