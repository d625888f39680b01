"""Inference speed and memory of a causal LM: prefill throughput, cached decoding, peak memory.

One run = a prefill forward over `batch_size x prompt_len` random tokens (building the KV cache, as
`generate` does: logits only for the last position), then `new_tokens` greedy decoding steps of
one token each with the cache (a manual loop, so every run decodes exactly `new_tokens` steps and
no end-of-sequence token can stop it early). `warmup` runs are discarded, then `repeats` runs are
timed; reported numbers are medians over the repeats.

`compare_speed` measures several models INTERLEAVED in one process (repeat r runs every model once,
in a rotating order) and reports each model's ratio to the baseline as the median of the
per-repeat ratios: machine load that drifts during the benchmark hits both members of a pair
alike, so it cancels in the ratio.

Memory: on CUDA, `torch.cuda.max_memory_allocated` (peak over the timed runs, all tensors of the
process) and its rise above the memory allocated before the run (activations + KV cache). On the
CPU (Linux), the process's peak resident set size (VmHWM, reset before each run through
/proc/self/clear_refs) and its rise above the resident size before the run; elsewhere None.
"""

from __future__ import annotations

import inspect
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from pgprune.errors import ConfigError

SCHEMA_KEYS = ("name", "device", "dtype", "batch_size", "prompt_len", "new_tokens", "warmup", "repeats",
               "prefill_tokens_per_s", "decode_tokens_per_s", "latency_ms_per_token", "prefill_s",
               "decode_s", "peak_memory_bytes", "working_memory_bytes", "memory_method",
               "param_bytes", "num_params")


@dataclass
class SpeedResult:
    name: str
    device: str
    dtype: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    warmup: int
    repeats: int
    prefill_tokens_per_s: float  # median over repeats of batch*prompt_len / prefill seconds
    decode_tokens_per_s: float  # median of batch*new_tokens / decode seconds
    latency_ms_per_token: float  # median of decode seconds / new_tokens (per sequence step)
    prefill_s: list[float]  # per repeat, in run order
    decode_s: list[float]
    peak_memory_bytes: int | None
    working_memory_bytes: int | None
    memory_method: str | None
    param_bytes: int
    num_params: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SpeedComparison:
    baseline: str
    results: dict[str, SpeedResult]
    # name -> {"prefill_speedup", "decode_speedup", "latency_ratio", "param_bytes_ratio",
    #          "working_memory_ratio", "peak_memory_ratio", and the per-repeat lists}
    ratios: dict[str, dict]
    order: list[list[str]] = field(default_factory=list)  # which model ran when, per repeat

    def to_dict(self) -> dict:
        return {"kind": "speed_comparison", "baseline": self.baseline, "interleaved": True,
                "order": self.order, "results": {k: v.to_dict() for k, v in self.results.items()},
                "ratios": self.ratios}


# --- memory probes --------------------------------------------------------------------------------
def _rss_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    """glibc keeps freed memory mapped; without a trim a timed run after the warm-up reuses it and
    its working memory reads as ~0."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _MemoryProbe:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.method = "cuda_max_memory_allocated"
        elif _rss_bytes("VmHWM") is not None and os.access("/proc/self/clear_refs", os.W_OK):
            self.method = "cpu_peak_rss"
        else:
            self.method = None

    def start(self) -> int | None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self.method == "cpu_peak_rss":
            _malloc_trim()  # hand freed heap pages back, so this run's allocations show up in the RSS
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError:
                self.method = None
                return None
            return _rss_bytes("VmRSS")
        return None

    def peak(self) -> int | None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.method == "cpu_peak_rss":
            return _rss_bytes("VmHWM")
        return None


# --- one timed run --------------------------------------------------------------------------------
def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None:
        raise ConfigError(f"{type(model).__name__} has no parameters; pass a causal LM")
    return p.device, p.dtype


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _vocab_size(model: torch.nn.Module) -> int:
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None)
    if not v:
        raise ConfigError(f"{type(model).__name__} has no config.vocab_size; pass a Hugging Face causal LM")
    return int(v)


def param_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes, count) of the model's parameters, shared tensors counted once."""
    seen, nbytes, count = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        nbytes += p.numel() * p.element_size()
        count += p.numel()
    return nbytes, count


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers >= 5.24 names the KV-cache argument `cache` (`past_key_values` is deprecated)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _one_run(model, ids: torch.Tensor, new_tokens: int, timer: Callable[[], float],
             sync: Callable[[], None], logits_to_keep: bool) -> tuple[float, float, torch.Tensor]:
    """Seconds for (prefill, decode of new_tokens steps), and the greedy tokens [batch, new_tokens + 1]
    (the first comes from the prefill logits)."""
    extra = {"logits_to_keep": 1} if logits_to_keep else {}
    cache_kw = _cache_kwarg(model)
    with torch.inference_mode():
        sync()
        t0 = timer()
        out = model(input_ids=ids, use_cache=True, **extra)
        sync()
        t1 = timer()
        past = _cache_of(out)
        nxt = out.logits[:, -1:].argmax(-1)
        tokens = [nxt]
        sync()
        t2 = timer()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: past})
            past = _cache_of(out)
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(nxt)
        sync()
        t3 = timer()
    return t1 - t0, t3 - t2, torch.cat(tokens, dim=1)


