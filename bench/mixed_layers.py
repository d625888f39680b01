"""Does one budget over channels, heads and whole layers pay? Each metric method with the r layers of lowest
block influence removed first (`--remove-layers r`), at the same total sparsity, refit and scored.

Before PG's start removes whole layers, the plain question: at a fixed budget, does giving some of it to
whole layers (and pruning fewer channels and heads) beat channels and heads alone? For each `--methods` entry
and each `--layers` count r, `run_metric(..., remove_layers=r)` removes the r layers that block influence
(ShortGPT) ranks lowest and gives the rest of the budget to the method's own channel / head allocation over
the kept layers (FLAP: one global threshold; obs, Wanda-sp: the same fraction of every kept layer), all from
the dense model's statistics; r = 0 is the method's own run (Wanda-sp's then walks the pruned model). Every
mask is refit by least squares as the export does (sequential inputs, removed runs of layers regressed) and
scored under recipe_targets.py's protocol (WikiText-2 test, the natural-text measure). Statistics come from
the default recipe's calibration windows of --calib / --seed (the first 128, what a metric cell reads).

    python bench/mixed_layers.py --data-dir ../shared/data --sparsity 0.3 --methods flap --layers 0,1,2,3,5 \
        --tag mixed_layers_30

Writes bench/results/TAG.json (after every mask) and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command_line, save, table  # noqa: E402
from recipe_targets import protocol, score_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--methods", default="flap", help="metric methods, each at its own allocation")
    p.add_argument("--layers", default="0,1,2,3", help="numbers of whole layers removed first")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="wiki-sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--wikitext-tokens", type=int, default=65536)
    p.add_argument("--natural-tokens", type=int, default=32768)
    p.add_argument("--tag", default="mixed_layers")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pgprune.config import RunSettings
    from pgprune.data import get_calibration_windows
    from pgprune.metrics.pipeline import resolve_allocation, run_metric
    from pgprune.pruning import METRIC_NSAMPLES, load_session
    from pgprune.reconstruction import reconstruct
    from pgprune.surgery import remove_units

    settings = RunSettings.from_recipe("features", {"model": args.model, "data.data_dir": args.data_dir,
                                                    "data.calib": args.calib, "seed": args.seed,
                                                    "sparsity": args.sparsity, "execution.dtype": args.dtype,
                                                    "execution.device": args.device})
    session = load_session(settings)
    model, costs = session.model, session.costs
    batch = settings.execution.metric_batch_size
    calib = get_calibration_windows(session.tokenizer, settings.data.calib, settings.pool_size(1),
                                    settings.data.seqlen, seed=settings.seed, data_dir=settings.data.data_dir)
    calib = calib[:METRIC_NSAMPLES]
    record = {"command": command_line("mixed_layers.py", sys.argv[1:] if argv is None else argv),
              "protocol": protocol(args), "calib": args.calib, "seed": args.seed, "sparsity": args.sparsity,
              "rows": []}
    stats = None  # the dense statistics, collected once with covariances (obs reads them) and reused
    for method in args.methods.split(","):
        allocation = resolve_allocation(method, "auto", ("channel", "head"))
        for r in (int(x) for x in args.layers.split(",")):
            t0 = time.perf_counter()
            kinds = ("channel", "head", "layer") if r else ("channel", "head")
            metric = run_metric(model, calib, method, args.sparsity, kinds, allocation, batch_size=batch,
                                seed=args.seed, bias_compensation=False, remove_layers=r or None,
                                stats=stats if r else None)
            if r and stats is None:
                stats = metric.dense_stats
            masks = metric.masks
            refit = reconstruct(model, calib, masks, "lsq", inputs="auto", damp=settings.reconstruct_damp,
                                batch_size=batch, costs=costs)
            pruned = remove_units(model, masks, output_bias=refit.output_bias, input_weights=refit.input_weights,
                                  copy=True)
            scores = score_model(pruned, session.tokenizer, args)
            del pruned
            eff = masks.effective(costs)
            layers = (~eff["layer"]).nonzero().flatten().tolist() if "layer" in eff else []
            record["rows"].append({"method": method, "allocation": allocation, "removed_layers": r, "layers": layers,
                                   "sparsity": float(masks.sparsity(costs)), "inputs": refit.info.get("inputs"),
                                   "kept_channels": int(eff["channel"].sum()), "kept_heads": int(eff["head"].sum()),
                                   "scores": scores, "seconds": time.perf_counter() - t0})
            save(args.tag, record)
            print(f"[mixed] {method} r={r}: {scores}", flush=True)
    rows = [{"method": x["method"], "layers removed": x["removed_layers"], "which": ",".join(map(str, x["layers"])),
             "sparsity": round(x["sparsity"], 3), "kept channels": x["kept_channels"],
             "kept KV groups": x["kept_heads"], "WikiText-2": round(x["scores"]["wikitext2"], 1),
             "natural": round(x["scores"]["natural"], 1)} for x in record["rows"]]
    print(table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
