"""Memory plan of a policy-gradient run: will it fit, and if not, what to change.

`estimate_pg_memory` adds up, from the model's shape alone, the bytes of the tensors that are
alive at the same time (live bytes, what `torch.cuda.max_memory_allocated` counts on a GPU):

- weights: every parameter in the run's dtype;
- one PG step: the gated forward of R = K*B rows x T tokens without gradients, then the chunked
  LM-head loss; the step's peak is the larger of the two phases.
  Decoder (per token, in the model dtype): the embeddings (kept by the model's forward) and the
  layer input (the residual), 2*hidden, plus the larger of
    attention: normed input + max(q projection and 3 rotary temporaries of q + k + v,
               q and rotated q + k, v, rotated k and 3 rotary temporaries of k,
               the attention output, its masked copy, o_proj's output + rotated q, k and v)
               = hidden + max(4q + 2kv, 2q + 5kv, 3q + 2kv + hidden)   (SDPA; q, kv: widths);
               eager attention instead keeps the K/V repeated to the query heads, the causal mask
               and two [R, heads, T, T] score tensors (scores and softmax);
    MLP: the attention block's residual sum + normed input + max(act(gate), up and their product;
         the product, its channel-masked copy and down_proj's output) = 2*hidden + max(3I, 2I + hidden).
  LM head (lm_loss.py): the final hidden states, their flattened copy, the fp32 NLLs and int64
  labels, and for a chunk of at most 4096 tokens the fp32 logits and the fp32 log-softmax; with
  more than one chunk in bf16/fp16, the next chunk's logits in the model dtype while the previous
  fp32 chunk is still bound. Plus the K-times repeated int64 token ids.
- probabilities, K sampled masks (all ranks' when distributed), the gated-forward multipliers;
- the calibration pool (int64 token ids);
- the metric initialisation, when one runs (metrics/calibration.py): the layer inputs and outputs
  of every calibration window (2 x N x T x hidden) plus one layer's activations for a mini-batch.
  It runs before the PG loop and is freed before it, so the peak is the larger of the two phases.

The coefficients come from reading the Hugging Face LLaMA forward (transformers 5) and match the
live bytes of a PG step measured on the CPU (tests/test_memory.py, bench/memory_plan.py: torch's
profiler and the resident memory of a process whose allocator returns freed blocks at once).

The plan is not what a process holds: allocators keep freed blocks (glibc's heap on the CPU,
torch's caching allocator on CUDA). `check_fits` adds that, explicitly: `ALLOCATOR_SLACK` times
the decoder's working set (the blocks an allocator keeps and cannot hand to the larger LM-head
chunks), then a 10 % margin for what the plan leaves out (CUDA context and kernel workspaces,
the periodic hard-mask perplexity, Python objects).
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from pgprune.errors import ConfigError
from pgprune.gating import FORWARDS
from pgprune.reconstruction import may_use_sequential_inputs

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
SAFETY = 1.10  # headroom for what the plan leaves out (see the module doc)
# Freed blocks an allocator keeps, as a multiple of the PG step's decoder working set
# (`pg_decoder` in the breakdown), which is what check_fits adds to the live plan.
# CPU, glibc malloc: blocks under its mmap threshold (which rises to 32 MiB as large blocks are
# freed) come from the heap, which fragments and is not given back; big logits chunks are mmapped
# and returned. What a process held above the live plan (bench/memory_plan.py, glibc defaults,
# fp32; it varies between processes and grows slowly with the number of steps, --loop 512 to see)
# was 0.8-1.45x the decoder working set for test_memory's MLP-bound case, up to ~2x for its
# LM-head-bound case, 2.2x for SmolLM2-135M after 16 steps; 3x leaves room for that (beyond it,
# only the 10 % margin on the whole total; a long SmolLM2 run is not measured yet).
# CUDA, torch's caching allocator: freed blocks stay reserved, but before reporting out of memory
# it returns its free cached segments to the driver and retries, so what is lost is blocks split
# inside partly used segments; one decoder working set is allowed (not measured here: no GPU;
# bench/gpu_check.sh prints max_memory_reserved against plan + this slack).
ALLOCATOR_SLACK = {"cpu": 3.0, "cuda": 1.0}


def _dtype_bytes(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty(0, dtype=dtype).element_size()
    key = str(dtype).replace("torch.", "")
    if key not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r} for the memory plan; use fp32, bf16 or fp16")
    return DTYPE_BYTES[key]


def _shape(model_or_config) -> tuple[dict, int | None, object]:
    """(dimensions, exact parameter count if a model was given, the model's dtype or None)."""
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "get_text_config", lambda: config)()
    h = int(config.hidden_size)
    nh = int(config.num_attention_heads)
    dims = {
        "hidden": h,
        "intermediate": int(config.intermediate_size),
        "layers": int(config.num_hidden_layers),
        "heads": nh,
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or nh),
        "head_dim": int(getattr(config, "head_dim", None) or h // nh),
        "vocab": int(config.vocab_size),
        "tied": bool(getattr(config, "tie_word_embeddings", False)),
        "attn": getattr(config, "_attn_implementation", None) or "sdpa",
    }
    params, dtype = None, None
    if isinstance(model_or_config, torch.nn.Module):
        seen = {}
        for p in model_or_config.parameters():
            seen[id(p)] = p.numel()  # tied weights once
            dtype = p.dtype
        params = sum(seen.values())
    return dims, params, dtype