class _Runner:
    """Everything needed to time one model repeatedly on fixed inputs."""

    def __init__(self, name, model, ids_cpu, new_tokens, timer):
        self.name, self.model, self.new_tokens, self.timer = name, model, new_tokens, timer
        self.device, self.dtype = _model_device_dtype(model)
        self.ids = ids_cpu.to(self.device)
        self.sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        self.logits_to_keep = _accepts(model, "logits_to_keep")
        self.memory = _MemoryProbe(self.device)
        self.prefill, self.decode, self.peaks, self.working = [], [], [], []

    def run(self, timed: bool) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            before = self.memory.start() if timed else None
            p, d, self.tokens = _one_run(self.model, self.ids, self.new_tokens, self.timer, self.sync, self.logits_to_keep)
            peak = self.memory.peak() if timed else None
        finally:
            self.model.train(was_training)
        if timed:
            self.prefill.append(p)
            self.decode.append(d)
            if peak is not None:
                self.peaks.append(peak)
                if before is not None:
                    self.working.append(max(0, peak - before))

    def result(self, batch_size, prompt_len, warmup) -> SpeedResult:
        b, n = batch_size, self.new_tokens
        nbytes, count = param_bytes(self.model)
        return SpeedResult(
            name=self.name, device=str(self.device), dtype=str(self.dtype).replace("torch.", ""),
            batch_size=b, prompt_len=prompt_len, new_tokens=n, warmup=warmup, repeats=len(self.prefill),
            prefill_tokens_per_s=statistics.median(b * prompt_len / t for t in self.prefill),
            decode_tokens_per_s=statistics.median(b * n / t for t in self.decode),
            latency_ms_per_token=statistics.median(1000.0 * t / n for t in self.decode),
            prefill_s=list(self.prefill), decode_s=list(self.decode),
            peak_memory_bytes=max(self.peaks) if self.peaks else None,
            working_memory_bytes=max(self.working) if self.working else None,
            memory_method=self.memory.method if self.peaks else None,
            param_bytes=nbytes, num_params=count)


def _check(batch_size, prompt_len, new_tokens, warmup, repeats) -> None:
    for name, v, lo in (("batch_size", batch_size, 1), ("prompt_len", prompt_len, 1),
                        ("new_tokens", new_tokens, 1), ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")


def _inputs(vocab: int, batch_size: int, prompt_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, prompt_len), generator=g)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def measure_speed(model: torch.nn.Module, *, name: str = "model", batch_size: int = 1, prompt_len: int = 128,
                  new_tokens: int = 32, warmup: int = 1, repeats: int = 5, seed: int = 0,
                  timer: Callable[[], float] = time.perf_counter, progress: bool = False) -> SpeedResult:
    """Time one model (see the module docstring for what a run is)."""
    _check(batch_size, prompt_len, new_tokens, warmup, repeats)
    runner = _Runner(name, model, _inputs(_vocab_size(model), batch_size, prompt_len, seed), new_tokens, timer)
    with _progress(warmup + repeats, f"speed {name}", progress) as bar:
        for i in range(warmup + repeats):
            runner.run(timed=i >= warmup)
            bar.update()
    return runner.result(batch_size, prompt_len, warmup)


def _median_ratio(num: list[float], den: list[float]) -> float | None:
    pairs = [a / b for a, b in zip(num, den) if b]
    return statistics.median(pairs) if pairs else None


