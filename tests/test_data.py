import gzip
import json

import pytest
import torch

from pgprune import data
from pgprune.errors import DataError


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(DataError, match="wikitext2, ptb, c4, wiki-sample"):
        data.load_documents("wikitext3", "test")


def test_missing_data_dir_files_print_the_layout(tmp_path):
    with pytest.raises(DataError, match=r"wikitext-2-raw-v1/wiki\.\{train,valid,test\}\.raw"):
        data.load_documents("wikitext2", "test", tmp_path)
    with pytest.raises(DataError, match="ptb/ptb"):
        data.load_documents("ptb", "validation", tmp_path)
    with pytest.raises(DataError, match="c4/en/c4-"):
        data.load_documents("c4", "train", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        data.load_documents("ptb", "test", tmp_path / "nope")


def test_wikitext_local_rows_follow_the_datasets_convention(tmp_path):
    (tmp_path / "wikitext-2-raw-v1").mkdir()
    (tmp_path / "wikitext-2-raw-v1" / "wiki.test.raw").write_text(" \n = Title = \n \n Some text .\n")
    rows = data.load_documents("wikitext2", "test", tmp_path)
    # datasets' rows: each line with its newline, whitespace-only lines as ''
    assert rows == ["", " = Title = \n", "", " Some text .\n"]
    assert data.load_text("wikitext2", "test", tmp_path) == "\n\n = Title = \n\n\n\n\n Some text .\n"


def test_data_dir_from_environment(tmp_path, monkeypatch):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" a b c \n d e \n")
    monkeypatch.setenv("PGPRUNE_DATA_DIR", str(tmp_path))
    assert data.load_text("ptb", "test") == "a b c d e"


def _write_c4(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "url": "u"}) + "\n")


def test_c4_canonical_shards_and_sample_files(tmp_path, tokenizer):
    canonical = tmp_path / "canon"
    _write_c4(canonical / "c4" / "en" / "c4-train.00000-of-01024.json.gz", [f"train doc {i} " * 30 for i in range(20)])
    _write_c4(canonical / "c4" / "en" / "c4-validation.00000-of-00008.json.gz", [f"val {i}" for i in range(1200)])
    assert len(data.load_documents("c4", "train", canonical)) == 19  # document 19 is held out
    assert data.load_documents("c4", "heldout", canonical) == ["train doc 19 " * 30]
    assert len(data.load_documents("c4", "validation", canonical)) == 1100  # the recipe's first 1100
    w = data.get_calibration_windows(tokenizer, "c4", 5, 64, seed=0, data_dir=canonical)
    assert w.shape == (5, 64)

    sample = tmp_path / "sample"
    _write_c4(sample / "c4" / "c4-sample.00000-of-00001.json.gz", [f"doc {i}" for i in range(30)])
    val = data.load_documents("c4", "validation", sample)
    train = data.load_documents("c4", "train", sample)
    assert val == [f"doc {i}" for i in range(0, 30, 10)]
    held = data.load_documents("c4", "heldout", sample)
    assert len(train) == 26 and len(held) == 1 and not set(train) & set(val) and not set(train) & set(held)


def test_text_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="no text"):
        data.load_documents(f"text:{empty}", "train")
    with pytest.raises(DataError, match="does not exist"):
        data.load_documents(f"text:{tmp_path / 'missing.txt'}", "train")
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert data.load_text(f"text:{jl}", "test") == "one\n\ntwo"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="'text' field"):
        data.load_documents(f"text:{bad}", "train")


def test_calibration_windows_are_seeded_windows_of_the_stream(tmp_path, tokenizer):
    path = tmp_path / "t.txt"
    text = "".join(chr(32 + (i * 7) % 90) for i in range(5000))
    path.write_text(text)
    a = data.get_calibration_windows(tokenizer, f"text:{path}", 8, 50, seed=3)
    b = data.get_calibration_windows(tokenizer, f"text:{path}", 8, 50, seed=3)
    c = data.get_calibration_windows(tokenizer, f"text:{path}", 8, 50, seed=4)
    assert a.shape == (8, 50) and torch.equal(a, b) and not torch.equal(a, c)
    stream = tokenizer(text, return_tensors="pt").input_ids[0].tolist()
    joined = ",".join(map(str, stream))
    for row in a.tolist():
        assert ",".join(map(str, row)) in joined
    with pytest.raises(DataError, match="at most 100 windows"):
        data.get_calibration_windows(tokenizer, f"text:{path}", 101, 50)


def test_clean_wiki_markup():
    raw = ("{{Infobox|a={{nested}}}}'''Anarchism''' is a [[political philosophy]] that "
           "[[self-governance|self-governed]]<ref>cite</ref> [[File:X.png|thumb|pic]] "
           "[http://example.org Example site].\n== History ==\n* item &amp; more")
    assert data.clean_wiki_markup(raw) == (
        "Anarchism is a political philosophy that self-governed Example site.\nHistory\nitem & more")


@pytest.mark.integration
def test_wiki_sample_is_deterministic_and_split(tokenizer):
    parts = {s: data.load_documents("wiki-sample", s) for s in ("train", "validation", "test", "heldout")}
    assert len(parts["train"]) > 5 * len(parts["test"]) > 0
    assert len(parts["train"]) > 15 * len(parts["heldout"]) > 0
    for a, b in (("train", "test"), ("train", "heldout"), ("heldout", "test"), ("heldout", "validation")):
        assert not set(parts[a]) & set(parts[b]), (a, b)
    # the held-out documents are never drawn for calibration: no calibration window occurs in them
    held_text = "\n\n".join(parts["heldout"])
    train_text = "\n\n".join(parts["train"])
    windows = ["".join(tokenizer.convert_ids_to_tokens(w)) for w in
               data.get_calibration_windows(tokenizer, "wiki-sample", 64, 40, seed=1)]
    ascii_windows = [w for w in windows if chr(0) not in w]  # the char tokenizer maps the rest to chr(0)
    assert len(ascii_windows) > 32
    assert all(w in train_text for w in ascii_windows) and not any(w in held_text for w in ascii_windows)
    words = sum(len(d.split()) for d in parts["train"])
    assert words > 200_000  # the sample has ~480k words before markup removal
    text = " ".join(parts["test"])
    assert "[[" not in text and "{{" not in text and "<ref" not in text


@pytest.mark.shared_data
def test_shared_wikitext_has_the_canonical_test_split(shared_data):
    rows = data.load_documents("wikitext2", "test", shared_data)
    assert len(rows) == 4358
    assert rows[1] == " = Robert Boulter = \n"