def _layer_params(d: dict) -> int:
    h, i, nh, nkv, hd = d["hidden"], d["intermediate"], d["heads"], d["kv_heads"], d["head_dim"]
    return d["layers"] * (h * nh * hd * 2 + h * nkv * hd * 2 + 3 * h * i + 2 * h)


def _config_params(d: dict) -> int:
    return _layer_params(d) + d["vocab"] * d["hidden"] * (1 if d["tied"] else 2) + d["hidden"]


def _layer_peak_bytes(d: dict, rows: int, t: int, e: int) -> int:
    """Bytes alive at the peak of one gated decoder layer, besides the embeddings and the layer
    input (see the module doc for what each term is)."""
    tok = rows * t
    h, i, q, kv = d["hidden"], d["intermediate"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    if d["attn"] == "eager":
        repeated = 2 * q if kv < q else 0  # repeat_kv to the query heads
        scores = rows * d["heads"] * t * t  # elements of one [rows, heads, T, T] tensor
        # scores and the fp32 softmax (in bf16/fp16 also the scores' fp32 copy softmax makes), the
        # causal mask [rows, 1, T, T]
        attn = tok * (h + q + 2 * kv + repeated) * e + scores * (8 if e == 4 else e + 8) + rows * t * t * e
        attn = max(attn, tok * (h + 3 * q + 2 * kv + h + repeated) * e)
    else:
        attn = tok * (h + max(4 * q + 2 * kv, 2 * q + 5 * kv, 3 * q + 2 * kv + h)) * e
    mlp = tok * (2 * h + max(3 * i, 2 * i + h)) * e
    return max(attn, mlp)


def estimate_pg_memory(model_or_config, dtype=None, k: int = 2, batch_size: int = 8, seqlen: int = 128,
                       units=("channel", "head"), *, nsamples: int = 1024, metric_nsamples: int = 128,
                       metric_batch_size: int = 8, world_size: int = 1, chunk_tokens: int = 4096,
                       forward: str = "gated", reconstruct: str = "bias", pg_reconstruct: str = "bias",
                       refit_nsamples: int = 128, reconstruct_inputs: str = "auto",
                       metric_covariance: bool = False) -> dict:
    """Bytes a policy-gradient run needs on one device (one rank), with a breakdown.

    `model_or_config`: a model (its exact parameter count and dtype are used) or a HF config.
    `dtype`: the run's dtype (default: the model's, else fp32). `metric_nsamples`: windows of the
    metric initialisation (0 when the init is "constant"). Returns {"total_bytes", "breakdown"
    (bytes per item), "phases" (bytes of the PG step and the metric init), "inputs"}.
    `forward`: "gated" (the K masks in one forward of K*B rows) or "gathered" (one mask at a time
    through a pruned view: B rows, plus at most one copy of the decoder weights).
    `reconstruct` / `pg_reconstruct` (none | bias | lsq): least squares needs float64 input covariances
    (`reconstruction_covariances`): PG scoring with it holds every layer's, and their damped precision
    matrices, for the whole loop plus one solve's temporaries per step; the final refit holds one
    layer's during its calibration walk over `refit_nsamples` windows (`reconstruct_inputs`
    sequential, and auto unless only whole layers can go: also one layer's o_proj and down_proj inputs of
    every window). PG scoring by least
    squares with layer units also holds the dense residual stream for its removed runs' regressions
    (`run_regressions`). `metric_covariance`: the init metric reads one layer's input covariances at a time
    (`obs`): that layer's covariances and a removal's float64 temporaries join the metric's walk.
    """
    if k < 1 or batch_size < 1 or seqlen < 2:
        raise ConfigError(f"memory plan needs K >= 1, batch size >= 1 and seqlen >= 2 (got {k}, {batch_size}, {seqlen})")
    d, params, model_dtype = _shape(model_or_config)
    e = _dtype_bytes(dtype if dtype is not None else (model_dtype or torch.float32))
    params = params if params is not None else _config_params(d)
    if forward not in FORWARDS:
        raise ConfigError(f"forward must be one of {', '.join(FORWARDS)}, got {forward!r}")
    rows, t, h, v = (k if forward == "gated" else 1) * batch_size, seqlen, d["hidden"], d["vocab"]
    tok = rows * t

    weights = params * e
    residual = 2 * tok * h * e  # the embeddings and the layer input
    layer = _layer_peak_bytes(d, rows, t, e)
    decoder = residual + layer
    head_tokens = rows * (t - 1)
    chunk = min(chunk_tokens, head_tokens)
    # fp32 logits and log-softmax of one chunk; from the second chunk on, the next chunk's logits in
    # the model dtype exist while the previous fp32 chunk is still bound (fp32: .float() is a no-op)
    logits = chunk * v * (8 if e == 4 or head_tokens <= chunk else 8 + e)
    # final hidden states, their flattened copy [R*(T-1), H], fp32 NLLs, int64 labels
    head = tok * h * e + head_tokens * (h * e + 4 + 8) + logits
    ids = tok * 8  # the K-times repeated int64 token ids
    pg_step = max(decoder, head) + ids
    gathered = _layer_params(d) * e if forward == "gathered" else 0  # the kept weights of one pruned view
    pg_step += gathered
    n_units = d["layers"] * (d["intermediate"] + d["kv_heads"] + 2)
    probs = n_units * 4 * (3 + k * world_size) + 2 * d["layers"] * (d["intermediate"] + d["heads"] * d["head_dim"]) * k * e
    pool = nsamples * seqlen * 8
    def walk(n: int) -> int:  # a layer-by-layer calibration walk over n windows: their inputs and outputs
        mb = min(metric_batch_size, n)
        return 2 * n * t * h * e + mb * t * h * e + _layer_peak_bytes(d, mb, t, e)

    metric = 0
    if metric_nsamples:
        metric = walk(metric_nsamples) + d["layers"] * 8 * 2 * (2 * h + d["intermediate"] + d["heads"] * d["head_dim"])  # float64 stats
    # least squares: float64 covariances of o_proj's and down_proj's inputs, per layer; a solve holds
    # about three kept x kept float64 blocks (the indexed covariances and the Cholesky factor). PG's
    # per-mask refits also hold each projection's damped precision matrix (lsq_columns(precision=True))
    attn_in, mlp_in = d["heads"] * d["head_dim"], d["intermediate"]
    layer_cov = 8 * (attn_in ** 2 + mlp_in ** 2)
    solve = 3 * 8 * max(attn_in, mlp_in) ** 2
    held_cov = 2 * d["layers"] * layer_cov if pg_reconstruct == "lsq" else 0
    if pg_reconstruct == "lsq":
        pg_step += solve
    if metric_nsamples and metric_covariance:  # collected with the walk, dropped once the layer is scored
        metric += layer_cov + solve
    # sequential inputs hold one layer's projection inputs of every window (collect_block_stats_sequentially)
    kinds = units.split(",") if isinstance(units, str) else list(units)
    sequential = may_use_sequential_inputs(reconstruct_inputs, kinds)
    held_inputs = refit_nsamples * t * (attn_in + mlp_in) * e if sequential else 0
    if sequential and "layer" in kinds:  # a run's regression output, held until its end
        held_inputs += refit_nsamples * t * h * e
    final_refit = walk(refit_nsamples) + held_inputs + layer_cov + solve if reconstruct == "lsq" else 0
    run_regressions = 0
    if pg_reconstruct == "lsq" and "layer" in kinds:  # PG's per-mask run regressions (RunRegressions): the
        # dense residual stream after every layer and as many bytes of cached cross-covariances; computing
        # one holds x_p and delta of every window and a float64 accumulator
        run_regressions = 2 * (d["layers"] + 1) * refit_nsamples * t * h * e
        pg_step += refit_nsamples * t * (mlp_in + h) * e + 8 * mlp_in * h
    if reconstruct == "lsq" and "layer" in kinds:  # removed runs regressed: a walk holding x_p of every
        # window, a copy of h_p and the joint [x_p, delta] covariance (collect_removed_run_stats)
        runs = walk(refit_nsamples) + refit_nsamples * t * (mlp_in + h) * e + 8 * (mlp_in + h) ** 2 + solve
        final_refit = max(final_refit, runs)
    breakdown = {"weights": weights, "pg_step_activations": pg_step, "pg_residual_stream": residual,
                 "pg_layer_peak": layer, "pg_decoder": decoder, "pg_lm_head_loss": head, "probabilities_and_masks": probs,
                 "calibration_pool": pool, "metric_init": metric, "gathered_weights": gathered,
                 "reconstruction_covariances": held_cov, "run_regressions": run_regressions, "final_refit": final_refit}
    total = weights + pool + probs + held_cov + run_regressions + max(pg_step, metric, final_refit)
    return {"total_bytes": int(total), "breakdown": {k_: int(x) for k_, x in breakdown.items()},
            "phases": {"pg_step": int(pg_step), "metric_init": int(metric), "final_refit": int(final_refit)},
            "inputs": {"parameters": int(params), "dtype_bytes": e, "k": k, "batch_size": batch_size,
                       "seqlen": seqlen, "units": list(units) if not isinstance(units, str) else units,
                       "nsamples": nsamples, "metric_nsamples": metric_nsamples, "world_size": world_size,
                       "forward": forward, "reconstruct": reconstruct, "pg_reconstruct": pg_reconstruct,
                       "reconstruct_inputs": reconstruct_inputs,
                       "attention": d["attn"], **{f"model_{n}": x for n, x in d.items() if n != "attn"}}}


def available_bytes(device) -> tuple[int, str]:
    """(free bytes, where the number comes from) for a torch device."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device} (torch.cuda.mem_get_info)"
    if device.type == "cpu":
        try:
            text = open("/proc/meminfo").read()
        except OSError:
            return -1, "unknown (no /proc/meminfo)"
        return int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024, "MemAvailable in /proc/meminfo"
    return -1, f"unknown for a {device.type} device"


def allocator_slack(estimate: dict, device=None) -> int:
    """Bytes an allocator may keep in freed blocks during the run, on top of the plan's live bytes:
    `ALLOCATOR_SLACK[device type]` times the PG step's decoder working set (0 for other devices)."""
    kind = torch.device(device if device is not None else "cpu").type
    return int(ALLOCATOR_SLACK.get(kind, 0.0) * estimate["breakdown"]["pg_decoder"])


def required_bytes(estimate: dict, device=None, *, weights_loaded: bool = False) -> int:
    """What `check_fits` asks of `device`: (plan + allocator slack) x the 10 % margin, without the
    weights when they are already loaded."""
    need = estimate["total_bytes"] - (estimate["breakdown"]["weights"] if weights_loaded else 0)
    return int((need + allocator_slack(estimate, device)) * SAFETY)


def check_fits(estimate: dict, device=None, *, weights_loaded: bool = False) -> None:
    """Raise ConfigError when the plan plus the allocator's slack (`allocator_slack`), with a 10 %
    margin, exceeds the free memory of `device`.

    `weights_loaded`: the model already sits on the device, so its weights are not counted again
    (free memory was measured after loading). Unknown availability (e.g. mps) passes."""
    need = required_bytes(estimate, device, weights_loaded=weights_loaded)
    have, source = available_bytes(device)
    if have < 0 or need <= have:
        return
    b, i = estimate["breakdown"], estimate["inputs"]
    items = ", ".join(f"{name} {b[name] / GIB:.2f}" for name in
                      ("weights", "pg_step_activations", "metric_init", "calibration_pool") if b[name])
    slack = allocator_slack(estimate, device)
    raise ConfigError(
        f"the policy-gradient run needs about {need / GIB:.2f} GiB {'more ' if weights_loaded else ''}on {device} "
        f"(GiB: {items}; allocator slack {slack / GIB:.2f}; +10 % margin) but only {have / GIB:.2f} GiB is "
        f"available ({source}). "
        f"The step runs K*B = {i['k']}x{i['batch_size']} rows of {i['seqlen']} tokens: lower --batch-size, --k or "
        f"--seqlen, load in bf16 (--dtype bf16), fewer --nsamples, or spread the model over devices (device_map)")


def measure_peak_growth(fn: Callable[[], object], repeat: int = 1) -> tuple[int, object]:
    """(peak resident-memory growth in bytes while `fn` runs `repeat` times in a row, the last
    result), on Linux.

    The high-water mark (VmHWM, via /proc/self/clear_refs) is reset once, after glibc's free heap
    was trimmed, so earlier peaks and freed memory are not counted. Where one run's blocks land in
    the heap depends on the free lists earlier runs left, so the peak of a single run after a trim
    varies by whole activation tensors (measured on the same PG step: 58-76 MiB, while torch's own
    tensor accounting is 40.3 MiB every time). Over consecutive runs without a trim in between the
    mark grows slowly towards the footprint a loop of such runs holds: the plan's live bytes plus
    what `allocator_slack` allows for. With MALLOC_MMAP_THRESHOLD_=65536 in the environment of the
    process (set before it starts), glibc mmaps every block of 64 KiB or more and returns it on
    free, and the growth of a single run is its live bytes, what `estimate_pg_memory` counts."""
    import ctypes
    import gc

    if repeat < 1:
        raise ConfigError(f"repeat must be >= 1, got {repeat}")
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    for _ in range(repeat):
        out = fn()
    return (_status_kb("VmHWM") - before) * 1024, out


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))
