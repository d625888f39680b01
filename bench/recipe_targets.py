"""The default recipe against the metric methods under issue 18's protocol, in one resumable command.

For every calibration source and seed (`--calibs wiki-sample:3,c4:2` = seeds 0-2 of the Wikipedia
sample, 0-1 of C4), every --sparsities and every run kind:
- each `--variants` entry: a PG run of a recipe, `features` (the default) or `paper`, optionally with
  settings overridden after `+` (`features+pg.reconstruct=lsq`: PG scored by least squares);
- each `--metrics` method at each `--metric-reconstruct` mode (wanda-sp uniform, flap global),
each with its recipe's units (`features`: channel,head,layer, the layers first; `paper`: channel,head) unless
--units names them for every run, the run is `pgprune.prune()` itself (the `pgprune prune` pipeline:
calibration windows of the source, held-out calibration text for PG's tracking, nothing from the evaluation
sets) into
--work/CALIB_sSEED_SPARSITY_LABEL, and its exported model is then scored once under DESIGN.md's protocol
(seqlen 128): WikiText-2 test (first --wikitext-tokens; 0 = all) and the natural-text measure, the
geometric mean of the perplexities of the shared C4 sample's validation documents and the Wikipedia
sample's test split (first --natural-tokens each). A finished cell (run.json + scores.json) is reused
(re-scored, not re-run, when it was scored under another protocol) and a PG cell that was stopped resumes
from its checkpoint or its auto start (`prune(..., resume=True)`; one started with other settings starts
again), so an interrupted sweep continues where it stopped; add seeds, sparsities or a protocol to the same --work.

Summary per (calibration source, sparsity): for every run kind the median over seeds (and min / max),
the best metric method at its best reconstruction (lowest median), and each PG variant's ratio to it
(median, and the worst seed against that metric's median): the targets' "<= 0.8x, no seed above".

    python bench/recipe_targets.py --data-dir /work/shared/data                         # the full sweep
    python bench/recipe_targets.py --calibs c4:1 --variants features,paper --metrics '' \\
        --wikitext-tokens 0 --tag paper_setting                                         # the paper's setting
    python bench/recipe_targets.py --calibs wiki-sample:1 --sparsities 0.3 --units layer --variants '' \\
        --metrics block-influence --metric-reconstruct bias,lsq --tag layers            # layers: bias vs lsq

Writes bench/results/TAG.json (after every cell) and prints the tables. A GPU: --device cuda.
`--score NAME=MODEL_DIR,...` only scores saved models under the protocol (e.g. `make demo`'s runs/demo/model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, command_line, machine, table  # noqa: E402
from pgprune import atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_calibs(text: str) -> list[tuple[str, int]]:
    """'wiki-sample:3,c4:2' -> [(wiki-sample, 0), (wiki-sample, 1), (wiki-sample, 2), (c4, 0), (c4, 1)];
    'wiki-sample@1' -> [(wiki-sample, 1)] (one seed alone, e.g. to add to cells of an earlier run)."""
    cells = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "@" in part:
            name, _, seed = part.partition("@")
            cells.append((name, int(seed)))
            continue
        name, _, seeds = part.partition(":")
        cells += [(name, s) for s in range(int(seeds or 1))]
    return cells


def merged_cells(paths: list[str], record: dict) -> list[dict]:
    """The cells of earlier results files measured under the same model and protocol (refused otherwise)."""
    cells = []
    for path in paths:
        earlier = json.loads(Path(path).read_text())
        for key in ("model", "protocol"):
            if earlier.get(key) != record[key]:
                raise SystemExit(f"--merge {path}: its {key} differs from this run's "
                                 f"({earlier.get(key)} != {record[key]})")
        cells += [dict(c, merged_from=Path(path).name) for c in earlier["cells"]]
    return cells


def parse_variant(text: str) -> tuple[str, dict]:
    """'features+pg.reconstruct=lsq+pg.lr=0.01' -> ('features', {'pg.reconstruct': 'lsq', 'pg.lr': 0.01})."""
    recipe, *overrides = text.split("+")
    values = {}
    for o in overrides:
        key, _, raw = o.partition("=")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return recipe, values


def protocol(args) -> dict:
    """How a model is scored (DESIGN.md's protocol, seqlen 128); stored with every score so that cached
    scores are reused only under the same protocol."""
    return {"seqlen": 128, "wikitext2": {"split": "test", "max_tokens": args.wikitext_tokens or None},
            "natural": {"sets": {"c4": "validation documents", "wiki-sample": "test"},
                        "max_tokens": args.natural_tokens or None, "mean": "geometric"}}


def score(model_path: str, args) -> dict:
    """{dataset: perplexity} of a saved model under the protocol (+ 'natural')."""
    from pgprune.models.load import load_model

    model, tok = load_model(model_path, dtype=args.dtype, device=args.device)
    return score_model(model, tok, args)


def score_model(model, tok, args) -> dict:
    """`score` of a model in memory."""
    from pgprune.evaluate.perplexity import evaluate_perplexity, natural_text_perplexities, natural_text_tokens

    out = {"wikitext2": evaluate_perplexity(model, tok, "wikitext2", "test", seqlen=128,
                                            max_tokens=args.wikitext_tokens or None, data_dir=args.data_dir).ppl}
    out.update(natural_text_perplexities(model, natural_text_tokens(tok, args.data_dir),
                                         max_tokens=args.natural_tokens or None))
    return out


def scored(folder: Path, args) -> dict:
    """A cell's scores with the protocol they were taken under (always stored together)."""
    return {"protocol": protocol(args), "scores": score(str(folder / "model"), args)}


def same_run(stored: dict, wanted) -> bool:
    """Whether a cell run with the `stored` settings is the run `wanted` (a RunSettings) asks for. Options
    added since take their defaults, `auto` refit inputs and allocations count as what they resolve to,
    and a metric method's cell ignores PG's settings: none of these change the model it made."""
    from pgprune.config import RunSettings
    from pgprune.errors import ConfigError
    from pgprune.pruning import start_allocation
    from pgprune.reconstruction import may_use_sequential_inputs

    try:
        runs = [RunSettings.from_dict(stored), wanted]
    except ConfigError:  # settings of another version that cannot be read: not the same run
        return False
    dicts = []
    for settings in runs:
        d = settings.to_dict()
        if d["reconstruct_inputs"] == "auto":
            d["reconstruct_inputs"] = "sequential" if may_use_sequential_inputs("auto", settings.kinds) else "dense"
        d["allocation"] = start_allocation(settings)
        d["remove_layers"] = settings.layers_first or 0  # auto where it cannot apply removes none, as 0
        if d["method"] != "pg":
            d.pop("pg")
        dicts.append(d)
    return dicts[0] == dicts[1]


def cell_settings(recipe: str, overrides: dict, args):
    """One cell's RunSettings: `recipe` with the bench's model, data, tracking and execution, then `overrides`."""
    from pgprune.config import RunSettings

    return RunSettings.from_recipe(recipe, {
        "model": args.model, "data.data_dir": args.data_dir, "eval.datasets": "wikitext2",
        "eval.max_tokens": args.progress_tokens, "execution.dtype": args.dtype, "execution.device": args.device,
        **overrides})


def run_cell(label: str, settings, folder: Path, args) -> dict:
    """prune() with `settings` into `folder` (unless finished) and its scores (cached in scores.json)."""
    from pgprune import run_folder
    from pgprune.errors import CheckpointError
    from pgprune.pruning import prune

    scores_file = folder / "scores.json"
    if scores_file.is_file() and (folder / run_folder.RUN_FILE).is_file():
        cell = json.loads(scores_file.read_text())
        if same_run(cell.get("settings") or {}, settings):
            if cell.get("protocol") != protocol(args):  # the same run, scored another way: score it again
                print(f"{label}: {folder} was scored under another protocol; scoring it again", flush=True)
                cell.update(scored(folder, args))
                atomic.write_json(scores_file, cell)
            return cell
        print(f"{label}: {folder} was run with other settings; running it again", flush=True)
    t0 = time.perf_counter()
    resumed = run_folder.resumable(folder)  # an interrupted PG run goes on from its checkpoint (or its chosen start)
    try:
        record = prune(settings, folder, resume=resumed, overwrite=True, progress=not args.quiet)
    except CheckpointError as e:  # started with other settings (or unreadable): start it afresh
        print(f"{label}: {e}; starting it again", flush=True)
        resumed = False
        record = prune(settings, folder, overwrite=True, progress=not args.quiet)
    cell = {"label": label, "settings": record["settings"], "execution": record.get("execution"),
            "seconds": time.perf_counter() - t0,
            "resumed": resumed, "sparsity": record["masks"].get("sparsity"), **scored(folder, args)}
    if "pg" in record:  # what the run tracked and chose, so the JSON stands without the run folder
        history, _ = run_folder.read_metrics(folder)
        cell.update(pg_seconds=record["pg"].get("seconds"), selected_step=record["pg"].get("selected_step"),
                    tracking=[[r["step"], r["hard_ppl"]] for r in history if r.get("hard_ppl") is not None])
        if "start_choice" in record:
            cell["start_choice"] = record["start_choice"]
    atomic.write_json(scores_file, cell)
    return cell


def summarize(cells: list[dict]) -> list[dict]:
    """Rows per (calib, sparsity, run); a PG run (by its settings, so merged variants count too) is compared
    with the best metric method, never with another PG run."""
    rows = []
    groups = sorted({(c["calib"], c["sparsity_target"]) for c in cells})
    for calib, sparsity in groups:
        mine = [c for c in cells if c["calib"] == calib and c["sparsity_target"] == sparsity]
        by_label: dict[str, list[dict]] = {}
        for c in mine:
            by_label.setdefault(c["label"], []).append(c)
        med = {lab: {k: statistics.median(c["scores"][k] for c in cs) for k in ("wikitext2", "natural")}
               for lab, cs in by_label.items()}
        variants = {lab for lab, cs in by_label.items() if cs[0]["settings"]["method"] == "pg"}
        metrics = [lab for lab in by_label if lab not in variants]
        for lab, cs in by_label.items():
            row = {"calib": calib, "sparsity": sparsity, "run": lab, "seeds": len(cs),
                   "wikitext2": med[lab]["wikitext2"], "wt2_min": min(c["scores"]["wikitext2"] for c in cs),
                   "wt2_max": max(c["scores"]["wikitext2"] for c in cs), "natural": med[lab]["natural"],
                   "nat_max": max(c["scores"]["natural"] for c in cs)}
            if lab in variants and metrics:
                for key, short in (("wikitext2", "wt2"), ("natural", "nat")):
                    best = min(metrics, key=lambda m: med[m][key])
                    worst = max(c["scores"][key] for c in cs)
                    row[f"{short}_best_metric"] = best
                    row[f"{short}_vs_best"] = med[lab][key] / med[best][key]
                    row[f"{short}_worst_seed_vs_best"] = worst / med[best][key]
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibs", default="wiki-sample:3,c4:2",
                   help="SOURCE:SEEDS (seeds 0 .. SEEDS-1) or SOURCE@SEED, comma-separated")
    p.add_argument("--sparsities", default="0.3,0.5")
    p.add_argument("--units", default=None,
                   help="unit kinds of every run (layer: block influence); default: the recipe's")
    p.add_argument("--variants", default="features", help="PG runs: RECIPE[+setting=value...], comma-separated")
    p.add_argument("--metrics", default="wanda-sp,flap", help="metric methods ('' for none)")
    p.add_argument("--metric-reconstruct", default="lsq", help="their reconstruction(s): none, bias, lsq")
    p.add_argument("--wikitext-tokens", type=int, default=65536, help="first N WikiText-2 test tokens (0: all)")
    p.add_argument("--natural-tokens", type=int, default=32768, help="first N tokens of each natural-text set")
    p.add_argument("--progress-tokens", type=int, default=4096,
                   help="the runs' own printed perplexities (not the scores) use this many tokens")
    p.add_argument("--dtype", default="fp32",
                   help="fp32 by default: 'auto' is bf16 on CPUs with AVX512-BF16 and fp32 elsewhere, and seeds "
                        "run on different machines must be comparable")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--work", default=str(REPO / "runs" / "recipe_targets"))
    p.add_argument("--tag", default="recipe_targets")
    p.add_argument("--merge", default="",
                   help="comma list of earlier results files whose cells join the summary (same model and protocol; "
                        "a cell measured here again replaces theirs)")
    p.add_argument("--score", default="", help="NAME=MODEL_DIR,...: only score these saved models (no runs)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    modes = [m.strip() for m in args.metric_reconstruct.split(",") if m.strip()]
    kinds = [(v, *parse_variant(v)) for v in variants]
    kinds += [(f"{m}+{r}", "features", {"method": m, "reconstruct": r}) for m in metrics for r in modes]
    out = RESULTS_DIR / f"{args.tag}.json"
    record = {"command": command_line("recipe_targets.py", sys.argv[1:] if argv is None else argv),
              "machine": machine(), "model": args.model, "protocol": protocol(args), "dense": None, "cells": []}
    dense_file = work / (f"dense_{args.model.replace('/', '_')}_{args.dtype}"
                         f"_wt{args.wikitext_tokens or 'all'}_nat{args.natural_tokens or 'all'}.json")
    if dense_file.is_file():
        record["dense"] = json.loads(dense_file.read_text())
    else:
        record["dense"] = score(args.model, args)
        atomic.write_json(dense_file, record["dense"])
    print(f"dense: {record['dense']}", flush=True)
    if args.score:
        record["scored"] = []
        for item in filter(None, args.score.split(",")):
            name, _, path = item.partition("=")
            record["scored"].append({"name": name, "model": path, "scores": score(path, args)})
            atomic.write_json(out, record)
        print(table([{"name": r["name"], **r["scores"]} for r in record["scored"]],
                    ["name", "wikitext2", "c4", "wiki-sample", "natural"]))
        print(f"wrote {out}")
        return 0
    earlier = merged_cells([m for m in args.merge.split(",") if m], record)
    for calib, seed in parse_calibs(args.calibs):
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            for label, recipe, overrides in kinds:
                given = {"data.calib": calib, "seed": seed, "sparsity": sparsity,
                         **({"units": args.units} if args.units else {}), **overrides}
                settings = cell_settings(recipe, given, args)
                units = "" if settings.units == "channel,head" else "_" + settings.units.replace(",", "-")
                folder = work / f"{calib}_s{seed}_{sparsity:g}{units}_{label.replace('=', '-')}"
                cell = run_cell(label, settings, folder, args)
                cell.update(calib=calib, seed=seed, sparsity_target=sparsity, folder=str(folder))
                record["cells"].append(cell)
                key = (calib, seed, sparsity, label)
                earlier = [c for c in earlier if (c["calib"], c["seed"], c["sparsity_target"], c["label"]) != key]
                print(f"{calib} seed {seed} {sparsity:g} {label}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in cell["scores"].items()), flush=True)
                record["summary"] = summarize(earlier + record["cells"])
                record["merged_cells"] = earlier
                atomic.write_json(out, record)
    print(table(record["summary"], ["calib", "sparsity", "run", "seeds", "wikitext2", "wt2_min", "wt2_max", "natural",
                                    "nat_max", "wt2_vs_best", "wt2_worst_seed_vs_best", "nat_vs_best",
                                    "nat_worst_seed_vs_best"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
