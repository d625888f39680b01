"""The quality cost of `--width-multiple N` on SmolLM2-135M: a metric method's mask with every kept
MLP width rounded to a multiple of N (pgprune.budget.round_widths, by the method's own scores).

For each sparsity: the method's scores and allocation on the calibration windows (run_metric, as
`pgprune prune --method M` does); for each N the allocation rounded to multiples of N by those scores
(what run_metric(..., width_multiple=N) returns), FLAP's bias compensation from the dense
calibration means of the removed features (`--reconstruct bias`), surgery, and the WikiText-2 test
perplexity of the pruned model (DESIGN.md protocol: first --max-tokens tokens, windows of --seqlen).
N = 1 is the unrounded mask.

    python bench/width_multiple.py --data-dir /work/shared/data     # wanda-sp, 30 % and 50 %, N = 1, 32, 128

Writes bench/results/width_multiple.json (after every cell) and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


from _common import RESULTS_DIR, command_line, load_setup, machine, table  # noqa: E402
from pgprune import atomic  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="wanda-sp")
    p.add_argument("--allocation", default="auto", help="auto: the method's reference (wanda-sp uniform, flap global)")
    p.add_argument("--sparsities", default="0.3,0.5")
    p.add_argument("--multiples", default="1,32,128")
    p.add_argument("--units", default="channel,head")
    p.add_argument("--calib", default="wiki-sample")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense", action="store_true", help="also the dense model's perplexity")
    p.add_argument("--out", default=str(RESULTS_DIR / "width_multiple.json"))
    args = p.parse_args(argv)

    from pgprune.data import get_calibration_windows, get_eval_tokens
    from pgprune.budget import round_widths
    from pgprune.reconstruction import compensation_biases
    from pgprune.surgery import remove_units
    from pgprune.evaluate.perplexity import perplexity_of_tokens
    from pgprune.metrics.calibration import collect_layer_stats
    from pgprune.metrics.pipeline import resolve_allocation, run_metric
    from pgprune.masks import parse_unit_kinds
    from pgprune.reconstruction import feature_means

    kinds = parse_unit_kinds(args.units)
    allocation = resolve_allocation(args.method, args.allocation, kinds)
    model, tok, adapter, costs, _ = load_setup(args.model, "fp32", args.units)
    calib = get_calibration_windows(tok, args.calib, args.nsamples, args.calib_seqlen, seed=args.seed,
                                    data_dir=args.data_dir)
    tokens = get_eval_tokens(tok, "wikitext2", "test", data_dir=args.data_dir)
    fill = feature_means(collect_layer_stats(model, calib, batch_size=8, propagate="dense", progress=False))

    def ppl(m) -> float:
        return perplexity_of_tokens(m, tokens, seqlen=args.seqlen, max_tokens=args.max_tokens).ppl

    record = {"command": command_line("width_multiple.py", sys.argv[1:] if argv is None else argv),
              "machine": machine(), "model": args.model, "method": args.method, "allocation": allocation,
              "units": list(kinds), "reconstruct": "bias",
              "calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.calib_seqlen},
              "perplexity_protocol": {"dataset": "wikitext2", "split": "test", "seqlen": args.seqlen,
                                      "max_tokens": args.max_tokens},
              "dense_ppl": ppl(model) if args.dense else None, "rows": []}
    for s in [float(x) for x in args.sparsities.split(",")]:
        t0 = time.perf_counter()
        # one scoring pass per sparsity: run_metric(width_multiple=N) rounds the same allocation with
        # the same keys (tests/test_width_multiple.py checks that it equals round_widths of it)
        r = run_metric(model, calib, args.method, s, kinds, allocation, bias_compensation=False,
                       seed=args.seed, progress=False)
        t_metric = time.perf_counter() - t0
        for n in [int(x) for x in args.multiples.split(",")]:
            t0 = time.perf_counter()
            masks, rounding = round_widths(r.masks, r.allocation.keys, costs, n, s)
            bias = compensation_biases(adapter, fill, masks, costs)
            pruned = copy.deepcopy(model)
            remove_units(pruned, masks, output_bias=bias)
            widths = masks.effective(costs)["channel"].sum(-1).tolist()
            row = {"sparsity_target": s, "width_multiple": n, "sparsity": float(masks.sparsity(costs)),
                   "ppl": ppl(pruned), "layers_rounded_up": len(rounding.rounded_up),
                   "layers_rounded_down": len(rounding.rounded_down),
                   "min_width": min(widths), "max_width": max(widths), "channels_per_layer": widths,
                   "kv_heads_per_layer": masks.effective(costs)["head"].sum(-1).tolist(),
                   "metric_seconds": t_metric, "seconds": time.perf_counter() - t0}
            del pruned
            record["rows"].append(row)
            print(f"sparsity {s} N {n}: true sparsity {row['sparsity']:.4f}, ppl {row['ppl']:.3f}, widths "
                  f"{row['min_width']}..{row['max_width']}, up {row['layers_rounded_up']} down "
                  f"{row['layers_rounded_down']} ({row['seconds']:.0f} s)", flush=True)
            atomic.write_json(args.out, record)
    base = {r["sparsity_target"]: r["ppl"] for r in record["rows"] if r["width_multiple"] == 1}
    for r in record["rows"]:
        r["ppl_vs_unrounded"] = r["ppl"] / base[r["sparsity_target"]] if r["sparsity_target"] in base else None
    atomic.write_json(args.out, record)
    print(table(record["rows"], ["sparsity_target", "width_multiple", "sparsity", "ppl", "ppl_vs_unrounded",
                                 "min_width", "max_width", "layers_rounded_up", "layers_rounded_down"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
