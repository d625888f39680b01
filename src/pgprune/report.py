"""Run reports: `write_report(run_dir)` turns a run folder into report.md, report.json and plots.

A run folder is what `pgprune.prune` (CLI `pgprune prune ... --out DIR`) writes; its files and
their readers are pgprune.run_folder's. The report reads only run.json, metrics.jsonl,
probabilities.pt, masks.safetensors and the exported model's config (no model weights are loaded), and writes into the same folder,
each file atomically:

    report.md           model, method, sparsity, perplexity table, PG settings, plots embedded
    report.json         the numbers the markdown shows, plus the plot files and their panel titles
    structure.png       kept KV heads / MLP channels per layer, dense vs pruned
    probabilities.png   histograms of the final keep-probabilities per kind (pg only)
    training.png        loss and baseline, hard-mask perplexity, entropy vs forward passes (pg only)

Plots use matplotlib's Agg canvas directly (no pyplot), so the caller's backend is untouched.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from pgprune import atomic
from pgprune.errors import ConfigError
from pgprune.evaluate.perplexity import natural_text_ppl

from pgprune.run_folder import (METRICS_FILE, MODEL_DIR, PROBS_FILE, REPORT_JSON, REPORT_MD, read_metrics,
                                read_probabilities, read_record)

SCHEMA = "pgprune.report/1"

STAGES = {
    "dense": "dense model",
    "init": "PG start: the initial (metric) mask, gated",
    "gated": "final mask, gated (weights untouched; PG: scored as its loop scored masks)",
    "pruned": "exported pruned model (after the reconstruction and surgery)",
}
KIND_LABEL = {"head": "KV-head groups", "channel": "MLP channels", "attn": "attention blocks",
              "mlp": "MLP blocks", "layer": "layers"}


def write_report(run_dir: str | Path, *, inspect_export: bool = True) -> dict:
    """Write report.md, report.json and PNG plots into `run_dir`; returns the report.json dict.

    `inspect_export`: also read the exported model's config (no weights) and check that its
    per-layer widths and parameter counts match the mask summary in run.json.
    """
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    plt = require_matplotlib()
    pg = record["settings"]["method"] == "pg" or "pg" in record
    steps, bad_lines = read_metrics(run_dir)
    probs, hard = read_probabilities(run_dir)
    summary = _summary(record, run_dir, steps, bad_lines)
    export = _check_export(run_dir, record) if inspect_export else None
    if export is not None:
        summary["export_check"] = export

    plots: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    plots["structure"] = _plot_structure(plt, run_dir, summary)
    if not pg:
        why = f"method {summary['method']!r} is a metric method: no policy-gradient run"
        skipped["probabilities"] = skipped["training"] = why
    else:
        if probs:
            plots["probabilities"] = _plot_probabilities(plt, run_dir, probs, hard, summary)
        else:
            skipped["probabilities"] = f"{PROBS_FILE} is missing"
        if any(r.get("loss") is not None or r.get("hard_ppl") is not None for r in steps):
            plots["training"] = _plot_training(plt, run_dir, steps)
        else:
            skipped["training"] = f"{METRICS_FILE} is missing or holds no step records"
    summary["plots"] = plots
    summary["skipped_plots"] = skipped
    atomic.write_text(run_dir / REPORT_MD, _markdown(summary))
    atomic.write_json(run_dir / REPORT_JSON, summary)
    return summary


def _dense_widths(record: dict) -> dict[str, list[int]]:
    """Per-layer KV heads / channels of the model the run started from. A uniform dense model
    is described by run.json; an input that was itself a pruned folder carries per-layer widths
    in its config (pgprune record), which win when the layer count matches."""
    desc = record["model"]
    L = int(desc["num_layers"])
    widths = {"head": [int(desc["num_kv_heads"])] * L, "channel": [int(desc["intermediate_size"])] * L}
    cfg = Path(str(record["settings"].get("model", ""))) / "config.json"
    if not cfg.is_file():
        return widths
    from pgprune.models.pruned_modeling import CONFIG_KEY, StructureError, StructureRecord

    try:
        structure = json.loads(cfg.read_text()).get(CONFIG_KEY)
        layers = StructureRecord.from_dict(structure).layers if structure else None
    except (OSError, json.JSONDecodeError, StructureError):
        layers = None  # an unreadable input config only costs the plot its per-layer dense widths
    if layers and len(layers) == L:
        widths = {"head": [ls.num_key_value_heads for ls in layers],
                  "channel": [ls.intermediate_size for ls in layers]}
    return widths


def _summary(record: dict, run_dir: Path, steps: list[dict], bad_lines: int) -> dict:
    o, m, desc = record["settings"], record["masks"], record["model"]
    proto = record.get("perplexity_protocol", {})
    dense = _dense_widths(record)
    out = {
        "schema": SCHEMA,
        "run_dir": str(run_dir),
        "model": {"name": o.get("model"), **desc},
        "method": o["method"],
        "recipe": o.get("recipe"),
        "units": m.get("kinds", []),
        "sparsity": {
            "target": o.get("sparsity"),
            "prunable": m["sparsity"],
            "total": m["total_sparsity"],
            "prunable_params": m["prunable_params"],
            "kept_prunable_params": m["kept_prunable_params"],
            "total_params": m["total_params"],
            "kept_total_params": m["kept_total_params"],
            "definition": "fraction of the dense model's prunable parameters (inside the decoder layers: "
                          "attention, MLP, norms) removed; 'total' = fraction of all parameters removed",
        },
        "layers": {
            "kept": m.get("layers_kept"),
            "dense_kv_heads": dense["head"], "kv_heads": m["kv_heads_per_layer"],
            "dense_channels": dense["channel"], "channels": m["channels_per_layer"],
        },
        "perplexity": record["perplexity"],
        "natural_text": {st: natural_text_ppl(v) for st, v in record["perplexity"].items()},
        "perplexity_protocol": {"seqlen": proto.get("seqlen", o["eval"]["seqlen"]),
                                "max_tokens": proto.get("max_tokens", o["eval"]["max_tokens"]),
                                "split": proto.get("split", "test"),
                                "window_caps": _window_caps(record["perplexity"])},
        "calibration": {"source": o["data"]["calib"], "nsamples": o["data"]["nsamples"], "seqlen": o["data"]["seqlen"]},
        "reconstruction": record.get("reconstruction"),
        "wall_seconds": record.get("seconds"),
        "machine": record.get("machine", {}),
        "pg": None,
        "start_choice": record.get("start_choice"),
    }
    if "metric" in record:
        out["metric"] = {k: record["metric"].get(k) for k in ("method", "allocation", "sparsity", "removed_units")}
    if "pg" in record:
        pg, cfg = record["pg"], o["pg"]
        tracked = [r for r in steps if r.get("hard_ppl") is not None]
        last = steps[-1] if steps else {}
        out["pg"] = {
            "allocation": o.get("allocation"), "seed": o.get("seed"),
            **{k: cfg.get(k) for k in ("policy", "init", "init_mapping", "init_scale", "reconstruct", "estimator",
                                      "select", "steps", "k", "batch_size", "lr", "lr_schedule", "eval_every",
                                      "control_variate", "projection", "per_kind_budget", "floor", "baseline_window")},
            "forward": record.get("execution", {}).get("forward"),
            "sparsity": pg.get("start_sparsity"),
            "selected_step": pg.get("selected_step"),
            "steps_logged": sum(1 for r in steps if r.get("step", 0) > 0),
            "forward_passes": last.get("forward_passes"),
            "skipped_steps": pg.get("skipped_steps"),
            "skipped_in_log": [r["step"] for r in steps if r.get("skipped")],
            "unreadable_log_lines": bad_lines,
            "seconds": pg.get("seconds"),
            "resumed_at": pg.get("resumed_at"),
            "track": pg.get("track"),
            "hard_ppl_start": tracked[0]["hard_ppl"] if tracked and tracked[0].get("step") == 0 else None,
            "hard_ppl_best": min((r["hard_ppl"] for r in tracked if _finite(r["hard_ppl"])), default=None),
            "hard_ppl_final": tracked[-1]["hard_ppl"] if tracked else None,
            "hard_ppl_selected": next((r["hard_ppl"] for r in tracked if r.get("step") == pg.get("selected_step")),
                                      None),
            "entropy_final": next((r["entropy"] for r in reversed(steps) if r.get("entropy") is not None), None),
        }
    return out


def _window_caps(ppl: dict) -> dict[str, int]:
    """Datasets whose evaluation recipe caps the windows (C4: 256), as prune() applies them."""
    from pgprune.data import SOURCES

    names = {d for stage in ppl.values() for d in stage}
    return {n: SOURCES[n].eval_max_windows for n in sorted(names)
            if n in SOURCES and SOURCES[n].eval_max_windows is not None}


def _check_export(run_dir: Path, record: dict) -> dict | None:
    """Compare the exported model's structure (config only) with the masks summary."""
    folder = run_dir / MODEL_DIR
    if not (folder / "config.json").is_file():
        return {"ok": None, "note": f"no exported model in {folder}"}
    from pgprune.errors import PgpruneError
    from pgprune.export import inspect_model

    try:
        s = inspect_model(str(folder))
    except (PgpruneError, OSError, ValueError, KeyError) as e:
        return {"ok": None, "note": f"could not inspect {folder}: {type(e).__name__}: {e}"}
    m = record["masks"]
    L = len(m["kv_heads_per_layer"])
    heads, chans = [0] * L, [0] * L
    for r in s["layers"]:
        heads[r["source_layer"]], chans[r["source_layer"]] = r["kv_heads"], r["channels"]
    problems = []
    expected = m["kept_prunable_params"] + record.get("bias_params_added", 0)  # + compensation biases
    if s["prunable_params"] != expected:
        problems.append(f"prunable params {s['prunable_params']} in the export, {expected} predicted by the masks"
                        f" and the {record.get('bias_params_added', 0)} compensation bias parameters")
    if heads != list(m["kv_heads_per_layer"]) or chans != list(m["channels_per_layer"]):
        problems.append("per-layer widths of the export differ from the masks summary")
    return {"ok": not problems, "problems": problems, "prunable_params": s["prunable_params"],
            "total_params": s["total_params"], "sparsity": s["sparsity"], "total_sparsity": s["total_sparsity"],
            "num_layers": s["num_layers"], "kv_heads": heads, "channels": chans}


