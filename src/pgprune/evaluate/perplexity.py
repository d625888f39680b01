"""Perplexity with the protocol of DESIGN.md.

Join the split's rows with the source's separator, tokenise once, cut non-overlapping windows of
`seqlen` tokens, drop the remainder, average the NLL over every predicted token (seqlen - 1 per
window), exponentiate. `max_tokens` evaluates only the first N tokens (quick checks; reported).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from pgprune.data import get_eval_tokens, get_source
from pgprune.errors import ConfigError, DataError
from pgprune.lm_loss import token_nll
from pgprune.models.adapter import execution_device


@dataclass
class PerplexityResult:
    dataset: str
    split: str
    seqlen: int
    windows: int
    tokens: int  # predicted tokens the mean runs over
    nll: float
    ppl: float
    seconds: float
    tokens_per_s: float
    max_tokens: int | None
    available_tokens: int  # tokens of the whole split
    dtype: str

    @property
    def limited(self) -> bool:
        return self.windows * self.seqlen < self.available_tokens - self.available_tokens % self.seqlen

    def to_dict(self) -> dict:
        d = asdict(self)
        d["limited"] = self.limited
        return d


def _context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def eval_windows(tokens: torch.Tensor, seqlen: int, max_tokens: int | None = None, max_windows: int | None = None,
                 context: int | None = None, dataset: str = "tokens") -> tuple[torch.Tensor, int]:
    """The protocol's windows of a [1, N] token stream: (LongTensor [n, seqlen], N available).
    Non-overlapping, remainder dropped, only the first `max_tokens` / `max_windows` when given.
    Every engine (torch here, llama.cpp in pgprune.evaluate.llamacpp) scores these same windows."""
    if seqlen < 2:
        raise ConfigError(f"seqlen must be at least 2 (got {seqlen})")
    if context is not None and seqlen > context:
        raise ConfigError(f"seqlen {seqlen} is larger than the model's context ({context} tokens)")
    if max_tokens is not None and max_tokens < seqlen:
        raise ConfigError(f"--max-tokens {max_tokens} is smaller than one window of {seqlen} tokens")
    stream = tokens.reshape(-1)
    available = stream.numel()
    usable = available if max_tokens is None else min(available, max_tokens)
    n = usable // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"{dataset}: {available} tokens is less than one window of {seqlen}")
    return stream[: n * seqlen].view(n, seqlen), available


@torch.no_grad()
def perplexity_of_tokens(model, tokens: torch.Tensor, seqlen: int = 128, batch_size: int = 8,
                         max_tokens: int | None = None, max_windows: int | None = None,
                         progress: bool = False, dataset: str = "tokens", split: str = "") -> PerplexityResult:
    """Perplexity of a [1, N] token stream under `model`."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive (got {batch_size})")
    windows, available = eval_windows(tokens, seqlen, max_tokens, max_windows, _context_length(model), dataset)
    n = windows.shape[0]
    device = execution_device(model.get_input_embeddings())
    total = torch.zeros((), dtype=torch.float64)
    start = time.perf_counter()
    bar = tqdm(total=n, desc=f"ppl {dataset}", unit="win", disable=None if progress else True, leave=False)
    for b in range(0, n, batch_size):
        batch = windows[b:b + batch_size].to(device)
        total += token_nll(model, batch).double().sum().cpu()
        bar.update(batch.shape[0])
    bar.close()
    seconds = time.perf_counter() - start
    predicted = n * (seqlen - 1)
    nll = float(total) / predicted
    return PerplexityResult(
        dataset=dataset, split=split, seqlen=seqlen, windows=n, tokens=predicted, nll=nll,
        ppl=math.exp(nll), seconds=seconds, tokens_per_s=n * seqlen / seconds if seconds > 0 else float("inf"),
        max_tokens=max_tokens, available_tokens=available, dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
    )


def evaluate_perplexity(model, tokenizer, source: str = "wikitext2", split: str = "test", seqlen: int = 128,
                        batch_size: int = 8, max_tokens: int | None = None, data_dir=None,
                        progress: bool = False) -> PerplexityResult:
    """Perplexity of `model` on a named source (see pgprune.data), DESIGN.md protocol."""
    tokens = get_eval_tokens(tokenizer, source, split, data_dir)
    return perplexity_of_tokens(model, tokens, seqlen=seqlen, batch_size=batch_size, max_tokens=max_tokens,
                                max_windows=get_source(source).eval_max_windows, progress=progress,
                                dataset=source, split=split)


# The natural-text measure (issue 18's layer target, DESIGN.md protocol): how a pruned model does on
# naturally written held-out text, the geometric mean of the perplexities of the C4 sample's validation
# documents (`c4`, split test) and the Wikipedia sample's test split, first 32k tokens each.
NATURAL_TEXT = ("c4", "wiki-sample")


def natural_text_ppl(ppl_by_dataset: dict) -> float | None:
    """exp(mean log perplexity) over NATURAL_TEXT, or None unless every one of them is there."""
    values = [ppl_by_dataset.get(n) for n in NATURAL_TEXT]
    if any(v is None or not v > 0 for v in values):
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def natural_text_perplexities(model, tokens_by_dataset: dict, max_tokens: int | None = 32768, seqlen: int = 128,
                              batch_size: int = 8) -> dict:
    """{c4, wiki-sample, natural: perplexity} of `model`; `tokens_by_dataset` holds each NATURAL_TEXT set's
    test stream (tokenise once with `natural_text_tokens` when scoring several models)."""
    out = {n: perplexity_of_tokens(model, tokens_by_dataset[n], seqlen=seqlen, batch_size=batch_size,
                                   max_tokens=max_tokens, max_windows=get_source(n).eval_max_windows,
                                   dataset=n, split="test").ppl
           for n in NATURAL_TEXT}
    out["natural"] = natural_text_ppl(out)
    return out


def natural_text_tokens(tokenizer, data_dir=None) -> dict:
    """Each NATURAL_TEXT set's test split as a [1, N] token stream."""
    return {n: get_eval_tokens(tokenizer, n, "test", data_dir) for n in NATURAL_TEXT}


def format_ppl_table(model_name: str, results: list[PerplexityResult]) -> str:
    rows = [("dataset", "split", "seqlen", "tokens", "ppl", "tok/s", "note")]
    for r in results:
        note = f"first {r.windows * r.seqlen} of {r.available_tokens} tokens" if r.limited else ""
        rows.append((r.dataset, r.split, str(r.seqlen), str(r.tokens), f"{r.ppl:.3f}",
                     f"{r.tokens_per_s:.0f}", note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"perplexity of {model_name} ({results[0].dtype if results else ''})"]
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
