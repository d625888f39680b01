"""Zero-shot accuracy on every task that has local data (lm-eval prompts/metrics), for one model or
several side by side (dense and pruned folders).

    python bench/zeroshot.py [--model smollm2-135m [--model runs/pg30/model ...]] [--limit 20] [--tasks all]

Each task runs on its own so its time is recorded; `--limit N` takes the first N examples of each
task (the full sets take hours on two shared CPU cores). Prints a table and writes
bench/results/zeroshot.json in the pgprune.eval/1 schema (docs/evaluation.md), with the limit,
the per-task seconds and the machine (including its load average: CPU timings here are shared).
With several models the file is written after each one, and a model it already holds under the same
tasks, limit, batch size and dtype is reused, not evaluated again (an interrupted comparison goes on
where it stopped).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, save, table  # noqa: E402

from pgprune.errors import DataError  # noqa: E402
from pgprune.evaluate.record import evaluation_record  # noqa: E402
from pgprune.evaluate.zeroshot import (ZeroShotResult, evaluate_zeroshot, format_zeroshot_table,  # noqa: E402
                                       parse_tasks)
from pgprune.models.load import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None,
                    help="model name or pruned folder; repeat to compare several (default smollm2-135m)")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--limit", type=int, default=20,
                    help="first N examples per task (default 20: about 10 minutes on 2 busy CPU cores); "
                         "0 = all examples")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default="zeroshot", help="results file name under bench/results/")
    args = ap.parse_args()
    limit = args.limit or None
    models = args.model or ["smollm2-135m"]
    command = "python " + " ".join(sys.argv)
    if len(models) == 1:
        save(args.name, evaluate_one(models[0], args, limit))
        return
    done = finished_records(RESULTS_DIR / f"{args.name}.json", args, limit)
    records = {}
    for name in models:
        if name in done:
            print(f"{name}: reused from {args.name}.json (same tasks, limit, batch size and dtype)", flush=True)
            records[name] = done[name]
        else:
            records[name] = evaluate_one(name, args, limit)
        save(args.name, {"command": command, "models": records, "complete": len(records) == len(models)})
    print(comparison_table(records))


def finished_records(path: Path, args, limit) -> dict:
    """{model: record} of an earlier comparison's file whose records match these settings."""
    import json

    if not path.is_file():
        return {}
    try:
        models = json.loads(path.read_text()).get("models") or {}
    except (json.JSONDecodeError, AttributeError):
        return {}
    wanted = {"requested": parse_tasks(args.tasks), "limit": limit, "batch_size": args.batch_size}
    return {name: r for name, r in models.items() if r.get("extra", {}).get("dtype") == args.dtype
            and all((r.get("zeroshot") or {}).get(k) == v for k, v in wanted.items())}


def evaluate_one(model_name: str, args, limit) -> dict:
    t0 = time.perf_counter()
    model, tok = load_model(model_name, dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - t0
    names = parse_tasks(args.tasks)
    parts, skipped, seconds = {}, {}, {}
    for name in names:
        t = time.perf_counter()
        try:
            r = evaluate_zeroshot(model, tok, [name], data_dir=args.data_dir, limit=limit,
                                  batch_size=args.batch_size)
        except DataError as e:
            skipped[name] = str(e)
            continue
        seconds[name] = round(time.perf_counter() - t, 1)
        parts[name] = r
        res = r.tasks[name]
        print(f"{model_name} {name}: acc {res.acc:.4f} (n={res.n}, {seconds[name]} s)", flush=True)
    any_part = next(iter(parts.values()))
    merged = ZeroShotResult(tasks={n: p.tasks[n] for n, p in parts.items()}, skipped=skipped, limit=limit,
                            batch_size=args.batch_size, data_dir=any_part.data_dir,
                            seconds=sum(p.seconds for p in parts.values()),
                            lm_eval_version=any_part.lm_eval_version, requested=names)
    title = f"{model_name} ({args.dtype}, {args.device}), first {limit or 'all'} examples per task"
    print(format_zeroshot_table(merged, title=title))
    print("seconds per task: " + ", ".join(f"{k} {v}" for k, v in seconds.items()))
    return evaluation_record(model_name, zeroshot=merged.to_dict(), extra={
        "command": "python " + " ".join(sys.argv), "dtype": args.dtype, "device": args.device,
        "seconds_per_task": seconds, "model_load_seconds": round(load_s, 1)})


def comparison_table(records: dict) -> str:
    """Tasks as rows, models as columns: acc in % (acc_norm in brackets where the task has it)."""
    names = list(records)
    tasks = records[names[0]]["zeroshot"]["requested"]
    rows = []
    for task in tasks:
        row = {"task": task}
        for n in names:
            r = records[n]["zeroshot"]["tasks"].get(task)
            row[n] = "skipped" if r is None else (f"{100 * r['acc']:.1f}" + (
                f" ({100 * r['acc_norm']:.1f})" if r["acc_norm"] is not None else ""))
        rows.append(row)
    avg = {"task": "average acc"}
    for n in names:
        a = records[n]["zeroshot"]["average"]
        avg[n] = f"{100 * a['value']:.1f} over {len(a['tasks'])}"
    return table(rows + [avg], ["task"] + names)

if __name__ == "__main__":
    main()
