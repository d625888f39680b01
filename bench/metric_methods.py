"""Metric-based pruning baselines on SmolLM2-135M: every method x sparsity x unit set.

For each cell: scores on the calibration windows, allocation to the budget, then for every
reconstruction of `--reconstruct` (none, bias = FLAP's compensation, lsq = least squares from dense
inputs, lsq:sequential) the refit, surgery and WikiText-2 test perplexity (DESIGN.md protocol, the
seqlen is printed; `--natural-tokens N` adds the natural-text measure of bench/recipe_targets.py), wall
time and peak memory. Dense calibration statistics do not depend on the
method or the budget, so they are collected once and reused; the wanda-sp uniform cells redo the
layer walk because they propagate the pruned layers' outputs (Wanda's recipe). The table gives
perplexity as a ratio to the dense model.

    python bench/metric_methods.py                       # full grid (long on 2 CPU cores)
    python bench/metric_methods.py --max-tokens 16384 --allocations uniform,global   # what we ran
    python bench/metric_methods.py --methods flap --sparsities 0.2 --units channel,head   # one cell
    python bench/metric_methods.py --methods wanda-sp,flap,magnitude --sparsities 0.3,0.5 --units channel,head \
        --reconstruct none,bias,lsq,lsq:sequential --max-tokens 65536 --tag reconstruction   # bench/RESULTS.md

Writes bench/results/metric_methods.json (after every cell, so a long run can be followed).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

from pgprune import atomic


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled from /proc)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.rss()
        self.peak = self.start
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())
        self.gpu_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def machine() -> dict:
    return {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--data-dir", default="/work/shared/data")
    p.add_argument("--calib-source", default="wiki-sample")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--methods", default="wanda-sp,flap,magnitude,random,block-influence")
    p.add_argument("--sparsities", default="0.2,0.3,0.5")
    p.add_argument("--units", default="channel,head;layer", help="unit sets separated by ';'")
    p.add_argument("--allocations", default="reference",
                   help="'reference' (each method's paper: allocation auto) or a comma list of uniform,global")
    p.add_argument("--ppl-seqlen", type=int, default=128)
    p.add_argument("--ppl-batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N test tokens")
    p.add_argument("--natural-tokens", type=int, default=0,
                   help="also score the natural-text measure (C4 validation, Wikipedia-sample test; first N "
                        "tokens each; 0: off)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine more threads are slower)")
    p.add_argument("--reconstruct", default="reference",
                   help="comma list of none, bias, lsq, lsq:sequential; 'reference': each method's own (FLAP: "
                        "bias, the others: none)")
    p.add_argument("--damp", type=float, default=0.01, help="least-squares damping (--reconstruct-damp)")
    p.add_argument("--masks", default="",
                   help="comma list of LABEL=PATH mask files (e.g. a PG run's masks.safetensors) to evaluate under "
                        "every --reconstruct too, beside the methods")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="metric_methods")
    p.add_argument("--out", default=None, help="default: bench/results/TAG.json")
    args = p.parse_args(argv)
    args.out = args.out or str(Path(__file__).parent / "results" / f"{args.tag}.json")

    if args.threads:
        torch.set_num_threads(args.threads)
    from pgprune.data import get_calibration_windows, get_eval_tokens
    from pgprune.evaluate.perplexity import natural_text_perplexities, natural_text_tokens, perplexity_of_tokens
    from pgprune.masks import parse_unit_kinds
    from pgprune.metrics import resolve_allocation, run_metric
    from pgprune.metrics.calibration import collect_layer_stats
    from pgprune.metrics.scores import METHODS
    from pgprune.models.adapter import get_adapter
    from pgprune.models.load import load_model
    from pgprune.reconstruction import reconstruct
    from pgprune.surgery import remove_units

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    adapter = get_adapter(model)
    eval_tokens = get_eval_tokens(tok, "wikitext2", "test", data_dir=args.data_dir)

    def ppl(m):
        r = perplexity_of_tokens(m, eval_tokens, seqlen=args.ppl_seqlen, batch_size=args.ppl_batch,
                                 max_tokens=args.max_tokens, dataset="wikitext2", split="test")
        return r

    natural_tokens = natural_text_tokens(tok, args.data_dir) if args.natural_tokens else {}

    def natural(m) -> dict | None:
        """{c4, wiki-sample, natural: perplexity} under --natural-tokens (None when off)."""
        return natural_text_perplexities(m, natural_tokens, max_tokens=args.natural_tokens, seqlen=args.ppl_seqlen,
                                         batch_size=args.ppl_batch) if natural_tokens else None

    report = {"benchmark": "metric_methods", "machine": machine(), "model": args.model,
              "model_info": adapter.describe(), "dtype": args.dtype, "config": vars(args), "cells": []}
    t = time.perf_counter()
    dense = ppl(model)
    report["dense"] = {"ppl": dense.ppl, "seconds": time.perf_counter() - t, **dense.to_dict(),
                       "natural": natural(model)}
    print(f"dense: ppl {dense.ppl:.3f} (wikitext2 test, seqlen {dense.seqlen}, {dense.tokens} predicted tokens"
          f"{', limited' if dense.limited else ''})", flush=True)

    calib = get_calibration_windows(tok, args.calib_source, args.nsamples, args.calib_seqlen, seed=args.seed,
                                    data_dir=args.data_dir)
    with PeakRSS() as mem:
        t = time.perf_counter()
        stats = collect_layer_stats(model, calib, batch_size=args.calib_batch, progress=True)
        calib_s = time.perf_counter() - t
    calib_peak = mem.peak
    report["calibration"] = {"source": args.calib_source, "nsamples": args.nsamples, "seqlen": args.calib_seqlen,
                             "seconds": calib_s, "peak_rss_mb": mem.peak / 2**20,
                             "rss_growth_mb": (mem.peak - mem.start) / 2**20}
    print(f"dense calibration statistics: {calib_s:.1f} s, peak RSS {mem.peak / 2**20:.0f} MB", flush=True)

    def run_cell(cell, model, calib, stats, kinds, alloc, s, recon, masked: dict) -> None:
        method = cell["method"]
        mode, _, inputs = recon.partition(":")
        try:
            if "result" not in masked:
                with PeakRSS() as mem:
                    t = time.perf_counter()
                    masked["result"] = _FileMask(cell["mask_file"], adapter) if "mask_file" in cell else \
                        run_metric(model, calib, method, s, kinds, alloc, batch_size=args.calib_batch,
                                   seed=args.seed, progress=False, bias_compensation=False,
                                   stats=None if _walks(method, alloc, kinds) else stats)
                    masked["seconds"], masked["peak"] = time.perf_counter() - t, mem.peak
            r, method_s = masked["result"], masked["seconds"]
            with PeakRSS() as refit_mem:
                t = time.perf_counter()
                refit = reconstruct(model, calib, r.masks, mode, inputs=inputs or "dense", damp=args.damp,
                                    stats=stats, batch_size=args.calib_batch, progress=False)
                refit_s = time.perf_counter() - t
            pruned = remove_units(model, r.masks, output_bias=refit.output_bias, input_weights=refit.input_weights,
                                  copy=True)
            res = ppl(pruned)
            res_natural = natural(pruned)
            del pruned
        except Exception as e:  # a failing cell is a result too; keep going
            cell.update(error=f"{type(e).__name__}: {e}")
            print(f"{method:16s} {cell['units']:13s} {alloc:7s} s={s:.2f} {recon}: {cell['error']}", flush=True)
            report["cells"].append(cell)
            atomic.write_json(args.out, report)
            return
        walked = "mask_file" not in cell and _walks(method, alloc, kinds)
        # cells on the shared dense statistics are charged their collection time and memory
        shared = not walked and r.info["calibration"] is not None
        summary = r.info["masks"]
        cell.update(
            sparsity=r.info["sparsity"], total_sparsity=summary["total_sparsity"],
            ppl=res.ppl, ppl_ratio=res.ppl / dense.ppl, ppl_seqlen=res.seqlen, ppl_tokens=res.tokens,
            natural=res_natural,
            propagate=r.info["propagate"], reconstruction=refit.info,
            method_seconds=method_s, shared_calibration=shared, refit_seconds=refit_s,
            refit_peak_rss_mb=refit_mem.peak / 2**20,
            wall_seconds=method_s + refit_s + (calib_s if shared else 0.0),
            peak_rss_mb=max(masked["peak"], refit_mem.peak, calib_peak if shared else 0) / 2**20,
            removed_units=r.info["removed_units"],
            kv_heads_per_layer=summary["kv_heads_per_layer"],
            channels_per_layer=summary["channels_per_layer"], layers_kept=summary["layers_kept"],
            ppl_eval_seconds=res.seconds)
        report["cells"].append(cell)
        atomic.write_json(args.out, report)
        print(f"{method:16s} {cell['units']:13s} {alloc:7s} s={s:.2f} {recon:14s} -> {cell['sparsity']:.4f}  "
              f"ppl {res.ppl:10.2f} (x{cell['ppl_ratio']:.2f})  refit {refit_s:.0f} s"
              + (f"  natural {res_natural['natural']:.2f}" if res_natural else ""), flush=True)

    for spec in filter(None, (x.strip() for x in args.masks.split(","))):
        label, _, path = spec.partition("=")
        masked = {}
        for recon in _reconstructions(args.reconstruct, "random"):
            run_cell({"method": f"file:{label}", "mask_file": path, "units": "", "allocation": "", "target_sparsity": 0.0,
                      "reconstruct": recon}, model, calib, stats, (), "", 0.0, recon, masked)
    methods = [m.strip() for m in args.methods.split(",") if m.strip() and args.methods != "none"]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    unit_sets = [parse_unit_kinds(u) for u in args.units.split(";") if u.strip()]
    for kinds in unit_sets:
        for method in methods:
            if any(k not in METHODS[method].kinds for k in kinds):
                continue
            allocs = [resolve_allocation(method, "auto", kinds)] if args.allocations == "reference" else \
                [a.strip() for a in args.allocations.split(",")]
            if all(k in ("attn", "mlp", "layer") for k in kinds):
                allocs = ["global"]  # one unit per layer: uniform ranks exactly like global
            for alloc in allocs:
                for s in sparsities:
                    masked = {}  # the method's mask, computed by the first reconstruction's cell
                    for recon in _reconstructions(args.reconstruct, method):
                        cell = {"method": method, "units": ",".join(kinds), "allocation": alloc, "target_sparsity": s,
                                "reconstruct": recon}
                        run_cell(cell, model, calib, stats, kinds, alloc, s, recon, masked)


    print()
    print(format_table(report))
    atomic.write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


class _FileMask:
    """A saved mask in run_metric's result shape (masks, info) for the cells of --masks."""

    def __init__(self, path: str, adapter):
        from pgprune.masks import Masks, UnitCosts

        costs = UnitCosts.from_adapter(adapter)
        self.masks = Masks.load(path)
        summary = self.masks.summary(costs)
        self.info = {"sparsity": summary["sparsity"], "masks": summary, "propagate": None, "calibration": None,
                     "removed_units": None}


