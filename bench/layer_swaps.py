"""Does the calibration loss rank whole-layer masks the way WikiText-2 does?

Takes the block-influence layer mask (with bias compensation, as PG evaluates it) and its swap
neighbours: restore one removed layer, remove one kept layer (the --kept-candidates kept layers
with the lowest block influence, i.e. the boundary). Each swap is scored by its mean loss change
on --windows calibration windows of every --calib source (the same windows for every mask, so the
differences are paired) and by its perplexity on the first --valid-tokens of WikiText-2 validation.
A PG run can only improve WikiText-2 through masks its calibration loss prefers: this shows whether
the two agree (Spearman correlation, and the best swaps of each).

`--kl` adds a second objective (KL from the dense model); `--calib valid-tail` scores on WikiText-2
validation text after the scored tokens (in-domain calibration); `--swaps` re-measures a few swaps.

    python bench/layer_swaps.py --calib wiki-sample,c4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import calibration_windows, command_line, load_setup, save, table  # noqa: E402

from pgprune.data import get_calibration_windows, get_eval_tokens  # noqa: E402
from pgprune.evaluate.perplexity import perplexity_of_tokens  # noqa: E402
from pgprune.lm_loss import token_nll  # noqa: E402
from pgprune.masks import Masks  # noqa: E402
from pgprune.metrics.calibration import collect_layer_stats
from pgprune.reconstruction import feature_means  # noqa: E402
from pgprune.metrics.pipeline import run_metric
from pgprune.reconstruction import compensation_biases  # noqa: E402
from pgprune.surgery import pruned_view  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--calib", default="wiki-sample,c4",
                    help="calibration sources to score the swaps on; 'valid-tail' = WikiText-2 validation "
                         "after the first --valid-tokens (in-domain text the validation score does not use); "
                         "'valid-tail-plain' = the same with WikiText's word tokenisation undone; "
                         "'wiki-sample-wikitext' = the Wikipedia sample written the way WikiText-2 is")
    ap.add_argument("--windows", type=int, default=32, help="calibration windows (x 128 tokens) per source")
    ap.add_argument("--valid-tokens", type=int, default=4096)
    ap.add_argument("--kept-candidates", type=int, default=6)
    ap.add_argument("--swaps", default="",
                    help="score only these swaps, 'RESTORE:REMOVE,...' (e.g. to re-measure a few on more --valid-tokens)")
    ap.add_argument("--kl", action="store_true",
                    help="also score each swap by its mean KL(dense || pruned) per token on the calibration windows")
    ap.add_argument("--tag", default="layer_swaps")
    args = ap.parse_args()

    model, tok, adapter, costs, _ = load_setup(args.model, args.dtype, "layer")
    pool = get_calibration_windows(tok, "wiki-sample", 1024, 128, seed=0)
    stats = collect_layer_stats(model, pool[:128], batch_size=8, propagate="dense", adapter=adapter, progress=False)
    fill = feature_means(stats)  # the mean fill PG's --compensate uses (same windows as pg_quality.py)
    metric = run_metric(model, pool[:128], "block-influence", args.sparsity, ("layer",), "global", progress=False,
                        stats=stats, propagate="dense")
    base = metric.masks["layer"][:, 0].clone()
    score = metric.scores.raw["layer"][:, 0].float()
    removed = (~base).nonzero().view(-1).tolist()
    kept = sorted(base.nonzero().view(-1).tolist(), key=lambda i: float(score[i]))[: args.kept_candidates]
    valid = get_eval_tokens(tok, "wikitext2", "validation", args.data_dir)

    sources = {name: pool[128:][: args.windows] if name == "wiki-sample" else  # windows PG's metric init did not see
               calibration_windows(tok, name, args.windows, 128, args.data_dir, valid, args.valid_tokens)
               for name in args.calib.split(",")}
    with torch.no_grad():
        dense_logp = {name: [model(w[i:i + 8]).logits.float().log_softmax(-1) for i in range(0, len(w), 8)]
                      for name, w in sources.items()} if args.kl else {}

    def mean_kl(view, name: str) -> float:
        w = sources[name]
        with torch.no_grad():
            kls = [F.kl_div(view(w[i:i + 8]).logits.float().log_softmax(-1), ref_logp, log_target=True,
                            reduction="none").sum(-1).mean()
                   for i, ref_logp in zip(range(0, len(w), 8), dense_logp[name])]
        return float(torch.stack(kls).mean())

    def scores(layer_keep: torch.Tensor) -> dict:
        masks = Masks({"layer": layer_keep.view(-1, 1)})
        # the compensated pruned model PG's gathered forward scores (gating.gathered_losses), built once per mask
        view = pruned_view(model, masks, output_bias=compensation_biases(adapter, fill, masks, costs))
        out = {name: torch.cat([token_nll(view, w[i:i + 8]) for i in range(0, len(w), 8)]).mean().item()
               for name, w in sources.items()}
        out.update({f"kl_{name}": mean_kl(view, name) for name in dense_logp})
        out["valid_ppl"] = perplexity_of_tokens(view, valid, seqlen=128, batch_size=8, max_tokens=args.valid_tokens).ppl
        return out

    t0 = time.perf_counter()
    ref = scores(base)
    rows = []
    only = {tuple(int(x) for x in pair.split(":")) for pair in args.swaps.split(",") if pair}
    if outside := only - {(r, k) for r in removed for k in kept}:
        raise SystemExit(f"--swaps {sorted(outside)} are not swaps of {removed} with the candidates {kept}")
    for r in removed:
        for k in kept:
            if only and (r, k) not in only:
                continue
            swap = base.clone()
            swap[r], swap[k] = True, False
            s = scores(swap)
            rows.append({"restore": r, "remove": k, "valid_ppl": s["valid_ppl"],
                         **{f"d_{name}": s[name] - ref[name] for name in sources},
                         **{f"dkl_{name}": s[f"kl_{name}"] - ref[f"kl_{name}"] for name in dense_logp}})
        if not only or any(pair[0] == r for pair in only):
            print(f"restore {r}: done ({time.perf_counter() - t0:.0f} s)", flush=True)

    def spearman(a, b):
        ra = torch.tensor(a).argsort().argsort().double()
        rb = torch.tensor(b).argsort().argsort().double()
        return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])

    summary = []
    objectives = [(name, f"d_{name}") for name in sources] + [(f"{name} (KL)", f"dkl_{name}") for name in dense_logp]
    for name, col in objectives:
        best = min(rows, key=lambda x: x[col])
        summary.append({"calibration": name, "spearman_vs_valid": spearman([x[col] for x in rows],
                                                                              [x["valid_ppl"] for x in rows]),
                        "swaps_better_on_calib": sum(x[col] < 0 for x in rows),
                        "better_on_calib_and_valid": sum(x[col] < 0 and x["valid_ppl"] < ref["valid_ppl"] for x in rows),
                        "calib_best_swap": f"{best['restore']}<->{best['remove']}",
                        "its_valid_ppl": best["valid_ppl"]})
    rows.sort(key=lambda x: x["valid_ppl"])
    print(f"block influence removes {removed}; validation ppl {ref['valid_ppl']:.2f}; "
          f"{sum(x['valid_ppl'] < ref['valid_ppl'] for x in rows)} of {len(rows)} swaps are better on validation")
    print(table(rows[:8], ["restore", "remove", "valid_ppl"] + [c for c in rows[0] if c.startswith("d")]))
    print(table(summary, list(summary[0])))
    save(args.tag, {"command": command_line("layer_swaps.py", sys.argv[1:]), "args": vars(args), "removed": removed,
                    "reference": ref, "summary": summary, "swaps": rows, "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
