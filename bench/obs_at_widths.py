"""obs's within-layer choice at other per-layer widths, refit and exported: a given mask's (e.g. a PG
run's, `--masks`), or a global order of obs's errors weighted by each layer's measured loss sensitivity
(`--sensitivity`).

PG's feature policy learns each layer's width (its offsets) and how to rank units inside a layer
(a mix of metric scores). This keeps only the widths of a given mask and lets obs (greedy structured
OBS, `--method obs`) choose the units inside every layer: from the dense model's statistics as obs's own
cell and PG's obs start do (its greedy order is nested, so a layer's top units at any width are a prefix
of it), or `--propagate pruned`, each layer scored on the outputs of the earlier layers already pruned
to their given widths. Then it refits by least squares (sequential inputs) like the export and writes
the model; score it with `bench/recipe_targets.py --score NAME=OUT/model`.

`--sensitivity`: obs's scores are layer-output errors (squared, summed over calibration tokens), which
weigh differently in the loss at every depth (its plain global order is bad, bench/RESULTS.md "obs").
Each (layer, kind) is pruned alone by obs's order at the target fraction, refit by least squares
(dense inputs), and the loss change on --probe-windows calibration windows divided by obs's predicted
error gives that layer's weight; units are then removed globally by weight x error / parameters
(within a layer still in obs's greedy order) to the target sparsity.

    python bench/obs_at_widths.py --masks runs/recipe_targets_obs/wiki-sample_s0_0.5_features/masks.safetensors \\
        --calib wiki-sample --seed 0 --out runs/obs_at_widths/ws0_50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--masks", default=None, help="the mask whose per-layer widths obs fills")
    p.add_argument("--sensitivity", action="store_true", help="widths from obs's sensitivity-weighted global order")
    p.add_argument("--sparsity", type=float, default=0.5, help="with --sensitivity")
    p.add_argument("--probe-windows", type=int, default=16, help="with --sensitivity")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="wiki-sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--propagate", default="dense", choices=("dense", "pruned"))
    p.add_argument("--out", required=True, help="folder: model/, masks.safetensors, info.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pgprune.config import RunSettings
    from pgprune.data import get_calibration_windows
    from pgprune.export import save_pruned
    from pgprune.masks import Masks
    from pgprune.metrics.allocation import UniformPlan, lowest_in_layer
    from pgprune.metrics.calibration import collect_layer_stats
    from pgprune.metrics.pipeline import _pruning_walker
    from pgprune.metrics.scores import get_method, scores_from_stats
    from pgprune.pruning import METRIC_NSAMPLES, load_session
    from pgprune.reconstruction import reconstruct
    from pgprune.surgery import remove_units

    if bool(args.masks) == args.sensitivity:
        raise SystemExit("give --masks or --sensitivity")
    if args.sensitivity and args.propagate != "dense":
        raise SystemExit("--sensitivity scores from the dense model's statistics")
    t0 = time.perf_counter()
    # the default recipe's settings: its calibration pool, whose first METRIC_NSAMPLES windows the
    # metric start and the final refit of a PG run read
    settings = RunSettings.from_recipe("features", {"model": args.model, "data.data_dir": args.data_dir,
                                                    "data.calib": args.calib, "seed": args.seed,
                                                    "sparsity": args.sparsity, "execution.dtype": args.dtype})
    session = load_session(settings)
    model, adapter, costs = session.model, session.adapter, session.costs
    batch = settings.execution.metric_batch_size
    calib = get_calibration_windows(session.tokenizer, settings.data.calib, settings.pool_size(1),
                                    settings.data.seqlen, seed=settings.seed, data_dir=settings.data.data_dir)
    calib = calib[:METRIC_NSAMPLES]
    kinds = ("channel", "head")
    widths = {k: costs.units_per_layer(k) for k in kinds}
    given = Masks.load(args.masks) if args.masks else None
    counts = {k: (~given[k]).sum(1).long() for k in kinds} if given is not None else None
    info: dict = {"masks_from": args.masks, "propagate": args.propagate, "calib": args.calib, "seed": args.seed}
    if args.propagate == "pruned":
        sparsity = float(given.sparsity(costs))
        plan = UniformPlan(counts=counts, sparsity=sparsity, target=sparsity)
        record: dict = {}
        walker = _pruning_walker(get_method("obs"), adapter, args.seed, plan, False, record, {})
        collect_layer_stats(model, calib, batch_size=batch, propagate="pruned", on_layer=walker, adapter=adapter,
                            covariance=True)
        masks = Masks({k: torch.stack([record[i][k] for i in range(costs.num_layers)]) for k in kinds})
    else:
        stats = collect_layer_stats(model, calib, batch_size=batch, adapter=adapter, covariance=True)
        raw = scores_from_stats(adapter, stats, "obs", kinds).raw
        if given is None:
            weights = layer_sensitivity(model, calib[:args.probe_windows], raw, stats, costs, settings)
            counts = sensitivity_counts(raw, weights, costs, settings.sparsity)
            info["sensitivity"] = {k: v.tolist() for k, v in weights.items()}
        masks = Masks({k: torch.stack([lowest_in_layer(raw[k][i], int(counts[k][i]), widths[k])
                                       for i in range(costs.num_layers)]) for k in kinds})
        del stats
    refit = reconstruct(model, calib, masks, "lsq", inputs="sequential", damp=settings.reconstruct_damp,
                        batch_size=batch, costs=costs)
    remove_units(model, masks, output_bias=refit.output_bias, input_weights=refit.input_weights)
    out = Path(args.out)
    save_pruned(model, session.tokenizer, out / "model", masks=masks, overwrite=True)
    masks.save(out / "masks.safetensors")
    info.update(sparsity=float(masks.sparsity(costs)), kept={k: masks[k].sum(1).tolist() for k in kinds},
                seconds=time.perf_counter() - t0, machine=machine())
    if given is not None:
        info["agreement_with_given"] = {k: float((masks[k] == given[k]).float().mean()) for k in kinds}
    (out / "info.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    return 0


def layer_sensitivity(model, probe, raw, stats, costs, settings) -> dict:
    """{kind: [L]} loss change per unit of obs's predicted output error, each (layer, kind) pruned alone
    at the target fraction by obs's order and refit by least squares (dense inputs)."""
    from pgprune.lm_loss import token_nll
    from pgprune.masks import Masks
    from pgprune.metrics.allocation import lowest_in_layer
    from pgprune.reconstruction import reconstruct
    from pgprune.surgery import remove_units

    base = float(token_nll(model, probe).mean())
    out = {}
    for kind in raw:
        width = costs.units_per_layer(kind)
        count = max(1, min(width - 1, round(settings.sparsity * width)))
        w = torch.zeros(costs.num_layers, dtype=torch.float64)
        for i in range(costs.num_layers):
            masks = Masks.full(costs, tuple(raw))
            keep = lowest_in_layer(raw[kind][i], count, width)
            masks[kind][i] = keep
            refit = reconstruct(model, None, masks, "lsq", inputs="dense", stats=stats,
                                damp=settings.reconstruct_damp, progress=False, costs=costs)
            pruned = remove_units(model, masks, output_bias=refit.output_bias, input_weights=refit.input_weights,
                                  copy=True)
            change = float(token_nll(pruned, probe).mean()) - base
            predicted = float(raw[kind][i][~keep].sum())
            w[i] = max(change, 1e-6) / max(predicted, 1e-30)
            print(f"[sensitivity] {kind} layer {i}: loss +{change:.4f}, obs error {predicted:.4g}", flush=True)
        out[kind] = w
    return out


def sensitivity_counts(raw, weights, costs, sparsity: float) -> dict:
    """Units each layer removes: the global order of weight x obs error / parameters, cut at `sparsity`."""
    from pgprune.budget import closest_prefix, global_positions, masks_from_positions

    keys = {k: weights[k][:, None] * raw[k] / costs.unit_cost(k).double() for k in raw}
    positions = global_positions(keys, costs)
    pre = closest_prefix(positions, costs, sparsity, what="channel+head units")
    masks = masks_from_positions(positions, pre.n)
    return {k: (~masks[k]).sum(1).long() for k in raw}


if __name__ == "__main__":
    raise SystemExit(main())
