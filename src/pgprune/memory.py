"""Memory plan of a policy-gradient run: will it fit, and if not, what to change.

`estimate_pg_memory` adds up, from the model's shape alone:

- weights: every parameter in the run's dtype;
- one PG step: the gated forward of K*B rows x seqlen without gradients. What is alive at the
  peak is the residual stream plus the larger of the attention block (normed input, q/k/v, the
  rotary temporaries, the attention output and its masked copy, the o_proj output) and the MLP
  block (normed input, gate/up/act/product and its masked copy). With eager attention the
  [rows, heads, T, T] scores and their softmax are added; SDPA (the default) does not store them.
  Then the chunked LM-head loss (lm_loss.py): the final hidden states, their flattened copy, and
  for one chunk of at most 4096 tokens the logits in the model dtype, their fp32 copy and the
  fp32 log-softmax inside the cross entropy. Freed layer activations stay with the allocator
  (glibc heap, CUDA cache), so logits chunks of 32 MiB or more add to the layer peak instead of
  reusing it (this is what measured peaks show on the CPU);
- probabilities, K sampled masks (all ranks' when distributed), the gated-forward multipliers;
- the calibration pool (int64 token ids);
- the metric initialisation, when one runs (metrics/calibration.py): the layer inputs and outputs
  of every calibration window (2 x N x T x hidden) plus one layer's activations for a mini-batch.
  It runs before the PG loop and is freed before it, so the peak is the larger of the two phases.

The per-token coefficients come from reading the Hugging Face LLaMA forward and were checked
against measured peak resident memory on the CPU (tests/test_memory.py, within 20 %). Allocator
slack, CUDA context (~0.5 GiB) and the periodic hard-mask perplexity (batch 8 x eval seqlen,
smaller than a PG step for the defaults) are not included: `check_fits` keeps a 10 % margin.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from pgprune.errors import ConfigError
from pgprune.gating import FORWARDS

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
BIG_ALLOC = 32 * 1024**2  # glibc's largest mmap threshold: bigger blocks never reuse freed heap
SAFETY = 1.10  # headroom for allocator slack and what the plan leaves out


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


def _layer_peak_elems(d: dict, rows: int, t: int) -> float:
    """Elements alive at the peak of one gated decoder layer, besides the residual stream."""
    tok = rows * t
    h, i, q, kv = d["hidden"], d["intermediate"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    # attention: normed x, q/k/v, rotary temporaries of q and k (~2 more q+k), attention output,
    # its contiguous copy and the head-mask copy feeding o_proj, o_proj output
    attn = tok * (h + (q + 2 * kv) + 2 * (q + kv) + 4 * q + h)
    if d["attn"] == "eager":
        attn += 2 * rows * d["heads"] * t * t  # scores and softmax
    # MLP: normed x, gate, act(gate), up, their product and its channel-mask copy, down output
    # (six intermediate-wide tensors: what the measured peaks show, freed blocks are not reused
    # in the order they are freed)
    mlp = tok * (h + 6 * i + h)
    return max(attn, mlp)


def estimate_pg_memory(model_or_config, dtype=None, k: int = 2, batch_size: int = 8, seqlen: int = 128,
                       units=("channel", "head"), *, nsamples: int = 1024, metric_nsamples: int = 128,
                       metric_batch_size: int = 8, world_size: int = 1, chunk_tokens: int = 4096,
                       forward: str = "gated") -> dict:
    """Bytes a policy-gradient run needs on one device (one rank), with a breakdown.

    `model_or_config`: a model (its exact parameter count and dtype are used) or a HF config.
    `dtype`: the run's dtype (default: the model's, else fp32). `metric_nsamples`: windows of the
    metric initialisation (0 when the init is "constant"). Returns {"total_bytes", "breakdown"
    (bytes per item), "phases" (bytes of the PG step and the metric init), "inputs"}.
    `forward`: "gated" (the K masks in one forward of K*B rows) or "gathered" (one mask at a time
    through a pruned view: B rows, plus at most one copy of the decoder weights).
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
    residual = tok * h * e
    layer = _layer_peak_elems(d, rows, t) * e
    chunk = min(chunk_tokens, rows * (t - 1))
    # final hidden states + flattened copy + per-token NLL, then one chunk of logits (dtype),
    # their fp32 copy (same tensor when the model is fp32) and the fp32 log-softmax
    logits = [chunk * v * e] + ([chunk * v * 4] if e != 4 else []) + [chunk * v * 4]
    head_small = tok * h * e + rows * (t - 1) * (h * e + 4) + sum(x for x in logits if x < BIG_ALLOC)
    head_big = sum(x for x in logits if x >= BIG_ALLOC)
    head = head_small + head_big
    # Freed layer activations stay with the allocator (glibc heap, CUDA cache); small head buffers
    # reuse them, large logits chunks get fresh memory on top (measured: see module docstring).
    pg_step = residual + max(layer, head_small) + head_big
    gathered = _layer_params(d) * e if forward == "gathered" else 0  # the kept weights of one pruned view
    pg_step += gathered
    n_units = d["layers"] * (d["intermediate"] + d["kv_heads"] + 2)
    probs = n_units * 4 * (3 + k * world_size) + 2 * d["layers"] * (d["intermediate"] + d["heads"] * d["head_dim"]) * k * e
    pool = nsamples * seqlen * 8
    metric = 0
    if metric_nsamples:
        mb = min(metric_batch_size, metric_nsamples)
        metric = 2 * metric_nsamples * t * h * e + (mb * t * h + _layer_peak_elems(d, mb, t)) * e
        metric += d["layers"] * 8 * 2 * (2 * h + d["intermediate"] + d["heads"] * d["head_dim"])  # float64 stats
    breakdown = {"weights": weights, "pg_step_activations": pg_step, "pg_residual_stream": residual,
                 "pg_layer_peak": layer, "pg_lm_head_loss": head, "probabilities_and_masks": probs,
                 "calibration_pool": pool, "metric_init": metric, "gathered_weights": gathered}
    total = weights + pool + probs + max(pg_step, metric)
    return {"total_bytes": int(total), "breakdown": {k_: int(x) for k_, x in breakdown.items()},
            "phases": {"pg_step": int(pg_step), "metric_init": int(metric)},
            "inputs": {"parameters": int(params), "dtype_bytes": e, "k": k, "batch_size": batch_size,
                       "seqlen": seqlen, "units": list(units) if not isinstance(units, str) else units,
                       "nsamples": nsamples, "metric_nsamples": metric_nsamples, "world_size": world_size,
                       "forward": forward,
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


def check_fits(estimate: dict, device=None, *, weights_loaded: bool = False) -> None:
    """Raise ConfigError when the plan (with a 10 % margin) exceeds the free memory of `device`.

    `weights_loaded`: the model already sits on the device, so its weights are not counted again
    (free memory was measured after loading). Unknown availability (e.g. mps) passes."""
    need = estimate["total_bytes"] - (estimate["breakdown"]["weights"] if weights_loaded else 0)
    need = int(need * SAFETY)
    have, source = available_bytes(device)
    if have < 0 or need <= have:
        return
    b, i = estimate["breakdown"], estimate["inputs"]
    items = ", ".join(f"{name} {b[name] / GIB:.2f}" for name in
                      ("weights", "pg_step_activations", "metric_init", "calibration_pool") if b[name])
    raise ConfigError(
        f"the policy-gradient run needs about {need / GIB:.2f} GiB {'more ' if weights_loaded else ''}on {device} "
        f"(GiB: {items}; +10 % margin) but only {have / GIB:.2f} GiB is available ({source}). "
        f"The step runs K*B = {i['k']}x{i['batch_size']} rows of {i['seqlen']} tokens: lower --batch-size, --k or "
        f"--seqlen, load in bf16 (--dtype bf16), fewer --nsamples, or spread the model over devices (device_map)")


def measure_peak_growth(fn: Callable[[], object], repeat: int = 1) -> tuple[int, object]:
    """(peak resident-memory growth in bytes while `fn` runs `repeat` times in a row, the last
    result), on Linux.

    The high-water mark (VmHWM, via /proc/self/clear_refs) is reset once, after glibc's free heap
    was trimmed, so earlier peaks and freed memory are not counted. Where one run's blocks land in
    the heap depends on the free lists earlier runs left, so the peak of a single run after a trim
    varies by whole activation tensors (measured on the same PG step: 58-76 MiB, while torch's own
    tensor accounting is 40.3 MiB every time). Over several consecutive runs without a trim in
    between, the mark settles at the footprint a loop of such runs holds, which is what the memory
    plan predicts and what a PG run needs."""
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
