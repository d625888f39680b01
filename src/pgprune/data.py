"""Text data: named sources, tokenising, calibration windows and evaluation token streams.

Sources (name -> documents of a split):
- `wikitext2`  WikiText-2 raw; hub `wikitext/wikitext-2-raw-v1`, or `<data-dir>/wikitext-2-raw-v1/wiki.{train,valid,test}.raw`
- `ptb`        Penn Treebank; hub `ptb_text_only`, or `<data-dir>/ptb/ptb.{train,valid,test}.txt`
- `c4`         C4 English; hub `allenai/c4` (en shards), or `<data-dir>/c4/` with the allenai shard files
               (`en/c4-{train,validation}.NNNNN-of-NNNNN.json.gz`, also accepted directly under `c4/`)
- `wiki-sample` English Wikipedia sample shipped inside the gensim 4.4.0 wheel (offline default)
- `text:PATH`  any local .txt (one document) or .jsonl (field `text`, one document per line)

Evaluation follows DESIGN.md: the split's rows joined with the source's separator, tokenised once,
cut into non-overlapping windows of `seqlen` tokens (see evaluate/perplexity.py). Calibration
follows the Wanda / paper convention: seeded random windows of `seqlen` tokens from the train split.

Split `heldout`: every 20th document of a source's train documents, never drawn for calibration
(the `train` split is the other 19 in 20). It is what PG tracks its hard masks on by default, so a
run's selection reads text of the calibration domain that no method calibrated on, not the
evaluation set. A single local file (`text:PATH`) serves every split, held-out included.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import html
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pgprune import atomic
from pgprune.errors import DataError
from pgprune.paths import cache_dir, data_dir as resolve_data_dir

SPLITS = ("train", "validation", "test", "heldout")
HELDOUT_EVERY = 20  # document i of the source's train documents is held out when i % 20 == 19


@dataclass(frozen=True)
class TextSource:
    name: str
    load: Callable[[str, Path | None], list[str]]  # (split, data_dir) -> documents
    separator: str  # how documents are joined for evaluation
    # Calibration picks windows from one long stream, or from single documents (C4: documents
    # are many and long, so tokenising all of them would be wasteful).
    calibration: str = "stream"  # "stream" | "documents"
    # Common evaluation recipe caps (C4: first 256 windows of the validation text, as SparseGPT/Wanda).
    eval_max_windows: int | None = None
    description: str = ""


def _normalise_split(split: str) -> str:
    split = {"valid": "validation", "val": "validation", "dev": "validation"}.get(split, split)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    return split


# --- WikiText-2 ------------------------------------------------------------------------------------
_WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


def wikitext_rows(raw: str) -> list[str]:
    """Rows as the `datasets` copy has them: the file's lines with their newline, blank lines as ''."""
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


def _load_wikitext2(split: str, root: Path | None) -> list[str]:
    if root is not None:
        path = root / "wikitext-2-raw-v1" / _WIKITEXT_FILES[split]
        _require_file(path, "wikitext2", "wikitext-2-raw-v1/wiki.{train,valid,test}.raw", root)
        return wikitext_rows(path.read_text(encoding="utf-8"))
    return list(_hub_dataset("wikitext", "wikitext-2-raw-v1", split)["text"])


# --- PTB -------------------------------------------------------------------------------------------
_PTB_FILES = {"train": "ptb.train.txt", "validation": "ptb.valid.txt", "test": "ptb.test.txt"}


def _load_ptb(split: str, root: Path | None) -> list[str]:
    if root is not None:
        path = root / "ptb" / _PTB_FILES[split]
        _require_file(path, "ptb", "ptb/ptb.{train,valid,test}.txt", root)
        # the `ptb_text_only` hub copy strips each line
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return list(_hub_dataset("ptb_text_only", "penn_treebank", split)["sentence"])


# --- C4 --------------------------------------------------------------------------------------------
_C4_HUB_FILES = {"train": "en/c4-train.00000-of-01024.json.gz",
                 "validation": "en/c4-validation.00000-of-00008.json.gz"}
_C4_EVAL_DOCS = 1100  # SparseGPT / Wanda recipe: the first 1100 validation documents


