"""How the policy-gradient loop scales, on the CPU.

1. Ranks: PG step time and samples/s (N*K*B windows per step) with 1 vs 2 gloo ranks on a small
   synthetic llama, each rank one thread (what 2 cores allow), same K and B per rank.
2. Size: step time and peak resident-memory growth of one PG step for a synthetic Llama-shaped
   model scaled in width and depth (4 sizes), against the memory plan's estimate; slopes of
   log(time) and log(memory) vs log(parameters). The memory is measured in its own process with
   MALLOC_MMAP_THRESHOLD_=65536 (blocks >= 64 KiB mmapped and returned on free), so the peak
   growth is the step's live bytes, what the plan counts (see bench/memory_plan.py); the time in
   a process with glibc's defaults.

Every measurement runs in a fresh subprocess with OMP_NUM_THREADS=1.

    OMP_NUM_THREADS=1 python bench/scale.py [--steps 6]

GPU: see bench/gpu_check.sh (not run here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save, table  # noqa: E402

K, B, T = 2, 4, 128
SMALL = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 2048}
SIZES = [  # width and depth grow together
    {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4},
    {"hidden_size": 384, "intermediate_size": 1056, "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2},
    {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4},
]


def _setup(sizes: dict):
    import torch

    from pgprune.masks import UnitCosts
    from pgprune.models.adapter import get_adapter
    from pgprune.models.synthetic import synthetic_model
    from pgprune.policy.probabilities import UnitLayout

    model = synthetic_model("llama", max_position_embeddings=T, **{"vocab_size": 2048, **sizes})
    costs = UnitCosts.from_adapter(get_adapter(model))
    layout = UnitLayout.build(costs, ("channel", "head"))
    calib = torch.randint(0, model.config.vocab_size, (64, T), generator=torch.Generator().manual_seed(0))
    return model, costs, layout, calib, layout.present.float() * 0.7


def _timed_run(sizes: dict, steps: int, world=None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per PG step, after one warm-up step."""
    from pgprune.config import PGSettings
    from pgprune.policy.loop import run_policy_gradient
    from pgprune.policy.probabilities import UnitPolicy

    model, costs, layout, calib, s0 = _setup(sizes)
    config = PGSettings(policy="units", steps=steps + 1, k=K, batch_size=B, lr_schedule="constant", eval_every=10**6)
    run_policy_gradient(model, calib, UnitPolicy(s0, layout, costs, 0.3), config, progress=False, world=world,
                        stop_after=1)
    t0, c0 = time.perf_counter(), time.process_time()
    run_policy_gradient(model, calib, UnitPolicy(s0, layout, costs, 0.3), config, progress=False, world=world)
    return (time.perf_counter() - t0) / config.steps, (time.process_time() - c0) / config.steps


def worker_rank(rank: int, world_size: int, port: int, steps: int) -> None:
    import torch.distributed as dist

    from pgprune.policy.distributed import TorchWorld, World

    world = World()
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
        world = TorchWorld()
    sec, cpu = _timed_run(SMALL, steps, world)
    if rank == 0:
        print(json.dumps({"sec_per_step": sec, "cpu_sec_per_step": cpu}))
    if world_size > 1:
        dist.destroy_process_group()


def worker_size(index: int, steps: int, what: str) -> None:
    import torch

    from pgprune.gating import masked_losses
    from pgprune.memory import estimate_pg_memory, measure_peak_growth
    from pgprune.policy.probabilities import sample_masks

    sizes = SIZES[index]
    if what == "time":
        print(json.dumps({"sec_per_step": _timed_run(sizes, steps)[0]}))
        return
    model, costs, layout, calib, s0 = _setup(sizes)

    def step():
        return masked_losses(model, calib[:B], layout.masks(sample_masks(s0, K, torch.Generator().manual_seed(1))),
                             costs=costs)

    step()
    growth = sorted(measure_peak_growth(step)[0] for _ in range(3))[1]  # median of 3 steps
    est = estimate_pg_memory(model, k=K, batch_size=B, seqlen=T, nsamples=0, metric_nsamples=0)
    print(json.dumps({"params": est["inputs"]["parameters"], "peak_growth": growth,
                      "estimate": est["breakdown"]["pg_step_activations"] + est["breakdown"]["probabilities_and_masks"],
                      "weights": est["breakdown"]["weights"]}))


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world_size: int, steps: int) -> dict:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--rank-worker", str(r), str(world_size), str(port),
                               str(steps)], stdout=subprocess.PIPE, text=True, env=_env())
             for r in range(world_size)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed: return codes {[p.returncode for p in procs]}")
    return json.loads(outs[0].strip().splitlines()[-1])


