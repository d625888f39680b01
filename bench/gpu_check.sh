#!/usr/bin/env bash
# GPU check of the PG step (prepared, not yet run: no GPU on the development machine).
# 1B-class synthetic Llama (hidden 2048, 16 layers, 32 heads / 8 KV, intermediate 8192, vocab 128256),
# bf16, K=2 masks x B=8 windows x 128 tokens: step time, peak CUDA memory (allocated: live bytes, what the plan
# counts; reserved: what check_fits' allocator slack must cover) vs the memory plan, and model
# FLOP utilisation (2 * params * tokens per forward / step time / card's dense bf16 peak).
# Appends one line to bench/RESULTS.md with date and card. Budget: < 5 minutes.
#   bash bench/gpu_check.sh [PEAK_TFLOPS]   (default 989 = H100/H200 SXM dense bf16)
set -euo pipefail
cd "$(dirname "$0")/.."
PEAK_TFLOPS="${1:-989}" timeout 290 python - <<'PY'
import datetime, os, time, torch
from pgprune.masks import UnitCosts
from pgprune.memory import allocator_slack, estimate_pg_memory
from pgprune.models.adapter import get_adapter
from pgprune.models.synthetic import synthetic_model
from pgprune.policy.loop import PGConfig, run_policy_gradient
from pgprune.policy.probabilities import UnitLayout
assert torch.cuda.is_available(), "needs a CUDA GPU"
K, B, T, STEPS = 2, 8, 128, 20
model = synthetic_model("llama", dtype=torch.bfloat16, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=T).cuda()
costs = UnitCosts.from_adapter(get_adapter(model)); layout = UnitLayout.build(costs, ("channel", "head"))
calib = torch.randint(0, 128256, (256, T))
cfg = PGConfig(sparsity=0.3, steps=STEPS + 2, k=K, batch_size=B, lr_schedule="constant", eval_every=10**6, checkpoint_every=10**6)
s0 = layout.present.float() * 0.7
run_policy_gradient(model, calib, s0, layout, costs, cfg, progress=False, stop_after=2)  # warm-up
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated()
t0 = time.perf_counter()
run_policy_gradient(model, calib, s0, layout, costs, cfg, progress=False)
torch.cuda.synchronize(); sec = (time.perf_counter() - t0) / cfg.steps
params = sum(p.numel() for p in model.parameters())
peak = torch.cuda.max_memory_allocated()
reserved = torch.cuda.max_memory_reserved()  # what the caching allocator held (live + cached blocks)
est = estimate_pg_memory(model, k=K, batch_size=B, seqlen=T, nsamples=0, metric_nsamples=0)
act_plan = est["breakdown"]["pg_step_activations"] + est["breakdown"]["probabilities_and_masks"]
slack = allocator_slack(est, "cuda")
mfu = 2 * params * K * B * T / sec / (float(os.environ["PEAK_TFLOPS"]) * 1e12)
line = (f"| {datetime.date.today()} | {torch.cuda.get_device_name()} | gpu_check: synthetic llama {params/1e9:.2f}B bf16, "
        f"K={K} B={B} T={T} | {sec*1e3:.1f} ms/step | peak {peak/2**30:.2f} GiB (step {(peak-base)/2**30:.2f} GiB, "
        f"plan {act_plan/2**30:.2f} GiB; reserved {(reserved-base)/2**30:.2f} GiB vs plan + allocator slack "
        f"{(act_plan+slack)/2**30:.2f} GiB) | MFU {mfu:.3f} (peak {os.environ['PEAK_TFLOPS']} TFLOPS; includes "
        f"the CPU-side projection) |\n")
print(line)
with open("bench/RESULTS.md", "a") as f:
    f.write(line)
PY
