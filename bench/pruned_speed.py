"""Speed of surgically pruned models against the dense model, and against the ideal FLOP ratio.

Models: the dense model and, for each sparsity (default 30% and 50%, DESIGN.md's definition: the
fraction of decoder-layer parameters removed), two random masks:
  uniform   every layer keeps the same number of KV groups and MLP channels
  uneven    each layer keeps a random number of KV groups (>= 1) and a random share of channels,
            scaled so the total hits the target
All models are timed interleaved by pgprune.evaluate.speed.compare_speed (prefill of B x T tokens
building the KV cache, then greedy decoding with the cache), medians over repeats; speedups are
medians of per-repeat ratios against the dense model.

Ideal FLOP ratio: matmul FLOPs per token, 2 x (linear weights) + 4 x context x heads x head_dim
per attention layer (scores and weighted sum), at the mean causal context of the prefill, resp.
of the decode steps; decoding also runs the LM head for every token, prefill only for the last one
(not counted). ideal speedup = dense FLOPs / pruned FLOPs; efficiency = measured / ideal.

    python bench/pruned_speed.py        # smollm2-135m; cuda if present; dtype auto (bf16 where native)
    OMP_NUM_THREADS=1 python bench/pruned_speed.py --batch 1 --new-tokens 8 --repeats 7   # results/ run

On a CPU shared with other work, OMP_NUM_THREADS=1 gives much steadier ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from pgprune import atomic
from pgprune.evaluate.speed import compare_speed, machine_info
from pgprune.masks import Masks, UnitCosts
from pgprune.models.adapter import get_adapter
from pgprune.models.load import load_model
from pgprune.surgery import remove_units

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _random_subset(n: int, keep: int, g: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:keep]] = True
    return mask


def _channels_for(costs: UnitCosts, kv: torch.Tensor, shares: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-layer channel counts proportional to `shares` so that kept prunable params ~= target."""
    target = (1.0 - sparsity) * costs.prunable_params
    fixed = int((costs.layer_fixed + costs.attn_fixed + costs.mlp_fixed + kv * costs.head_cost).sum())
    lo, hi = 0.0, 1.0 / float(shares.min())
    for _ in range(60):  # bisection on the scale of the shares
        mid = (lo + hi) / 2
        ch = (mid * shares * costs.intermediate).round().clamp(1, None).minimum(costs.intermediate).long()
        if fixed + int((ch * costs.channel_cost).sum()) > target:
            hi = mid
        else:
            lo = mid
    return (lo * shares * costs.intermediate).round().clamp(1, None).minimum(costs.intermediate).long()


def target_mask(costs: UnitCosts, sparsity: float, uneven: bool, seed: int) -> Masks:
    g = torch.Generator().manual_seed(seed)
    L, G = costs.num_layers, costs.units_per_layer("head")
    if uneven:
        kv = torch.randint(1, G + 1, (L,), generator=g)
        shares = torch.empty(L).uniform_(0.3, 1.0, generator=g)
    else:
        kv = torch.full((L,), max(1, round((1.0 - sparsity) * G)))
        shares = torch.ones(L)
    ch = _channels_for(costs, kv, shares, sparsity)
    heads = torch.stack([_random_subset(G, int(kv[i]), g) for i in range(L)])
    chans = torch.stack([_random_subset(costs.units_per_layer("channel"), int(ch[i]), g) for i in range(L)])
    return Masks({"head": heads, "channel": chans})


def _mask_info(masks: Masks, costs: UnitCosts, **extra) -> dict:
    summary = masks.summary(costs)
    return {**extra, "sparsity": masks.sparsity(costs), "kv_heads_per_layer": summary["kv_heads_per_layer"],
            "channels_per_layer": summary["channels_per_layer"]}


