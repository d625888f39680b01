"""The memory plan (pgprune.memory) against measured memory of PG steps on the CPU.

1. Shapes: for synthetic Llama shapes that stress each term (MLP, attention with and without GQA,
   a wide residual, the LM head with one and two chunks, bf16, eager attention), the live-bytes
   peak of one gated PG step (`masked_losses`) from torch's profiler (sum of the CPU allocator's
   allocation / free events) against the plan. In this process, one thread.
2. Processes: for the test cases of tests/test_memory.py (and SmolLM2-135M with --smollm2), in
   fresh processes (one thread) after a warm-up step, with the resident high-water mark reset
   (`measure_peak_growth`):
   - live RSS: MALLOC_MMAP_THRESHOLD_=65536 (every block >= 64 KiB its own mmap, returned on
     free): peak resident growth of single steps, and the profiler's live peak of one more step;
   - default glibc malloc: the footprint after 1, 8 and --loop consecutive steps, which is what
     freed heap blocks add in a real run, against the plan + `allocator_slack` that check_fits asks.

    OMP_NUM_THREADS=1 python bench/memory_plan.py [--smollm2] [--processes 2] [--loop 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, save, table  # noqa: E402

SHAPES = {  # name: (dtype, attention, sizes, k, b, t)
    "mlp": ("fp32", "sdpa", dict(hidden_size=256, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=8,
                                 num_key_value_heads=4, vocab_size=512), 2, 8, 64),
    "attention-gqa": ("fp32", "sdpa", dict(hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=32, num_key_value_heads=4, head_dim=64,
                                           vocab_size=512), 2, 8, 64),
    "attention-mha": ("fp32", "sdpa", dict(hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=32, num_key_value_heads=32, head_dim=64,
                                           vocab_size=512), 2, 8, 64),
    "wide-residual": ("fp32", "sdpa", dict(hidden_size=2048, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                           vocab_size=512), 2, 8, 64),
    "head-1-chunk": ("fp32", "sdpa", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=32768), 2, 4, 128),
    "head-2-chunks": ("fp32", "sdpa", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=8192), 2, 32, 128),
    "odd-k3": ("fp32", "sdpa", dict(hidden_size=384, intermediate_size=1000, num_hidden_layers=3, num_attention_heads=6,
                                    num_key_value_heads=2, vocab_size=5000), 3, 5, 96),
    "mlp-bf16": ("bf16", "sdpa", dict(hidden_size=256, intermediate_size=3072, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=512), 2, 8, 64),
    "head-2-chunks-bf16": ("bf16", "sdpa", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=8192), 2, 32, 128),
    "eager": ("fp32", "eager", dict(hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                                    num_key_value_heads=4, vocab_size=512), 2, 8, 256),
    "eager-bf16": ("bf16", "eager", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2, vocab_size=1000), 2, 4, 200),
}
CASES = {  # tests/test_memory.py
    "mlp-bound": {"model": "synthetic", "sizes": dict(hidden_size=256, intermediate_size=3072, num_hidden_layers=4,
                                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=512),
                  "k": 2, "b": 8, "t": 64},
    "head-bound": {"model": "synthetic", "sizes": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=32768),
                   "k": 2, "b": 4, "t": 128},
    "smollm2": {"model": "smollm2", "k": 2, "b": 8, "t": 128},
}
MIB = 2**20


def _step_fn(model, k, b, t):
    import torch

    from pgprune.gating import masked_losses
    from pgprune.masks import UnitCosts
    from pgprune.models.adapter import get_adapter
    from pgprune.policy.probabilities import UnitLayout, sample_masks

    costs = UnitCosts.from_adapter(get_adapter(model))
    layout = UnitLayout.build(costs, ("channel", "head"))
    s = layout.present.float() * 0.5
    ids = torch.randint(0, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    seeds = iter(range(1, 10**6))

    def step():  # new masks every step, as in the PG loop
        return masked_losses(model, ids, layout.masks(sample_masks(s, k, torch.Generator().manual_seed(next(seeds)))),
                             costs=costs)

    return step


def profiler_peak(fn) -> int:
    """Peak live bytes of the CPU allocator while `fn` runs (torch profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def _plan(model, k, b, t):
    from pgprune.memory import allocator_slack, estimate_pg_memory

    est = estimate_pg_memory(model, k=k, batch_size=b, seqlen=t, nsamples=0, metric_nsamples=0)
    bd = est["breakdown"]
    return bd["pg_step_activations"] + bd["probabilities_and_masks"], allocator_slack(est, "cpu")


def shapes() -> list[dict]:
    import torch

    from pgprune.models.synthetic import synthetic_model

    torch.set_num_threads(1)
    rows = []
    for name, (dtype, attn, sizes, k, b, t) in SHAPES.items():
        model = synthetic_model("llama", dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], **sizes)
        model.config._attn_implementation = attn
        step = _step_fn(model, k, b, t)
        step()
        live = profiler_peak(step)
        plan, _ = _plan(model, k, b, t)
        rows.append({"shape": name, "dtype": dtype, "attention": attn, "KxBxT": f"{k}x{b}x{t}",
                     "live_MiB": live / MIB, "plan_MiB": plan / MIB, "plan/live": plan / live})
    return rows