def _slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    rank_rows = []
    for n in (1, 2):
        r = run_ranks(n, args.steps)
        rank_rows.append({"ranks": n, "sec_per_step": r["sec_per_step"], "cpu_sec_per_step": r["cpu_sec_per_step"],
                          "samples_per_s": n * K * B / r["sec_per_step"]})
    for r in rank_rows:
        r["speedup_vs_1"] = r["samples_per_s"] / rank_rows[0]["samples_per_s"]
        # with a free core per rank the wall time of a step is its CPU time (+ waiting in all_gather)
        r["speedup_if_cores_free"] = r["ranks"] * rank_rows[0]["cpu_sec_per_step"] / r["cpu_sec_per_step"]
    load_after_ranks = os.getloadavg()
    print(f"\nPG steps, 1 vs 2 gloo ranks (1 thread each), K={K} B={B} T={T} per rank, synthetic llama {SMALL}")
    print(table(rank_rows, ["ranks", "sec_per_step", "cpu_sec_per_step", "samples_per_s", "speedup_vs_1",
                            "speedup_if_cores_free"]))
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after_ranks[0]:.2f} on {os.cpu_count()} "
          "cores: 2 ranks only gain when 2 cores are free")

    size_rows = []
    for i, sizes in enumerate(SIZES):
        r = {}
        for what, env in (("time", _env()), ("memory", {**_env(), "MALLOC_MMAP_THRESHOLD_": "65536"})):
            out = subprocess.run([sys.executable, __file__, "--size-worker", str(i), str(args.steps), what],
                                 capture_output=True, text=True, env=env, timeout=300)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            r.update(json.loads(out.stdout.strip().splitlines()[-1]))
        size_rows.append({"hidden": sizes["hidden_size"], "layers": sizes["num_hidden_layers"],
                          "params_M": r["params"] / 1e6, "sec_per_step": r["sec_per_step"],
                          "peak_step_MiB": r["peak_growth"] / 2**20, "plan_step_MiB": r["estimate"] / 2**20,
                          "plan/measured": r["estimate"] / r["peak_growth"], "weights_MiB": r["weights"] / 2**20})
    params = [r["params_M"] for r in size_rows]
    fit = {"time_vs_params_loglog_slope": _slope(params, [r["sec_per_step"] for r in size_rows]),
           "step_memory_vs_params_loglog_slope": _slope(params, [r["peak_step_MiB"] for r in size_rows])}
    print(f"\nPG step vs model size (K={K} B={B} T={T}, fp32, 1 thread, vocab 2048; memory: live bytes, "
          "MALLOC_MMAP_THRESHOLD_=65536)")
    print(table(size_rows, ["hidden", "layers", "params_M", "sec_per_step", "peak_step_MiB", "plan_step_MiB",
                            "plan/measured", "weights_MiB"]))
    print("log-log slopes vs parameters: " + ", ".join(f"{k} {v:.2f}" for k, v in fit.items()))
    save("scale", {"command": "OMP_NUM_THREADS=1 python bench/scale.py " + " ".join(sys.argv[1:]),
                   "k": K, "batch_size": B, "seqlen": T, "steps": args.steps, "ranks": rank_rows,
                   "sizes": size_rows, "fit": fit, "cores": os.cpu_count(),
                   "load_average_1min": {"before": load_before[0], "after_rank_runs": load_after_ranks[0]}, "seconds": time.perf_counter() - t_start})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-worker":
        worker_rank(*map(int, sys.argv[2:6]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--size-worker":
        worker_size(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        main()