def _read_json_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _load_c4(split: str, root: Path | None) -> list[str]:
    if split == "test":
        split = "validation"  # C4 has no public test split; the recipe evaluates on validation
    if root is not None:
        c4 = root / "c4"
        shards = sorted(glob.glob(str(c4 / "en" / f"c4-{split}.*-of-*.json*"))) or \
            sorted(glob.glob(str(c4 / f"c4-{split}.*-of-*.json*")))
        if shards:
            docs = _read_json_lines(Path(shards[0]))  # one shard is what every recipe uses
        else:
            others = sorted(glob.glob(str(c4 / "*.json*")) + glob.glob(str(c4 / "en" / "*.json*")))
            if not others:
                raise DataError(_layout_message("c4", root, "c4/en/c4-{train,validation}.NNNNN-of-NNNNN.json.gz"))
            # A sample that is not in allenai's shard naming: split it deterministically
            # (every 10th document is validation) and say so.
            all_docs = [d for p in others for d in _read_json_lines(Path(p))]
            docs = [d for i, d in enumerate(all_docs) if (i % 10 == 0) == (split == "validation")]
            print(f"[pgprune] c4: no allenai shard files in {c4}; using {len(others)} other file(s) "
                  f"as a sample, {split} = {len(docs)} of {len(all_docs)} documents "
                  "(every 10th is validation)", file=sys.stderr)
        return docs[:_C4_EVAL_DOCS] if split == "validation" else docs
    ds = _hub_dataset("allenai/c4", None, "train" if split == "train" else "validation",
                      data_files={split: _C4_HUB_FILES[split]})
    docs = list(ds["text"])
    return docs[:_C4_EVAL_DOCS] if split == "validation" else docs


# --- the Wikipedia sample inside the gensim wheel ------------------------------------------------
GENSIM_REQUIREMENT = "gensim==4.4.0"
_GENSIM_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_SAMPLE_VERSION = "v1"  # bump when the cleaning or the split changes


def find_gensim_wheel(download: bool = True) -> Path:
    """The gensim wheel: `PGPRUNE_GENSIM_WHEEL`, else in `<cache>/downloads`, else `pip download` it."""
    env = os.environ.get("PGPRUNE_GENSIM_WHEEL")
    if env:
        if not Path(env).is_file():
            raise DataError(f"PGPRUNE_GENSIM_WHEEL={env} does not exist")
        return Path(env)
    downloads = cache_dir() / "downloads"
    found = sorted(downloads.glob("gensim-4.4.0-*.whl"))
    if found:
        return found[0]
    if download:
        downloads.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               GENSIM_REQUIREMENT, "-d", str(downloads)]
        print(f"[pgprune] wiki-sample: downloading the {GENSIM_REQUIREMENT} wheel (text only, not installed): "
              + " ".join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(downloads.glob("gensim-4.4.0-*.whl"))
        if proc.returncode == 0 and found:
            return found[0]
        raise DataError(
            f"could not download the {GENSIM_REQUIREMENT} wheel that carries the Wikipedia sample:\n"
            f"{proc.stderr.strip()[-500:]}\nRun `pip download --no-deps {GENSIM_REQUIREMENT} -d {downloads}` "
            "or set PGPRUNE_GENSIM_WHEEL to a downloaded gensim 4.4.0 wheel.")
    raise DataError(f"no gensim 4.4.0 wheel in {downloads}")


_RE_COMMENT = re.compile(r"<!--.*?-->", re.S)
_RE_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_RE_TAG = re.compile(r"<[^>]+>")
_RE_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_RE_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I)
_RE_LINK = re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]")
_RE_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+(?: ([^\]]*))?\]")
_RE_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_RE_QUOTES = re.compile(r"'{2,}")