def flops_per_token(model, context: float, with_head: bool) -> float:
    adapter = get_adapter(model)
    hd = adapter.head_dim
    total = 0.0
    for i in range(adapter.num_layers):
        m = adapter.layer(i)
        for lin in (m.q_proj, m.k_proj, m.v_proj, m.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            if lin is not None:
                total += 2.0 * lin.weight.numel()
        total += 4.0 * context * adapter.num_kv_heads(i) * adapter.queries_per_kv * hd
    if with_head:
        total += 2.0 * adapter.lm_head().weight.numel()
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, fp32 on a CPU without native bf16), bf16, fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--sparsities", default="0.3,0.5")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--masks", action="append", default=[], metavar="NAME=FILE",
                   help="also time the model pruned with this mask file (e.g. a PG run's masks.safetensors); "
                        "repeatable; --sparsities '' leaves out the random masks")
    p.add_argument("--out", default=str(RESULTS / "pruned_speed.json"))
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    dense, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    costs = UnitCosts.from_adapter(get_adapter(dense))
    models, info = {"dense": dense}, {}
    for s in [float(x) for x in args.sparsities.split(",") if x.strip()]:
        for uneven in (False, True):
            name = f"{'uneven' if uneven else 'uniform'}-{round(100 * s)}%"
            masks = target_mask(costs, s, uneven, seed=round(1000 * s) + uneven)
            pruned = remove_units(dense, masks, copy=True)
            models[name] = pruned
            info[name] = _mask_info(masks, costs, target_sparsity=s)
    for entry in args.masks:
        name, _, path = entry.partition("=")
        if not path:
            p.error(f"--masks takes NAME=FILE, got {entry!r}")
        masks = Masks.load(path)
        models[name] = remove_units(dense, masks, copy=True)
        info[name] = _mask_info(masks, costs, target_sparsity=None, mask_file=path)
    info["dense"] = {"target_sparsity": 0.0, "sparsity": 0.0}

    cmp = compare_speed(models, baseline="dense", batch_size=args.batch, prompt_len=args.prompt_len,
                        new_tokens=args.new_tokens, warmup=args.warmup, repeats=args.repeats, progress=True)
    prefill_ctx = (args.prompt_len + 1) / 2
    decode_ctx = args.prompt_len + (args.new_tokens + 1) / 2
    base_pre = flops_per_token(dense, prefill_ctx, with_head=False)
    base_dec = flops_per_token(dense, decode_ctx, with_head=True)
    rows = []
    for name, model in models.items():
        res, rat = cmp.results[name], cmp.ratios[name]
        ideal_pre = base_pre / flops_per_token(model, prefill_ctx, with_head=False)
        ideal_dec = base_dec / flops_per_token(model, decode_ctx, with_head=True)
        rows.append({
            "name": name, **info[name],
            "param_bytes": res.param_bytes, "param_bytes_ratio": rat["param_bytes_ratio"],
            "prefill_tokens_per_s": res.prefill_tokens_per_s, "decode_tokens_per_s": res.decode_tokens_per_s,
            "prefill_speedup": rat["prefill_speedup"], "decode_speedup": rat["decode_speedup"],
            "ideal_prefill_speedup": ideal_pre, "ideal_decode_speedup": ideal_dec,
            "prefill_efficiency": rat["prefill_speedup"] / ideal_pre,
            "decode_efficiency": rat["decode_speedup"] / ideal_dec,
        })
    first = cmp.results["dense"]
    print(f"\npruned vs dense: {args.model}, {first.device}, {first.dtype}, batch {args.batch}, prompt "
          f"{args.prompt_len}, {args.new_tokens} decode steps with KV cache, {args.repeats} repeats (medians)")
    print(f"{'model':<12} {'sparsity':>8} {'MB':>7} {'prefill tok/s':>13} {'x':>5} {'ideal':>5} "
          f"{'decode tok/s':>12} {'x':>5} {'ideal':>5}")
    for r in rows:
        print(f"{r['name']:<12} {r['sparsity']:>8.1%} {r['param_bytes'] / 2**20:>7.1f} "
              f"{r['prefill_tokens_per_s']:>13.1f} {r['prefill_speedup']:>5.2f} {r['ideal_prefill_speedup']:>5.2f} "
              f"{r['decode_tokens_per_s']:>12.1f} {r['decode_speedup']:>5.2f} {r['ideal_decode_speedup']:>5.2f}")
    print("x = measured speedup over dense (median of per-repeat ratios); ideal = dense / pruned matmul FLOPs")
    record = {"benchmark": "pruned_speed", "model": args.model, "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "warmup": args.warmup,
              "sparsity_definition": "fraction of the dense model's decoder-layer parameters removed",
              "machine": machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "command": command_line("pruned_speed.py", argv if argv is not None else sys.argv[1:]),
              "rows": rows, "speed": cmp.to_dict()}
    atomic.write_json(args.out, record)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
