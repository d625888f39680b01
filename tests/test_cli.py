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


# --- apply with a broken or mismatched masks file -------------------------------------------------
def _apply_setup(tmp_path):
    from structure_helpers import tiny_tokenizer

    model = synthetic_model("llama", seed=0, num_hidden_layers=4)
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    return model


def _apply_fails(tmp_path, capsys, masks_file) -> str:
    out = tmp_path / "pruned"
    rc = main(["apply", str(tmp_path / "dense"), "--masks", str(masks_file), "--out", str(out), "--dtype", "fp32"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err and str(masks_file) in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp leftovers
    return err


def test_apply_with_a_corrupt_masks_file_is_a_clear_error(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from pgprune.masks import Masks, UnitCosts
    from pgprune.models.adapter import get_adapter

    model = _apply_setup(tmp_path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 100)
    assert "not a readable safetensors file" in _apply_fails(tmp_path, capsys, garbage)

    good = tmp_path / "good.safetensors"
    Masks.full(UnitCosts.from_adapter(get_adapter(model)), ["head", "channel"]).save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "not a readable safetensors file" in _apply_fails(tmp_path, capsys, truncated)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"probs": torch.rand(4, 2)}, str(foreign))
    assert "no unit kind" in _apply_fails(tmp_path, capsys, foreign)
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    assert "no mask tensors" in _apply_fails(tmp_path, capsys, empty)
    floats = tmp_path / "floats.safetensors"
    save_file({"channel": torch.rand(4, 96)}, str(floats))
    assert "not a 0/1 mask" in _apply_fails(tmp_path, capsys, floats)


def test_apply_with_masks_of_another_model_is_a_clear_error(tmp_path, capsys):
    from pgprune.masks import Masks, UnitCosts
    from pgprune.models.adapter import get_adapter

    model = _apply_setup(tmp_path)
    width = model.config.intermediate_size
    for name, sizes, says in (("deeper", {"num_hidden_layers": 6}, "describes 6 decoder layers but the model has 4"),
                              ("wider", {"num_hidden_layers": 4, "intermediate_size": 2 * width},
                               f"has {2 * width} units per layer but the model has {width}")):
        other = synthetic_model("llama", seed=0, **sizes)
        path = tmp_path / f"{name}.safetensors"
        Masks.full(UnitCosts.from_adapter(get_adapter(other)), ["channel"]).save(path)
        err = _apply_fails(tmp_path, capsys, path)
        assert says in err and "another model" in err, err