def _strip_templates(text: str) -> str:
    """Remove {{...}} templates, which nest."""
    out, depth, i = [], 0, 0
    while i < len(text):
        two = text[i:i + 2]
        if two == "{{":
            depth += 1
            i += 2
        elif two == "}}" and depth:
            depth -= 1
            i += 2
        else:
            if depth == 0:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean_wiki_markup(text: str) -> str:
    """Plain prose from MediaWiki markup (good enough for language-model calibration)."""
    text = html.unescape(text)
    text = _RE_COMMENT.sub("", text)
    text = _RE_REF.sub("", text)
    text = _strip_templates(text)
    text = _RE_TABLE.sub("", text)
    text = _RE_FILE_LINK.sub("", text)
    text = _RE_LINK.sub(r"\1", text)
    text = _RE_EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _RE_TAG.sub("", text)
    text = _RE_HEADING.sub(r"\2", text)
    text = _RE_QUOTES.sub("", text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("*", "#", ":", ";", "|", "!")):
            line = line.lstrip("*#:;|! ").strip()
        lines.append(re.sub(r"[ \t]{2,}", " ", line))
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _wiki_sample_articles(wheel: Path) -> list[str]:
    import xml.etree.ElementTree as ET

    with zipfile.ZipFile(wheel) as z:
        xml = bz2.decompress(z.read(_GENSIM_MEMBER))
    articles = []
    for page in ET.fromstring(xml).iter():
        if not page.tag.endswith("}page"):
            continue
        ns = next((c.text for c in page if c.tag.endswith("}ns")), None)
        text_el = next((e for e in page.iter() if e.tag.endswith("}text")), None)
        text = (text_el.text or "") if text_el is not None else ""
        if ns != "0" or text.lstrip().upper().startswith("#REDIRECT"):
            continue
        cleaned = clean_wiki_markup(text)
        if len(cleaned.split()) >= 50:
            articles.append(cleaned)
    return articles


def _load_wiki_sample(split: str, root: Path | None) -> list[str]:
    del root  # always the wheel's copy
    cached = cache_dir() / "data" / f"wiki-sample-{_WIKI_SAMPLE_VERSION}.json"
    if not cached.is_file():
        articles = _wiki_sample_articles(find_gensim_wheel())
        # Deterministic split by article index: every 10th article is test, the one after it
        # validation, the rest train.
        parts = {"train": [], "validation": [], "test": []}
        for i, a in enumerate(articles):
            parts["test" if i % 10 == 0 else "validation" if i % 10 == 1 else "train"].append(a)
        atomic.write_json(cached, parts)
    return json.loads(cached.read_text(encoding="utf-8"))[split]


# --- any local file -----------------------------------------------------------------------------------
def _load_text_file(path_str: str) -> Callable[[str, Path | None], list[str]]:
    def load(split: str, root: Path | None) -> list[str]:
        del split, root  # a single file serves every split; say so where it matters
        path = Path(path_str).expanduser()
        if not path.is_file():
            raise DataError(f"text file {path} does not exist")
        if path.suffix in (".jsonl", ".json") or path.name.endswith(".jsonl.gz"):
            try:
                docs = _read_json_lines(path)
            except (KeyError, json.JSONDecodeError) as e:
                raise DataError(f"{path}: every line must be a JSON object with a 'text' field ({e})") from e
        else:
            docs = [path.read_text(encoding="utf-8")]
        if not any(d.strip() for d in docs):
            raise DataError(f"{path} contains no text")
        return docs

    return load


SOURCES: dict[str, TextSource] = {
    "wikitext2": TextSource("wikitext2", _load_wikitext2, "\n\n", description="WikiText-2 raw"),
    "ptb": TextSource("ptb", _load_ptb, " ", description="Penn Treebank (Mikolov)"),
    "c4": TextSource("c4", _load_c4, " ", calibration="documents", eval_max_windows=256,
                     description="C4 English (validation: first 1100 documents, 256 windows)"),
    "wiki-sample": TextSource("wiki-sample", _load_wiki_sample, "\n\n",
                              description="English Wikipedia sample from the gensim 4.4.0 wheel (offline)"),
}


def get_source(name: str) -> TextSource:
    if name.startswith("text:"):
        return TextSource(name, _load_text_file(name[5:]), "\n\n", description=f"local file {name[5:]}")
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(SOURCES)}, text:PATH")
    return SOURCES[name]


_READ_ONCE: dict | None = None  # (source, stored split, data folder) -> documents, while read_once() is active


@contextlib.contextmanager
def read_once():
    """Within this block each stored split of a source is read from disk once (`train` and `heldout`
    share one read): a run checks its files before loading the model and reads them again to
    tokenise. The documents are held until the block ends, so end it once the text is tokenised."""
    global _READ_ONCE
    outer = _READ_ONCE
    _READ_ONCE = {} if outer is None else outer
    try:
        yield
    finally:
        _READ_ONCE = outer


def _stored_documents(src: TextSource, split: str, root: Path | None) -> list[str]:
    if _READ_ONCE is None:
        return src.load(split, root)
    # a local file serves every split: one read
    key = (src.name, "any" if src.name.startswith("text:") else split, None if root is None else str(root))
    if key not in _READ_ONCE:
        _READ_ONCE[key] = src.load(split, root)
    return _READ_ONCE[key]