def compare_speed(models: dict[str, torch.nn.Module], *, baseline: str | None = None, batch_size: int = 1,
                  prompt_len: int = 128, new_tokens: int = 32, warmup: int = 1, repeats: int = 5,
                  seed: int = 0, timer: Callable[[], float] = time.perf_counter,
                  progress: bool = False) -> SpeedComparison:
    """Time `models` interleaved on the same inputs; ratios against `baseline` (default: the first).

    speedup = baseline seconds / model seconds within the same repeat (>1: faster than baseline),
    reported as the median over repeats; latency_ratio = model / baseline latency (<1: faster).
    """
    if not models:
        raise ConfigError("compare_speed needs at least one model")
    names = list(models)
    baseline = names[0] if baseline is None else baseline
    if baseline not in models:
        raise ConfigError(f"baseline {baseline!r} is not one of the models: {', '.join(names)}")
    _check(batch_size, prompt_len, new_tokens, warmup, repeats)
    vocab = min(_vocab_size(m) for m in models.values())
    ids = _inputs(vocab, batch_size, prompt_len, seed)
    runners = {n: _Runner(n, m, ids, new_tokens, timer) for n, m in models.items()}
    order: list[list[str]] = []
    with _progress((warmup + repeats) * len(names), "speed " + " vs ".join(names), progress) as bar:
        for i in range(warmup + repeats):
            # rotate who goes first so no model always runs right after another one's cache churn
            k = i % len(names)
            this = names[k:] + names[:k]
            for n in this:
                runners[n].run(timed=i >= warmup)
                bar.update()
            if i >= warmup:
                order.append(this)
    results = {n: r.result(batch_size, prompt_len, warmup) for n, r in runners.items()}
    base = runners[baseline]
    ratios = {}
    for n, r in runners.items():
        pre = [b / m for b, m in zip(base.prefill, r.prefill) if m]
        dec = [b / m for b, m in zip(base.decode, r.decode) if m]
        ratios[n] = {
            "prefill_speedup": statistics.median(pre) if pre else None,
            "decode_speedup": statistics.median(dec) if dec else None,
            "latency_ratio": _median_ratio(r.decode, base.decode),
            "param_bytes_ratio": results[n].param_bytes / results[baseline].param_bytes,
            "working_memory_ratio": _ratio(results[n].working_memory_bytes, results[baseline].working_memory_bytes),
            "peak_memory_ratio": _ratio(results[n].peak_memory_bytes, results[baseline].peak_memory_bytes),
            "prefill_speedup_per_repeat": pre,
            "decode_speedup_per_repeat": dec,
        }
    return SpeedComparison(baseline=baseline, results=results, ratios=ratios, order=order)


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def machine_info() -> dict:
    """What a benchmark number depends on, recorded next to it."""
    import transformers

    info = {"platform": platform.platform(), "python": sys.version.split()[0], "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__, "cuda": None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["processor"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:  # CPU timings on a shared machine depend on what else runs
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        pass
    if torch.cuda.is_available():
        info["cuda"] = {"device": torch.cuda.get_device_name(0), "version": torch.version.cuda,
                        "count": torch.cuda.device_count()}
    try:
        import lm_eval

        info["lm_eval"] = lm_eval.__version__
    except ImportError:
        pass
    return info


def _mb(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def format_speed_table(result: SpeedResult | SpeedComparison | dict) -> str:
    """One row per model; with a comparison, the paired ratios to the baseline as well."""
    d = result.to_dict() if hasattr(result, "to_dict") else result
    rows = d["results"] if "results" in d else {d["name"]: d}
    ratios = d.get("ratios", {})
    first = next(iter(rows.values()))
    lines = [f"speed: batch {first['batch_size']} x prompt {first['prompt_len']} tokens, "
             f"{first['new_tokens']} decode steps, median of {first['repeats']} (warm-up {first['warmup']}), "
             f"{first['device']} {first['dtype']}" + (", interleaved" if ratios else "")]
    head = f"{'model':<14}{'prefill tok/s':>14}{'decode tok/s':>14}{'ms/token':>10}{'params MB':>11}{'work MB':>9}{'peak MB':>9}"
    if ratios:
        head += f"{'prefill x':>11}{'decode x':>10}"
    lines.append(head)
    for n, r in rows.items():
        line = (f"{n:<14}{r['prefill_tokens_per_s']:>14.1f}{r['decode_tokens_per_s']:>14.1f}"
                f"{r['latency_ms_per_token']:>10.2f}{_mb(r['param_bytes']):>11}"
                f"{_mb(r['working_memory_bytes']):>9}{_mb(r['peak_memory_bytes']):>9}")
        if ratios:
            q = ratios[n]
            line += (f"{q['prefill_speedup']:>11.3f}" if q["prefill_speedup"] else f"{'-':>11}")
            line += (f"{q['decode_speedup']:>10.3f}" if q["decode_speedup"] else f"{'-':>10}")
        lines.append(line)
    if ratios:
        lines.append(f"(x = speed-up over {d['baseline']}: median of per-repeat paired ratios)")
    return "\n".join(lines)