def _reconstructions(spec: str, method: str) -> list[str]:
    if spec == "reference":
        from pgprune.metrics.scores import METHODS

        return ["bias" if METHODS[method].bias_compensation else "none"]
    return [r.strip() for r in spec.split(",") if r.strip()]


def _walks(method: str, alloc: str, kinds) -> bool:
    """Cells that run their own layer walk (pruned propagation) instead of the shared dense stats."""
    from pgprune.metrics.scores import METHODS

    return (alloc == "uniform" and METHODS[method].uniform_propagate == "pruned"
            and all(k in ("channel", "head") for k in kinds))


def format_table(report: dict) -> str:
    d = report["dense"]
    lim = f"first {d['windows'] * d['seqlen']} of {d['available_tokens']} tokens" if d.get("limited") else "all tokens"
    lines = [f"WikiText-2 test perplexity, seqlen {d['seqlen']} ({lim}); dense ppl {d['ppl']:.3f}; "
             f"calibration {report['calibration']['nsamples']} x {report['calibration']['seqlen']} tokens of "
             f"{report['calibration']['source']}",
             "", "| units | method | allocation | target | reconstruction | sparsity | ppl | x dense | refit s | "
                 "wall s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["cells"]:
        if "error" in c:
            lines.append(f"| {c['units']} | {c['method']} | {c['allocation']} | {c['target_sparsity']:.2f} | "
                         f"{c.get('reconstruct', '')} | error: {c['error'][:60]} | | | | | |")
            continue
        lines.append(f"| {c['units']} | {c['method']} | {c['allocation']} | {c['target_sparsity']:.2f} | "
                     f"{c.get('reconstruct', '')} | {c['sparsity']:.4f} | {c['ppl']:.2f} | {c['ppl_ratio']:.2f} | "
                     f"{c.get('refit_seconds', 0):.0f} | {c['wall_seconds']:.0f} | {c['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