def worker(spec: dict) -> None:
    """One process: prints JSON."""
    import torch

    from pgprune.memory import measure_peak_growth

    torch.set_num_threads(1)
    if spec["model"] == "smollm2":
        from pgprune.models.load import load_model

        model, _ = load_model("smollm2-135m", dtype="fp32", device="cpu")
    else:
        from pgprune.models.synthetic import synthetic_model

        model = synthetic_model("llama", **spec["sizes"])
    step = _step_fn(model, spec["k"], spec["b"], spec["t"])
    step()  # warm-up
    out = {}
    if spec["mode"] == "live":
        out["rss"] = [measure_peak_growth(step)[0] for _ in range(spec["repeats"])]
        out["profiler"] = profiler_peak(step)
    else:
        out["loops"] = {n: measure_peak_growth(step, repeat=n)[0] for n in (1, 8, spec["loop"])}
    out["plan"], out["slack"] = _plan(model, spec["k"], spec["b"], spec["t"])
    print(json.dumps(out))


def processes(names: list[str], n_proc: int, loop: int, repeats: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OMP_NUM_THREADS"] = "1"
    rows = []
    for name in names:
        for mode in ("live", "default"):
            for p in range(n_proc):
                spec = {**CASES[name], "mode": mode, "loop": loop, "repeats": repeats}
                e = {**env, "MALLOC_MMAP_THRESHOLD_": "65536"} if mode == "live" else env
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                     text=True, env=e, timeout=1800)
                if out.returncode:
                    raise SystemExit(out.stderr[-2000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                row = {"case": name, "allocator": "mmap>=64KiB" if mode == "live" else "glibc default", "process": p,
                       "plan_MiB": r["plan"] / MIB, "plan+slack_MiB": (r["plan"] + r["slack"]) / MIB}
                if mode == "live":
                    row.update({"rss_steps_MiB": " ".join(f"{x / MIB:.1f}" for x in r["rss"]),
                                "profiler_MiB": r["profiler"] / MIB,
                                "plan/rss": f"{r['plan'] / max(r['rss']):.3f}-{r['plan'] / min(r['rss']):.3f}",
                                "rss": r["rss"], "profiler": r["profiler"]})
                else:
                    row.update({f"after_{n}_steps_MiB": v / MIB for n, v in r["loops"].items()})
                    row["plan/footprint"] = r["plan"] / max(r["loops"].values())
                    row["footprint/(plan+slack)"] = max(r["loops"].values()) / (r["plan"] + r["slack"])
                print(json.dumps({k: v for k, v in row.items() if k not in ("rss", "profiler")}), flush=True)
                rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (minutes per process)")
    p.add_argument("--processes", type=int, default=2, help="fresh processes per case and allocator")
    p.add_argument("--loop", type=int, default=32, help="longest run of consecutive steps (default allocator)")
    p.add_argument("--repeats", type=int, default=3, help="single steps measured per live process")
    p.add_argument("--skip-shapes", action="store_true")
    args = p.parse_args()
    t0 = time.perf_counter()
    shape_rows = [] if args.skip_shapes else shapes()
    if shape_rows:
        print("\nLive peak of one gated PG step (torch profiler) vs the plan, fp32/bf16, 1 thread")
        print(table(shape_rows, ["shape", "dtype", "attention", "KxBxT", "live_MiB", "plan_MiB", "plan/live"]))
    names = ["mlp-bound", "head-bound"] + (["smollm2"] if args.smollm2 else [])
    rows = processes(names, args.processes, args.loop, args.repeats)
    live = [r for r in rows if r["allocator"] != "glibc default"]
    default = [r for r in rows if r["allocator"] == "glibc default"]
    print("\nFresh processes, live bytes (MALLOC_MMAP_THRESHOLD_=65536): peak RSS growth of single steps")
    print(table(live, ["case", "process", "plan_MiB", "rss_steps_MiB", "profiler_MiB", "plan/rss"]))
    print(f"\nFresh processes, glibc defaults: footprint after 1, 8, {args.loop} consecutive steps vs plan + slack")
    print(table(default, ["case", "process", "plan_MiB", "after_1_steps_MiB", "after_8_steps_MiB",
                          f"after_{args.loop}_steps_MiB", "plan+slack_MiB", "footprint/(plan+slack)"]))
    save("memory_plan" + ("_smollm2" if args.smollm2 else ""),
         {"command": command_line("memory_plan.py", sys.argv[1:]), "shapes": shape_rows, "processes": rows,
          "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        main()
