"""Shared bits of the benchmarks: machine description, table printing, JSON results."""

from __future__ import annotations

import datetime
import os
import re
import shlex
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    from pgprune.evaluate.speed import machine_info

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **machine_info()}


def command_line(script: str, argv: list[str]) -> str:
    """How to rerun a benchmark, with the thread setting it ran under (it changes CPU timings)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    # quoted as a shell needs it: an empty argument (--metrics '') must survive a copy and paste
    return (f"OMP_NUM_THREADS={threads} " if threads else "") + f"python bench/{script} " + shlex.join(argv)


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    out = []
    for j, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def load_setup(model_name: str, dtype: str, units: str):
    """(model, tokenizer, adapter, unit costs, PG unit layout for `units`), on the CPU: prune()'s own
    setup (pgprune.pruning.load_session)."""
    from pgprune.config import RunSettings
    from pgprune.pruning import load_session

    s = load_session(RunSettings.from_recipe("features", {"model": model_name, "execution.dtype": dtype,
                                                          "units": units, "execution.device": "cpu"}))
    return s.model, s.tokenizer, s.adapter, s.costs, s.layout


VALID_TAIL = "valid-tail"  # a calibration source of the benches only: in-domain text for WikiText-2
VALID_TAIL_PLAIN = "valid-tail-plain"  # the same text with WikiText's word tokenisation undone
WIKI_SAMPLE_WIKITEXT = "wiki-sample-wikitext"  # the Wikipedia sample written the way WikiText-2 raw is


def _windows_after(stream, skip_tokens: int, n: int, seqlen: int, seed: int = 0):
    """`n` seeded random windows of a token stream [1, N] after its first `skip_tokens`."""
    import torch

    tail = stream[0, skip_tokens:]
    if tail.numel() <= seqlen:
        raise SystemExit(f"only {tail.numel()} tokens after the first {skip_tokens}: no room for a {seqlen}-token window")
    starts = torch.randint(0, tail.numel() - seqlen, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([tail[s:s + seqlen] for s in starts.tolist()])


# WikiText-2 raw is Wikipedia prose run through a word tokeniser: spaces around punctuation, " @-@ "
# inside hyphenated words, " @,@ " / " @.@ " inside numbers, " 's", "don 't", "= = Heading = =". These two
# rewrite text between that form and ordinary prose, to tell what the text says from how it is written.
_WT_NUMBER_SEP = re.compile(r"(?<=\d)([,.])(?=\d)")
_WT_HYPHEN = re.compile(r"(?<=\w)-(?=\w)")
_WT_PUNCT = re.compile(r'([,;:!?()"\[\]])')
_WT_PERIOD = re.compile(r"(?<!\b[A-Z])\.(?=\s|$)")  # sentence ends, not initials like "H. americanus"
_WT_CLITIC = re.compile(r"(?<=\w)('s|'t|'re|'ve|'ll|'d|'m)\b", re.I)


def wikitext_style(text: str) -> str:
    """Ordinary prose written the way WikiText-2 raw writes it."""
    lines = []
    for line in text.split("\n"):
        line = _WT_NUMBER_SEP.sub(lambda m: "\0" + ("c" if m.group(1) == "," else "p"), line)
        line = _WT_HYPHEN.sub("\0h", line)
        line = _WT_CLITIC.sub(r" \1", line)  # "St Paul 's", and "don 't" as WikiText splits it
        line = _WT_PERIOD.sub(" . ", _WT_PUNCT.sub(r" \1 ", line))
        line = line.replace("\0c", " @,@ ").replace("\0p", " @.@ ").replace("\0h", " @-@ ")
        line = re.sub(r"\s+", " ", line).strip()
        lines.append(f" {line} " if line else " ")
    return "\n".join(lines)


def wikitext_plain(text: str) -> str:
    """WikiText-2 raw with its word tokenisation undone (ordinary prose)."""
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        heading = re.fullmatch(r"(?:= )+(.*?)(?: =)+", line)
        if heading:
            line = heading.group(1)
        line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
        line = re.sub(r'" (.*?) "', r'"\1"', line)
        line = re.sub(r" ([,.;:!?)\]])", r"\1", re.sub(r"([(\[]) ", r"\1", line))
        line = re.sub(r" ('s|'re|'ve|'ll|'d|'m|n't)\b", r"\1", line.replace("n 't", " n't"))
        lines.append(line)
    return "\n".join(lines)


def calibration_windows(tok, name: str, n: int, seqlen: int, data_dir, valid, valid_scored_tokens: int):
    """`n` calibration windows of a --calib source: the library's sources (train split), or one of the
    benches' own: WikiText-2 validation (`valid`, its tokens [1, N]) after its first
    `valid_scored_tokens` (the tokens the bench scores masks on), raw or written plain, or the
    Wikipedia sample written the way WikiText-2 is."""
    from pgprune.data import get_calibration_windows, get_source, load_documents, load_text, tokenize

    skip = valid_scored_tokens
    if name == VALID_TAIL:
        stream = valid
    elif name == VALID_TAIL_PLAIN:  # the plain stream is shorter: skipping as many tokens skips the scored text
        stream = tokenize(tok, wikitext_plain(load_text("wikitext2", "validation", data_dir)))
    elif name == WIKI_SAMPLE_WIKITEXT:
        docs = load_documents("wiki-sample", "train")
        stream, skip = tokenize(tok, get_source("wiki-sample").separator.join(map(wikitext_style, docs))), 0
    else:
        return get_calibration_windows(tok, name, n, seqlen, seed=0, data_dir=data_dir)
    return _windows_after(stream, skip, n, seqlen)


def save(name: str, payload: dict) -> Path:
    from pgprune import atomic

    path = RESULTS_DIR / f"{name}.json"
    atomic.write_json(path, {"machine": machine(), **payload})
    print(f"wrote {path}")
    return path
