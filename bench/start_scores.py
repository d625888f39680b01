"""Score a finished run's auto start again, for other methods: what `--init auto --remove-layers auto` would have
read for them at the run's chosen layer count, without redoing its search or its PG loop.

For each run folder (a `pgprune prune` PG run with `--remove-layers auto`, e.g. a bench/recipe_targets.py cell):
its settings from run.json, the same calibration windows and held-out tracking text, and for every --methods
entry that method's metric mask with the run's chosen count of layers removed first (or each of --counts), refit
as the export refits (the run's --reconstruct) and scored on the tracking text: the number the run's own search
scores its candidates by (`pruning.exported_ppl`). A method the run itself scored at that count reproduces its
stored value (printed beside it), which checks the setup. `--swaps K` also scores the layer sets one swap away
from block influence's choice (a removed layer kept instead of one of the K kept layers of lowest influence, the
channels / heads allocated again): whether the start's layers are the ones held-out text prefers.

    python bench/start_scores.py runs/recipe_targets_obs/wiki-sample_s0_0.3_channel-head-layer_features+remove_layers-auto --methods obs,flap --data-dir ../shared/data --tag start_scores_30

Writes bench/results/TAG.json (after every run) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, command_line, machine, table  # noqa: E402
from pgprune import atomic  # noqa: E402


def stored_score(choice: dict, label: str, count: int) -> float | None:
    """The score the run's own search gave `label` at `count` layers first, where it scored one."""
    layers = choice.get("remove_layers") or {}
    if count == 0:
        return choice["candidates"].get(label)
    if layers.get("swept") == label or (not layers.get("swept") and choice.get("chosen") == label):
        value = (layers.get("candidates") or {}).get(str(count))
        if value is not None:
            return value
    return (layers.get("starts") or {}).get(label) if layers.get("chosen") == count else None


def score_run(folder: Path, methods: list[str], counts: list[int] | None, args) -> list[dict]:
    from pgprune.config import RunSettings
    from pgprune.data import get_calibration_windows, get_eval_tokens
    from pgprune.metrics.pipeline import remove_layers_first, resolve_allocation
    from pgprune.pruning import METRIC_NSAMPLES, exported_ppl, load_session, start_metric

    record = json.loads((folder / "run.json").read_text())
    choice = record.get("start_choice") or {}
    if "remove_layers" not in choice:
        raise SystemExit(f"{folder}: run.json has no start_choice.remove_layers (not a --remove-layers auto run)")
    stored = record["settings"]
    if args.data_dir is not None:  # the run's own folder otherwise
        stored = dict(stored, data={**stored["data"], "data_dir": args.data_dir})
    settings = RunSettings.from_dict(stored)
    counts = [choice["remove_layers"]["chosen"]] if counts is None else counts
    session = load_session(settings)
    data = settings.data
    calib = get_calibration_windows(session.tokenizer, data.calib, settings.pool_size(1), data.seqlen,
                                    seed=settings.seed, data_dir=data.data_dir)[:METRIC_NSAMPLES]
    track = get_eval_tokens(session.tokenizer, settings.track_dataset, settings.track_split, data.data_dir)
    quiet = args.quiet

    def scored(label: str, n: int, metric, **row) -> dict:
        value = exported_ppl(session, calib, metric.masks, track, progress=not quiet)
        return {"run": folder.name, "calib": data.calib, "seed": settings.seed, "sparsity": settings.sparsity,
                "start": label, "layers_first": n, "layers": metric.info["remove_layers"]["layers"],
                "heldout": value, "stored": stored_score(choice, label, n),
                "run_chose": f"{choice['chosen']}, {choice['remove_layers']['chosen']} layer(s)", **row}

    rows = []
    for method in methods:
        allocation = resolve_allocation(method, "auto", settings.metric_kinds)
        label = f"{method} ({allocation})"
        unpruned = start_metric(session, calib, method, allocation, 0, progress=not quiet)
        for n in counts:  # each count re-allocates the same scores, as the run's own search does
            metric = remove_layers_first(unpruned, n, session.costs) if n else unpruned
            rows.append(scored(label, n, metric))
            print(f"{folder.name}: {label}, {n} layer(s) first: {rows[-1]['heldout']:.3f} (the run's search: "
                  f"{rows[-1]['stored']})", flush=True)
            for restored, dropped in layer_swaps(metric.layer_influence, metric.info["remove_layers"]["layers"],
                                                 args.swaps):
                swapped = remove_layers_first(swap_influence(metric, restored, dropped), n, session.costs)
                rows.append(scored(f"{label}, {restored} kept, {dropped} removed", n, swapped, stored=None))
                print(f"{folder.name}: {label}, layers {rows[-1]['layers']} removed: {rows[-1]['heldout']:.3f}",
                      flush=True)
    return rows


def layer_swaps(influence, removed: list[int], n_kept: int) -> list[tuple[int, int]]:
    """(removed layer to restore, kept layer to remove) for every removed layer and each of the `n_kept` kept
    layers of lowest block influence: the layer sets one swap from the block-influence choice."""
    from pgprune.metrics.allocation import layer_order

    kept = [i for i in layer_order(influence).tolist() if i not in removed][:n_kept]
    return [(r, k) for r in removed for k in kept]


def swap_influence(metric, restored: int, dropped: int):
    """`metric` with the block influence of two layers exchanged, so that `remove_layers_first` removes `dropped`
    in place of `restored` and allocates the channels / heads again."""
    import dataclasses

    influence = metric.layer_influence.clone()
    influence[[restored, dropped]] = influence[[dropped, restored]]
    return dataclasses.replace(metric, layer_influence=influence)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished PG run folders with --remove-layers auto")
    p.add_argument("--methods", default="wanda-sp,flap,obs", help="metric methods to score (--init auto's starts)")
    p.add_argument("--counts", default=None,
                   help="layers removed first, comma-separated (default: the run's chosen count)")
    p.add_argument("--swaps", type=int, default=0, metavar="K",
                   help="also score every layer set one swap away: a removed layer kept instead of one of the K "
                        "kept layers of lowest block influence (channels / heads allocated again)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tag", default="start_scores")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    counts = None if args.counts is None else [int(n) for n in args.counts.split(",")]
    out = RESULTS_DIR / f"{args.tag}.json"
    record = {"command": command_line("start_scores.py", sys.argv[1:] if argv is None else argv),
              "machine": machine(), "rows": []}
    for folder in args.runs:
        record["rows"] += score_run(Path(folder), methods, counts, args)
        atomic.write_json(out, record)
    print(table(record["rows"], ["run", "start", "layers_first", "heldout", "stored", "run_chose"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