def _effective(kind: str, raw, layers: dict):
    """What the final model really keeps: a unit of a block or layer that was removed as a whole
    counts as removed (the per-layer counts in run.json are already after nesting)."""
    import torch

    heads = torch.tensor(layers["kv_heads"]) > 0
    chans = torch.tensor(layers["channels"]) > 0
    alive = {"head": heads, "attn": heads, "channel": chans, "mlp": chans, "layer": heads | chans}[kind]
    return raw.bool() & alive[: raw.shape[0], None]


# --- plots -------------------------------------------------------------------------------------
def require_matplotlib():
    """(Figure, FigureCanvasAgg), or a ConfigError that says how to install matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ConfigError("reports need matplotlib: pip install 'pgprune[plot]' (or pip install matplotlib)") from e
    return Figure, FigureCanvasAgg


def _save(plt, fig, path: Path, **info) -> dict:
    """Render `fig` to `path` atomically; the panel titles and y scales are read back off the figure."""
    _, Canvas = plt
    Canvas(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic.write_bytes(path, buf.getvalue())
    axes = [ax for ax in fig.axes if ax.get_title()]
    return {"file": path.name, **info, "axes": [ax.get_title() for ax in axes],
            "yscales": [ax.get_yscale() for ax in axes]}


def _plot_structure(plt, run_dir: Path, s: dict) -> dict:
    from matplotlib.ticker import MaxNLocator

    Figure, _ = plt
    lay = s["layers"]
    panels = [("Kept KV heads per layer", "KV heads", lay["dense_kv_heads"], lay["kv_heads"]),
              ("Kept MLP channels per layer", "channels", lay["dense_channels"], lay["channels"])]
    L = len(lay["kv_heads"])
    fig = Figure(figsize=(max(7.0, 0.28 * L + 3), 6.4), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    x = list(range(L))
    for ax, (title, ylabel, dense, kept) in zip(axes, panels):
        ax.bar([i - 0.2 for i in x], dense, width=0.4, color="#c7c7c7", label="dense")
        ax.bar([i + 0.2 for i in x], kept, width=0.4, color="#1f77b4", label="pruned")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, max(dense + kept + [1]) * 1.15)
        ax.legend(loc="upper right", fontsize="small", ncols=2)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("layer")
    axes[-1].set_xticks(x if L <= 40 else x[:: max(1, L // 20)])
    sp = s["sparsity"]
    fig.suptitle(f"{s['method']}: sparsity {sp['prunable']:.2%} of prunable params ({sp['total']:.2%} of all)")
    return _save(plt, fig, run_dir / "structure.png", heading="Structure: kept units per layer")


def _plot_probabilities(plt, run_dir: Path, probs: dict, hard: dict, s: dict) -> dict:
    import torch
    from matplotlib.ticker import MaxNLocator

    Figure, _ = plt
    dense = {"head": s["layers"]["dense_kv_heads"], "channel": s["layers"]["dense_channels"]}
    kinds = [k for k in ("channel", "head", "attn", "mlp", "layer") if k in probs]
    fig = Figure(figsize=(4.2 * len(kinds) + 0.5, 3.8), layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    counts = {}
    bins = [i / 20 for i in range(21)]
    for ax, kind in zip(axes, kinds):
        p = probs[kind]
        present = torch.ones_like(p, dtype=torch.bool)
        if kind in dense and p.dim() == 2:  # units beyond a layer's real width are padding
            widths = torch.tensor(dense[kind][: p.shape[0]])
            present[: len(widths)] = torch.arange(p.shape[1])[None, :] < widths[:, None]
        if kind in hard:
            keep = _effective(kind, hard[kind], s["layers"])
            kept, removed = p[present & keep], p[present & ~keep]
            counts[kind] = {"kept": kept.numel(), "removed": removed.numel()}
            ax.hist([removed.tolist(), kept.tolist()], bins=bins, stacked=True, color=["#d62728", "#1f77b4"],
                    label=[f"removed ({removed.numel()})", f"kept ({kept.numel()})"])
            ax.legend(loc="upper left", fontsize="small")
        else:
            ax.hist(p[present].tolist(), bins=bins, color="#1f77b4")
            counts[kind] = {"units": int(present.sum())}
        ax.set_title(f"Final keep-probabilities: {KIND_LABEL.get(kind, kind)}", fontsize="medium")
        ax.set_xlabel("keep probability")
        ax.set_ylabel("units")
        ax.set_xlim(0, 1)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(plt, fig, run_dir / "probabilities.png", heading="Final keep-probabilities", units=counts)


def _plot_training(plt, run_dir: Path, steps: list[dict]) -> dict:
    Figure, _ = plt
    fig = Figure(figsize=(8.0, 8.4), layout="constrained")
    ax_loss, ax_ppl, ax_ent = fig.subplots(3, 1, sharex=True)
    loss = [(r["forward_passes"], r["loss"], r.get("baseline")) for r in steps
            if r.get("loss") is not None and "forward_passes" in r]
    base = [(a, c) for a, _, c in loss if c is not None]
    if loss:
        ax_loss.plot([a for a, _, _ in loss], [b for _, b, _ in loss], lw=0.8, color="#1f77b4",
                     label="loss (mean of K)")
        ax_loss.plot([a for a, _ in base], [c for _, c in base], lw=1.4, color="#ff7f0e", label="baseline")
    skipped = [r["forward_passes"] for r in steps if r.get("skipped") and "forward_passes" in r]
    for i, fp in enumerate(skipped):  # steps whose losses were NaN/inf: no update
        ax_loss.axvline(fp, color="#d62728", lw=0.6, ls=":", label="skipped step" if i == 0 else None)
    ax_loss.set_title("Loss and baseline vs forward passes")
    ax_loss.set_ylabel("calibration loss (nats/token)")
    if loss or skipped:
        ax_loss.legend(loc="upper right", fontsize="small")
    ppl = [(r["forward_passes"], r["hard_ppl"]) for r in steps
           if r.get("hard_ppl") is not None and _finite(r["hard_ppl"]) and r["hard_ppl"] > 0]
    if ppl:
        ax_ppl.plot([a for a, _ in ppl], [b for _, b in ppl], marker="o", ms=3, color="#2ca02c")
        ax_ppl.set_yscale("log")
    ax_ppl.set_title("Hard-mask perplexity vs forward passes")
    ax_ppl.set_ylabel("perplexity (log)")
    ent = [(r["forward_passes"], r["entropy"]) for r in steps if r.get("entropy") is not None]
    ax_ent.plot([a for a, _ in ent], [b for _, b in ent], marker="o", ms=3, color="#9467bd")
    ax_ent.axhline(math.log(2), color="#7f7f7f", lw=0.6, ls="--")  # log 2: undecided units
    ax_ent.set_title("Mean keep-probability entropy vs forward passes")
    ax_ent.set_ylabel("entropy (nats)")
    ax_ent.set_xlabel("forward passes (steps x K)")
    points = {"loss": len(loss), "baseline": len(base), "hard_ppl": len(ppl), "entropy": len(ent),
              "skipped": len(skipped)}
    return _save(plt, fig, run_dir / "training.png", heading="Training curves", points=points)


# --- markdown ----------------------------------------------------------------------------------
def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _num(x, fmt: str = ".3f") -> str:
    if x is None:
        return "–"
    if isinstance(x, (int, float)) and not math.isfinite(x):
        return str(x)
    return format(x, fmt)


def _markdown(s: dict) -> str:
    m, sp, proto = s["model"], s["sparsity"], s["perplexity_protocol"]
    lines = [f"# pgprune run: {m['name']} pruned with {s['method']}", ""]
    lines += [f"- **Model**: `{m['name']}` ({m.get('model_type')}, {m.get('num_layers')} layers, hidden "
              f"{m.get('hidden_size')}, {m.get('num_heads')} heads / {m.get('num_kv_heads')} KV heads, "
              f"intermediate {m.get('intermediate_size')}; {m.get('total_params'):,} parameters)",
              f"- **Method**: {s['method']}, units: {', '.join(s['units'])}",
              f"- **Sparsity**: {sp['prunable']:.2%} of prunable parameters (target {_num(sp['target'], '.2%')}); "
              f"{sp['total']:.2%} of all parameters",
              "  - prunable = decoder-layer parameters (attention, MLP, norms); embeddings and LM head excluded",
              f"  - kept {sp['kept_prunable_params']:,} of {sp['prunable_params']:,} prunable, "
              f"{sp['kept_total_params']:,} of {sp['total_params']:,} in all; "
              f"{s['layers']['kept']} of {len(s['layers']['kv_heads'])} layers kept",
              f"- **Calibration**: {s['calibration']['source']}, {s['calibration']['nsamples'] or 'default'} "
              f"windows of {s['calibration']['seqlen']} tokens",
              f"- **Wall time**: {_num(s['wall_seconds'], '.1f')} s for the whole run"
              + (f" (the process that finished it, resumed at PG step {s['pg']['resumed_at']}; the PG time "
                 "below counts every process)" if (s.get("pg") or {}).get("resumed_at") else "")]
    rec = s.get("reconstruction")
    if rec:
        extra = "" if rec.get("mode") != "lsq" else f", {rec.get('inputs')} inputs, damping {rec.get('damp')}"
        lines.append(f"- **Reconstruction**: {rec.get('mode')}{extra}")
    if s.get("metric"):
        mt = s["metric"]
        lines.append(f"- **Metric{' init' if s['pg'] else ''}**: {mt['method']}, {mt['allocation']} allocation, "
                     f"sparsity {_num(mt['sparsity'], '.2%')}, removed units {mt['removed_units']}")
    choice = s.get("start_choice")
    if choice:
        where = choice.get("track") or {}
        on = f"once refit ({choice['reconstruct']}) on {where.get('dataset')} {where.get('split')}"
        layers = choice.get("remove_layers")
        if len(choice["candidates"]) > 1:
            at = " with the layers below removed" if layers and layers["chosen"] else ""
            lines.append(f"- **Start** (`--init auto`): {choice['chosen']}, the lowest {on}{at}; "
                         f"with no layer removed: "
                         + ", ".join(f"{label} {_num(v)}" for label, v in choice["candidates"].items()))
        if layers:
            swept = f" of {layers['swept']}" if "swept" in layers else ""  # runs before 2026-12-06 lack it
            lines.append(f"- **Layers first** (`--remove-layers auto`): {layers['chosen']} removed "
                         f"({', '.join(map(str, layers['layers'])) or 'none'}), the lowest {on}, by count{swept}: "
                         + ", ".join(f"{n} {_num(v)}" for n, v in layers["candidates"].items()))
            if layers["chosen"] and len(layers.get("starts", {})) > 1:
                lines.append(f"  - every start with {layers['chosen']} removed: "
                             + ", ".join(f"{label} {_num(v)}" for label, v in layers["starts"].items()))
    ex = s.get("export_check")
    if ex is not None:
        if ex.get("ok") is None:
            lines.append(f"- **Exported model**: not checked ({ex['note']})")
        elif ex["ok"]:
            lines.append(f"- **Exported model** (`model/`): {ex['num_layers']} layers, {ex['prunable_params']:,} "
                         f"prunable parameters, sparsity {ex['sparsity']:.2%}: matches the masks")
        else:
            lines.append("- **Exported model MISMATCH**: " + "; ".join(ex["problems"]))

    lines += ["", "## Perplexity", "",
              f"Non-overlapping windows of **seqlen {proto['seqlen']}** tokens, split {proto['split']}, "
              + (f"first **{proto['max_tokens']} tokens** of each dataset" if proto["max_tokens"]
                 else "**all tokens** of each dataset")
              + "".join(f"; `{n}`: at most its recipe's {w} windows" for n, w in proto["window_caps"].items())
              + ". Numbers at different seqlen are not comparable.", ""]
    ppl = s["perplexity"]
    stages = [st for st in STAGES if st in ppl] + [st for st in ppl if st not in STAGES]
    datasets = list(dict.fromkeys(d for st in stages for d in ppl[st]))
    natural = any(natural_text_ppl(ppl[st]) is not None for st in stages)
    lines.append("| stage | " + " | ".join(f"`{d}`" for d in datasets) + (" | natural text |" if natural else " |"))
    lines.append("|---|" + "---:|" * (len(datasets) + natural))
    for st in stages:
        lines.append(f"| {st} | " + " | ".join(_num(ppl[st].get(d)) for d in datasets)
                     + (f" | {_num(natural_text_ppl(ppl[st]))}" if natural else "") + " |")
    lines.append("")
    if natural:
        lines.append("- natural text: the geometric mean of the `c4` and `wiki-sample` perplexities (docs/report.md)")
    lines += [f"- {st}: {STAGES[st]}" for st in stages if st in STAGES]

    if s["pg"]:
        p = s["pg"]
        tr = p.get("track") or {}
        lines += ["", "## Policy gradient", "",
                  "| setting | value |", "|---|---|"]
        for key, label in (("policy", "policy"), ("init", "init"), ("init_mapping", "init mapping"),
                           ("init_scale", "init scale"), ("allocation", "init allocation"),
                           ("reconstruct", "masks scored with reconstruction"), ("estimator", "estimator"),
                           ("select", "selection"), ("selected_step", "selected step (exported mask)"),
                           ("forward", "forward"), ("steps", "steps"), ("k", "masks per step (K)"),
                           ("batch_size", "batch (windows)"), ("lr", "learning rate"), ("lr_schedule", "lr schedule"),
                           ("control_variate", "control variate"), ("projection", "budget projection"),
                           ("per_kind_budget", "per-kind budget"), ("floor", "probability floor"),
                           ("baseline_window", "baseline window"), ("eval_every", "eval every (steps)"),
                           ("seed", "seed")):
            lines.append(f"| {label} | {p.get(key)} |")
        lines.append(f"| budget (sparsity, nearest reachable) | {_num(p.get('sparsity'), '.4%')} |")
        lines += ["",
                  f"- steps logged: {p['steps_logged']}, forward passes: {p['forward_passes']}, "
                  f"PG time: {_num(p['seconds'], '.1f')} s",
                  f"- **skipped steps** (NaN/inf loss, no update): {p['skipped_steps']}"
                  + (f" (steps {p['skipped_in_log'][:20]}{' …' if len(p['skipped_in_log']) > 20 else ''})"
                     if p["skipped_in_log"] else ""),
                  f"- hard-mask perplexity on `{tr.get('dataset')}` (first {tr.get('max_tokens')} tokens, seqlen "
                  f"{proto['seqlen']}): step 0 {_num(p['hard_ppl_start'])}, best {_num(p['hard_ppl_best'])}, "
                  f"last step {_num(p['hard_ppl_final'])}, selected step {p['selected_step']} (the exported mask, "
                  f"whose test perplexity the table's final rows show) {_num(p['hard_ppl_selected'])}",
                  f"- final mean entropy of the keep-probabilities: {_num(p['entropy_final'], '.4f')} nats "
                  f"(log 2 = {math.log(2):.4f}: undecided)"]
        if p["unreadable_log_lines"]:
            lines.append(f"- {p['unreadable_log_lines']} unreadable line(s) in {METRICS_FILE} were ignored")

    lines += ["", "## Plots", ""]
    for name, plot in s["plots"].items():
        lines += [f"### {plot['heading']}", "", "Panels: " + "; ".join(plot["axes"]) + ".", "",
                  f"![{name}]({plot['file']})", ""]
    for name, why in s["skipped_plots"].items():
        lines.append(f"- no {name} plot: {why}")
    mc = s.get("machine") or {}
    if mc:
        lines += ["", "## Machine", "",
                  ", ".join(f"{k} {v}" for k, v in mc.items() if v is not None)]
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip() + "\n"
