"""Perplexity of a GGUF file with llama.cpp's own forward pass (llama-cpp-python), under the protocol
of DESIGN.md: the same token stream, the same non-overlapping windows (`perplexity.eval_windows`),
the mean NLL over every predicted token (seqlen - 1 per window), exponentiated.

Each window is evaluated from an empty KV cache with logits for every position (`logits_all`), and
the log-softmax is taken here in float64. Tokens come from a Hugging Face tokenizer when one is
given (`tokenizer=`: then the windows are exactly those of `pgprune eval MODEL`), else from
llama.cpp's own tokenizer stored in the GGUF (reported as `tokenizer: llama.cpp`).

llama.cpp is the optional extra `pgprune[llamacpp]` (llama-cpp-python, built from source; see the
README for the build flags that work).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pgprune.errors import ConfigError, ModelLoadError

LLAMA_CPP_REQUIREMENT = "llama-cpp-python==0.3.36"


def require_llama_cpp(purpose: str = "--engine llama.cpp"):
    """The llama_cpp module, or a ConfigError that says what needs it and how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ConfigError(
            f"{purpose} needs llama-cpp-python, which is not installed: install the extra with "
            "`pip install 'pgprune[llamacpp]'` (built from source; with CMAKE_ARGS as in the README / Makefile "
            f"`llamacpp` target), or `{LLAMA_CPP_REQUIREMENT}`") from e
    return llama_cpp


def open_gguf(path: str | Path, n_ctx: int, threads: int | None = None, logits_all: bool = True):
    """A llama_cpp.Llama on `path` (CPU), with room for `n_ctx` tokens per evaluation."""
    llama_cpp = require_llama_cpp()
    path = Path(path)
    if path.suffix != ".gguf" or not path.is_file():
        raise ModelLoadError(f"{path} is not a .gguf file; --engine llama.cpp evaluates GGUF files "
                             "(write one with `pgprune export MODEL --format gguf --out FILE.gguf`)")
    threads = threads or os.cpu_count() or 1
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                               n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                               n_gpu_layers=0, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise ModelLoadError(f"llama.cpp could not load {path} ({type(e).__name__}: {e})") from e


def window_logits(llm, window) -> np.ndarray:
    """float32 [len(window), vocab]: llama.cpp's logits of every position of one window, from an
    empty cache (no BOS added: the window is evaluated as given)."""
    ids = [int(t) for t in window]
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)


def token_nll_from_logits(logits: np.ndarray, window) -> tuple[np.ndarray, np.ndarray]:
    """(NLL float64 [T-1] of tokens 1..T-1, argmax [T-1] of the predicting positions)."""
    x = logits[:-1].astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    logz = np.log(np.exp(x).sum(axis=1))
    targets = np.asarray([int(t) for t in window[1:]])
    nll = logz - x[np.arange(len(targets)), targets]
    return nll, logits[:-1].argmax(axis=1)


class LlamaCppTokenizer:
    """llama.cpp's tokenizer behind the one call pgprune.data makes (`tokenizer(text, ...)`)."""

    def __init__(self, llm):
        self.llm = llm

    def __call__(self, text, return_tensors="pt", add_special_tokens=True):
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=False)

        class _Out:
            input_ids = torch.tensor([ids], dtype=torch.long)

        return _Out()


def perplexity_llamacpp(gguf_path: str | Path, tokens: torch.Tensor, seqlen: int = 128,
                        max_tokens: int | None = None, max_windows: int | None = None, threads: int | None = None,
                        progress: bool = False, dataset: str = "tokens", split: str = "", llm=None):
    """PerplexityResult of a [1, N] token stream under llama.cpp's forward of `gguf_path`."""
    from pgprune.evaluate.perplexity import PerplexityResult, eval_windows

    windows, available = eval_windows(tokens, seqlen, max_tokens, max_windows, None, dataset)
    llm = llm or open_gguf(gguf_path, seqlen, threads)
    ctx = llm.n_ctx()
    if seqlen > ctx:
        raise ConfigError(f"seqlen {seqlen} is larger than llama.cpp's context ({ctx} tokens)")
    n = windows.shape[0]
    total = 0.0
    start = time.perf_counter()
    for w in tqdm(windows.tolist(), desc=f"ppl {dataset} (llama.cpp)", unit="win", disable=None if progress else True,
                  leave=False):
        nll, _ = token_nll_from_logits(window_logits(llm, w), w)
        total += float(nll.sum())
    seconds = time.perf_counter() - start
    predicted = n * (seqlen - 1)
    nll = total / predicted
    return PerplexityResult(
        dataset=dataset, split=split, seqlen=seqlen, windows=n, tokens=predicted, nll=nll, ppl=math.exp(nll),
        seconds=seconds, tokens_per_s=n * seqlen / seconds if seconds > 0 else float("inf"), max_tokens=max_tokens,
        available_tokens=available, dtype=f"gguf:{gguf_file_type(gguf_path)}")


def gguf_file_type(path: str | Path) -> str:
    """The GGUF's general.file_type as a name (e.g. MOSTLY_Q8_0), or 'unknown'."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
        return gguf.LlamaFileType(int(r.fields["general.file_type"].contents())).name
    except Exception:
        return "unknown"


def evaluate_perplexity_llamacpp(gguf_path: str | Path, source: str = "wikitext2", split: str = "test",
                                 seqlen: int = 128, max_tokens: int | None = None, data_dir=None,
                                 tokenizer=None, threads: int | None = None, progress: bool = False):
    """(PerplexityResult, tokenizer name) of a GGUF on a named source with llama.cpp. `tokenizer`: a
    Hugging Face tokenizer (the same tokens as the torch engine), or None for llama.cpp's own."""
    from pgprune.data import get_eval_tokens, get_source

    llm = open_gguf(gguf_path, seqlen, threads)
    tok_name = "hf" if tokenizer is not None else "llama.cpp"
    tokens = get_eval_tokens(tokenizer if tokenizer is not None else LlamaCppTokenizer(llm), source, split, data_dir)
    res = perplexity_llamacpp(gguf_path, tokens, seqlen=seqlen, max_tokens=max_tokens,
                              max_windows=get_source(source).eval_max_windows, progress=progress,
                              dataset=source, split=split, llm=llm)
    return res, tok_name
