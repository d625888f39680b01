import json
import subprocess
import sys

from pgprune.cli import main
from pgprune.models.synthetic import synthetic_model


def test_help_lists_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "eval" in out and "policy-gradient" in out


def test_eval_help_is_useful():
    out = subprocess.run([sys.executable, "-m", "pgprune.cli", "eval", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("--ppl", "--seqlen", "--max-tokens", "--data-dir", "smollm2-135m"):
        assert word in out.stdout


def test_eval_on_a_local_folder_writes_json(tmp_path, tokenizer, capsys):
    model = synthetic_model("llama", seed=0)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("hello world, this is a small evaluation text. " * 30)
    rc = main(["eval", str(tmp_path / "m"), "--ppl", f"text:{text}", "--seqlen", "64", "--dtype", "fp32",
               "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "seqlen" in out and "64" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["perplexity"][0]["seqlen"] == 64 and res["perplexity"][0]["ppl"] > 1


def test_errors_exit_nonzero_with_a_message(tmp_path, capsys):
    rc = main(["eval", str(tmp_path / "nope"), "--ppl", "wikitext2"])
    assert rc == 1
    assert "does not exist" in capsys.readouterr().err