def load_documents(source: str, split: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    src = get_source(source)
    split = _normalise_split(split)
    docs = list(_stored_documents(src, "train" if split == "heldout" else split, resolve_data_dir(data_dir)))
    if split in ("train", "heldout") and not source.startswith("text:"):
        held = split == "heldout"
        docs = [d for i, d in enumerate(docs) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == held]
    if not docs:
        raise DataError(f"{source} {split}: no documents")
    return docs


def load_text(source: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> str:
    """The evaluation string of DESIGN.md's protocol: documents joined with the source's separator."""
    return get_source(source).separator.join(load_documents(source, split, data_dir))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long [1, N] token stream (the tokenizer's own special tokens, e.g. a leading BOS, included)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids
    return ids.long()


def get_eval_tokens(tokenizer, source: str, split: str = "test",
                    data_dir: str | os.PathLike | None = None) -> torch.Tensor:
    return tokenize(tokenizer, load_text(source, split, data_dir))


def get_calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0,
                            data_dir: str | os.PathLike | None = None, split: str = "train") -> torch.Tensor:
    """`nsamples` seeded random windows of `seqlen` tokens from the split: LongTensor [nsamples, seqlen]."""
    if nsamples < 1 or seqlen < 1:
        raise DataError(f"nsamples and seqlen must be positive (got {nsamples}, {seqlen})")
    src = get_source(source)
    docs = load_documents(source, split, data_dir)
    gen = torch.Generator().manual_seed(seed)
    if src.calibration == "documents":
        return _windows_from_documents(tokenizer, docs, nsamples, seqlen, gen, source)
    stream = tokenize(tokenizer, src.separator.join(docs))[0]
    capacity = stream.numel() // seqlen
    if nsamples > capacity:
        raise DataError(f"{source} {split} has {stream.numel()} tokens: room for at most {capacity} "
                        f"windows of {seqlen} tokens, {nsamples} asked; lower --nsamples or --seqlen, "
                        "or calibrate on a larger source")
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def _windows_from_documents(tokenizer, docs, nsamples, seqlen, gen, source) -> torch.Tensor:
    # Wanda's C4 recipe: pick a random document long enough, then a random window inside it.
    windows, tried, cache = [], 0, {}
    eligible_tokens = 0
    while len(windows) < nsamples:
        tried += 1
        if tried > 50 * nsamples + 1000:
            raise DataError(f"{source}: found only {len(windows)} documents longer than {seqlen} tokens "
                            f"after {tried} draws ({eligible_tokens} tokens in them); lower --nsamples "
                            "or --seqlen")
        i = int(torch.randint(0, len(docs), (1,), generator=gen))
        if i not in cache:
            cache[i] = tokenize(tokenizer, docs[i])[0]
            if cache[i].numel() > seqlen:
                eligible_tokens += cache[i].numel()
        ids = cache[i]
        if ids.numel() <= seqlen:
            continue
        s = int(torch.randint(0, ids.numel() - seqlen, (1,), generator=gen))
        windows.append(ids[s:s + seqlen])
    return torch.stack(windows)


# --- helpers -----------------------------------------------------------------------------------------
def _layout_message(name: str, root: Path, layout: str) -> str:
    return (f"{name}: the data directory {root} lacks the expected files. Expected layout:\n"
            f"  {root}/{layout}\n"
            "Point --data-dir / PGPRUNE_DATA_DIR at a folder with that layout, or leave it unset to "
            "download from the Hugging Face hub.")


def _require_file(path: Path, name: str, layout: str, root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    if not path.is_file():
        raise DataError(_layout_message(name, root, layout) + f"\n(missing: {path})")


def _hub_dataset(path: str, name: str | None, split: str, **kwargs):
    try:
        import datasets
    except ImportError as e:  # a core dependency; only a broken install gets here
        raise DataError("the `datasets` package is required to load data from the hub") from e
    try:
        return datasets.load_dataset(path, name, split=split, **kwargs)
    except Exception as e:  # network, missing dataset, ...: tell the user about the offline path
        raise DataError(f"could not load {path}{'/' + name if name else ''} ({split}) from the Hugging Face "
                        f"hub: {type(e).__name__}: {str(e)[:300]}\nOffline, pass --data-dir (or set "
                        "PGPRUNE_DATA_DIR) to a folder with the canonical files, or use wiki-sample.") from e
