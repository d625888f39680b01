"""Cost of the gated forward used by the policy-gradient loop.

Compares, on one batch of B x T tokens (paper default 8 x 128) and K = 2 masks:
  masked_losses   one pgprune.gating.masked_losses call (batch repeated K times, K masks, hooks)
  plain_xK        K plain forwards `model(ids, labels=ids).loss` (what a naive loop would do)
  nohook_KB       one forward of the K*B rows with the same chunked loss but no masks
                  (isolates the hooks' own cost)
  gathered_losses the alternative to gating (`--forward gathered`): per mask, gather the kept rows
                  and columns into a pruned view (pgprune.surgery.pruned_view) and run B rows through it
  gathered_fwd_xK the forward part alone, through views built beforehand: the lower bound of any
                  gathering scheme (a gather can be made cheaper, never free)
Variants run interleaved (each repeat runs all three, in a rotating order) and ratios are the
median of per-repeat ratios, so drifting machine load cancels. Target: masked_losses / plain_xK
<= 1.10.

    python bench/gating_cost.py                       # smollm2-135m, bf16 and fp32, on cuda if present
    OMP_NUM_THREADS=1 python bench/gating_cost.py --repeats 3        # results/ run (CPU)

On a CPU shared with other work, OMP_NUM_THREADS=1 gives much steadier ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from pgprune import atomic
from pgprune.evaluate.speed import machine_info
from pgprune.gating import gathered_losses, masked_losses
from pgprune.lm_loss import token_nll
from pgprune.masks import Masks, UnitCosts
from pgprune.models.adapter import get_adapter
from pgprune.models.load import load_model
from pgprune.surgery import pruned_view

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_masks(costs: UnitCosts, k: int, keep: float, seed: int) -> Masks:
    g = torch.Generator().manual_seed(seed)
    return Masks.stack([Masks({kind: torch.rand(costs.num_layers, costs.units_per_layer(kind), generator=g) < keep
                               for kind in ("head", "channel")}) for _ in range(k)])


def bench_dtype(model_name: str, dtype: str, device: str | None, batch: int, seqlen: int, k: int,
                repeats: int, warmup: int, keep: float = 0.5) -> dict:
    model, _ = load_model(model_name, dtype=dtype, device=device)
    dev = next(model.parameters()).device
    costs = UnitCosts.from_adapter(get_adapter(model))
    masks = random_masks(costs, k, keep=keep, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(0)).to(dev)

    def run_masked():
        return masked_losses(model, ids, masks, costs=costs)

    def run_plain():
        with torch.no_grad():
            return [model(input_ids=ids, labels=ids, use_cache=False).loss for _ in range(k)]

    def run_nohook():
        return token_nll(model, ids.repeat(k, 1)).view(k, -1).mean(1)

    views = [pruned_view(model, masks.select(j)) for j in range(k)]

    def run_gathered():
        return gathered_losses(model, ids, masks, costs=costs)

    def run_gathered_forward():
        return [token_nll(view, ids).mean() for view in views]

    variants = {"masked_losses": run_masked, f"plain_x{k}": run_plain, f"nohook_{k}B": run_nohook,
                "gathered_losses": run_gathered, f"gathered_fwd_x{k}": run_gathered_forward}
    names = list(variants)
    times = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            _sync(dev)
            t0 = time.perf_counter()
            variants[n]()
            _sync(dev)
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
        print(f"  {dtype} repeat {r + 1}/{warmup + repeats}" + ("" if r >= warmup else " (warm-up)"),
              file=sys.stderr)
    plain, nohook = times[f"plain_x{k}"], times[f"nohook_{k}B"]
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(a, b))  # noqa: E731
    out = {
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(dev),
        "median_s": {n: statistics.median(v) for n, v in times.items()},
        "times_s": times,
        "ratio_masked_vs_plain": ratio(times["masked_losses"], plain),
        "ratio_masked_vs_nohook": ratio(times["masked_losses"], nohook),
        "ratio_gathered_vs_masked": ratio(times["gathered_losses"], times["masked_losses"]),
        "ratio_gathered_forward_vs_masked": ratio(times[f"gathered_fwd_x{k}"], times["masked_losses"]),
    }
    del model
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--keep", type=float, default=0.5, help="keep probability of each unit in the random masks")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "gating_cost.json"))
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    rows = [bench_dtype(args.model, d.strip(), args.device, args.batch, args.seqlen, args.k, args.repeats,
                        args.warmup, args.keep) for d in args.dtypes.split(",") if d.strip()]
    k = args.k
    print(f"\ngated forward cost: {args.model}, batch {args.batch} x {args.seqlen}, K={k}, "
          f"{args.repeats} repeats (medians; ratios = median of per-repeat ratios)")
    print(f"{'dtype':<9} {'device':<7} {'masked_losses s':>15} {f'plain x{k} s':>12} {f'nohook {k}B s':>13} "
          f"{'masked/plain':>12} {'masked/nohook':>13} {'gathered/masked':>15} {'(forward only)':>14}")
    for r in rows:
        m = r["median_s"]
        print(f"{r['dtype']:<9} {r['device']:<7} {m['masked_losses']:>15.4f} {m[f'plain_x{k}']:>12.4f} "
              f"{m[f'nohook_{k}B']:>13.4f} {r['ratio_masked_vs_plain']:>12.3f} {r['ratio_masked_vs_nohook']:>13.3f} "
              f"{r['ratio_gathered_vs_masked']:>15.3f} {r['ratio_gathered_forward_vs_masked']:>14.3f}")
    record = {"benchmark": "gating_cost", "model": args.model, "batch": args.batch, "seqlen": args.seqlen,
              "k": k, "repeats": args.repeats, "warmup": args.warmup, "target_ratio_masked_vs_plain": 1.10,
              "masks": f"random, each KV group and MLP channel kept with probability {args.keep}",
              "machine": machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "command": command_line("gating_cost.py", argv if argv is not None else sys.argv[1:]),
              "results": rows}
    atomic.write_json(args.out, record)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
