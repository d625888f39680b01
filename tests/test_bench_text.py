"""The benches' rewriting of text between WikiText-2's word-tokenised form and ordinary prose, and the
command lines they record."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _common import command_line, wikitext_plain, wikitext_style  # noqa: E402

# Lines written as WikiText-2 raw writes them (taken from its conventions, not from the dataset).
WIKITEXT = (" = = Early life = = \n"
            " The 1 @,@ 200 @-@ tonne ship , H. americanus 's rival , was 2 @.@ 5 km ( 1 @.@ 6 mi ) long . \n"
            " He said \" it isn 't over \" ; nobody agreed : yes ! \n")


def test_plain_undoes_the_word_tokenisation():
    lines = wikitext_plain(WIKITEXT).split("\n")
    assert lines[0] == "Early life"
    assert lines[1] == "The 1,200-tonne ship, H. americanus's rival, was 2.5 km (1.6 mi) long."
    assert lines[2] == 'He said "it isn\'t over"; nobody agreed: yes!'


def test_style_writes_prose_the_wikitext_way():
    prose = "The 1,200-tonne ship, H. americanus's rival, was 2.5 km (1.6 mi) long.\nHe said \"it isn't over\"; yes!"
    assert wikitext_style(prose).split("\n") == [
        " The 1 @,@ 200 @-@ tonne ship , H. americanus 's rival , was 2 @.@ 5 km ( 1 @.@ 6 mi ) long . ",
        " He said \" it isn 't over \" ; yes ! ",
    ]


def test_round_trip_keeps_body_lines():
    body = WIKITEXT.split("\n")[1:3]  # headings lose their '= =' on the way to prose
    assert wikitext_style(wikitext_plain("\n".join(body))).split("\n") == body


def test_recorded_command_keeps_empty_and_spaced_arguments(monkeypatch):
    import shlex

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    argv = ["--metrics", "", "--variants", "features+remove_layers=auto", "--tag", "a b"]
    line = command_line("recipe_targets.py", argv)
    assert shlex.split(line) == ["python", "bench/recipe_targets.py", *argv]
