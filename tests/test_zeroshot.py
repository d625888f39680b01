"""Zero-shot evaluation: the offline task definitions must ask the model exactly what lm-eval's own
tasks ask, and the accuracies must be what the log-likelihoods imply."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import datasets  # noqa: E402
import lm_eval  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from pgprune.errors import ConfigError, DataError  # noqa: E402
from pgprune.evaluate.zeroshot import (  # noqa: E402
    METRICS, ZeroShotResult, evaluate_zeroshot, format_zeroshot_table, parse_tasks)
from pgprune.evaluate.zeroshot_tasks import KNOWN_TASKS, SPECS, build_local_task  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
BUILTIN_YAML = {
    "boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "lambada_openai": "lambada/lambada_openai.yaml",
}


# --- small files in the release formats (as in /work/shared/data), with the awkward cases -------
def _arc(id_, stem, labels, texts, key):
    return {"id": id_, "question": {"stem": stem, "choices": [{"text": t, "label": l}
                                                              for t, l in zip(texts, labels)]},
            "answerKey": key}


FIXTURES = {
    "boolq/dev.jsonl": [
        {"question": "is the sky blue", "title": "Sky", "answer": True, "passage": "The sky is blue by day."},
        {"question": "do fish fly", "title": "Fish", "answer": False, "passage": "Fish swim; a few glide."},
        {"question": "is ice cold", "title": "Ice (water)", "answer": True, "passage": "Ice is frozen water."},
    ],
    "piqa/valid.jsonl": [
        {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Twist the jar's base only."},
        {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin "},
        {"goal": "Cool soup quickly", "sol1": "Put it in the oven", "sol2": "Stir it in a cold bowl"},
        {"goal": "Dry wet shoes", "sol1": "Stuff them with newspaper.", "sol2": "Fill them with water."},
    ],
    "piqa/valid-labels.lst": "0\n0\n1\n0\n",
    "winogrande/dev.jsonl": [
        {"qID": "a-1", "sentence": "Sarah was a better cook than Maria so _ made dinner.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"},
        {"qID": "a-2", "sentence": "The trophy didn't fit in the case because the _ was too small.",
         "option1": "trophy", "option2": "case", "answer": "2"},
        {"qID": "a-3", "sentence": "He poured water from the jug into the cup until the _ was full.",
         "option1": "jug", "option2": "cup", "answer": "2"},
    ],
    "winogrande/dev-labels.lst": "1\n2\n2\n",
    "ai2_arc/ARC-Easy-Test.jsonl": [
        _arc("e1", "Which is a liquid at room temperature?", "ABCD", ["iron", "water", "salt", "wood"], "B"),
        _arc("e2", "What do plants need for photosynthesis?", "1234", ["sand", "light", "noise", "rock"], "2"),
        _arc("e3", "Which is a mammal?", "ABC", ["shark", "whale", "trout"], "B"),
        _arc("e4", "Which planet is largest?", "ABCDE", ["Mars", "Venus", "Jupiter", "Earth", "Mercury"], "C"),
    ],
    "ai2_arc/ARC-Challenge-Test.jsonl": [
        _arc("c1", "A ball rolls faster downhill because of", "ABCD", ["gravity", "light", "sound", "heat"], "A"),
        _arc("c2", "Which change is chemical?", "123", ["melting", "burning", "boiling"], "2"),
    ],
    "openbookqa/test.jsonl": [
        _arc("8-343", "To save money for a vacation, the best way is to", "ABCD",
             ["make more calls", "quit eating lunch out", "buy less with monopoly money", "eat out"], "B"),
        _arc("1129", "There is most likely going to be fog around:", "ABCD",
             ["a marsh", "a desert", "a volcano", "the moon"], "A"),
    ],
    "lambada_openai/lambada_test.jsonl": [
        {"text": "She opened the door and saw her old friend\n\n\"Welcome back,\" said Anna"},
        {"text": "The cat sat on the warm  mat"},
        {"text": "He counted the coins: one, two, three, four"},
    ],
    "hellaswag/hellaswag_val.jsonl": [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
         "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain",
         "label": 3, "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
         "source_id": "activitynet~v_-JhWjGDPHMY"},
        {"ind": 92, "activity_label": "Personal Care and Style",
         "ctx_a": "[header] How to dye your hair [title] Pick a color.  [step] Choose carefully.",
         "ctx_b": "", "ctx": "...", "split": "val", "split_type": "zeroshot", "label": 0,
         "endings": ["[substeps] Buy the dye [title] Mix it.", "Wash   the car.", "Sleep.", "Run [step] fast."],
         "source_id": "wikihow~1"},
    ],
}

# Which local file holds which task's records, and the reference conversion to the schema of the
# hub dataset lm-eval downloads (written out here independently of the library's readers).
TASK_FILE = {"boolq": "boolq/dev.jsonl", "piqa": "piqa/valid.jsonl", "hellaswag": "hellaswag/hellaswag_val.jsonl",
             "winogrande": "winogrande/dev.jsonl", "arc_easy": "ai2_arc/ARC-Easy-Test.jsonl",
             "arc_challenge": "ai2_arc/ARC-Challenge-Test.jsonl", "openbookqa": "openbookqa/test.jsonl",
             "lambada_openai": "lambada_openai/lambada_test.jsonl"}


def hub_records(task: str, root: Path, n: int | None = None) -> list[dict]:
    lines = (root / TASK_FILE[task]).read_text(encoding="utf-8").splitlines()
    recs = [json.loads(x) for x in lines if x.strip()][:n]
    if task == "boolq":  # SuperGLUE BoolQ
        return [{"question": r["question"], "passage": r["title"] + " -- " + r["passage"], "idx": i,
                 "label": 1 if r["answer"] else 0} for i, r in enumerate(recs)]
    if task == "piqa":
        labels = (root / "piqa/valid-labels.lst").read_text().split()
        return [{**r, "label": int(labels[i])} for i, r in enumerate(recs)]
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        key = "question" if task.startswith("arc") else "question_stem"
        return [{"id": r["id"], key: r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in recs]
    if task == "hellaswag":  # the hub copy stores the label as a string
        return [{**r, "label": str(r["label"])} for r in recs]
    return recs  # winogrande, lambada: same fields on the hub


def builtin_task(task: str, docs: list[dict]) -> ConfigurableTask:
    """lm-eval's own task (its YAML, functions resolved) fed `docs` instead of the hub download."""
    cfg = load_yaml(LM_EVAL_TASKS / BUILTIN_YAML[task])
    splits = [cfg.get(k) for k in ("training_split", "validation_split", "test_split") if cfg.get(k)]
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {s: datasets.Dataset.from_list(docs) for s in splits})
    cfg["metadata"] = {**(cfg.get("metadata") or {})}
    task_obj = ConfigurableTask(config=cfg)
    task_obj.set_config(key="num_fewshot", value=0)
    return task_obj


def requests_and_gold(task_obj) -> list[tuple]:
    task_obj.build_all_requests(limit=None, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task_obj.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst.arguments)
    out = []
    for i, doc in enumerate(task_obj.eval_docs):
        gold = task_obj.doc_to_text(doc) if task_obj.multiple_input else task_obj.doc_to_target(doc)
        out.append((by_doc[i], gold))
    return out


@pytest.fixture
def data_dir(tmp_path) -> Path:
    for rel, content in FIXTURES.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content if isinstance(content, str)
                     else "".join(json.dumps(r) + "\n" for r in content), encoding="utf-8")
    return tmp_path


# --- the key test: same requests and gold answers as lm-eval's built-in tasks --------------------
@pytest.mark.parametrize("task", KNOWN_TASKS)
def test_offline_requests_equal_builtin(task, data_dir):
    ours = requests_and_gold(build_local_task(task, data_dir))
    theirs = requests_and_gold(builtin_task(task, hub_records(task, data_dir)))
    assert len(ours) == len(theirs) == len(hub_records(task, data_dir))
    assert ours == theirs


@pytest.mark.shared_data
@pytest.mark.parametrize("task", [t for t in KNOWN_TASKS if t != "hellaswag"])
def test_offline_requests_equal_builtin_on_real_files(task):
    if not (SHARED_DATA / TASK_FILE[task]).is_file():
        pytest.skip(f"{SHARED_DATA / TASK_FILE[task]} is absent (shared evaluation data not mounted)")
    n = 40
    local = build_local_task(task, SHARED_DATA)
    local.build_all_requests(limit=n, rank=0, world_size=1)
    ours = requests_and_gold(build_local_task(task, docs=list(local.eval_docs)[:n]))
    theirs = requests_and_gold(builtin_task(task, hub_records(task, SHARED_DATA, n)))
    assert ours == theirs


def test_known_record_renders_as_lm_eval_would(data_dir):
    # One hand-written expectation per tricky conversion, so a shared mistake in both readers shows.
    boolq = requests_and_gold(build_local_task("boolq", data_dir))[1]
    assert boolq == ([("Fish -- Fish swim; a few glide.\nQuestion: do fish fly?\nAnswer:", " no"),
                      ("Fish -- Fish swim; a few glide.\nQuestion: do fish fly?\nAnswer:", " yes")], 0)
    arc = requests_and_gold(build_local_task("arc_easy", data_dir))[1]
    assert arc[1] == 1 and arc[0][1] == ("Question: What do plants need for photosynthesis?\nAnswer:", " light")
    wino = requests_and_gold(build_local_task("winogrande", data_dir))[1]
    assert wino == ([("The trophy didn't fit in the case because the trophy", " was too small."),
                     ("The trophy didn't fit in the case because the case", " was too small.")], 1)
    lam = requests_and_gold(build_local_task("lambada_openai", data_dir))[1]
    assert lam[0] == [("The cat sat on the warm ", " mat")]  # split(" ") keeps an empty word


# --- task selection and errors ------------------------------------------------------------------
def test_parse_tasks_and_errors():
    assert parse_tasks(None) == list(KNOWN_TASKS) == parse_tasks("all")
    assert parse_tasks(" piqa,boolq,piqa ") == ["piqa", "boolq"]
    with pytest.raises(ConfigError, match="known tasks: boolq, piqa"):
        parse_tasks("boolq,mmlu")
    with pytest.raises(ConfigError, match="known tasks"):
        parse_tasks("")


@pytest.mark.parametrize("limit", [0, -3, 2.5])
def test_bad_limit_is_an_error(limit, data_dir):
    with pytest.raises(ConfigError, match="limit"):
        evaluate_zeroshot(None, None, "piqa", data_dir=data_dir, limit=limit, lm=ScriptedLM({}))


def test_missing_data_is_skipped_loudly_and_all_missing_is_an_error(data_dir, tmp_path_factory, capsys):
    (data_dir / "hellaswag/hellaswag_val.jsonl").unlink()
    res = evaluate_zeroshot(None, None, "hellaswag,piqa", data_dir=data_dir, lm=ScriptedLM({}, default=-1.0))
    assert list(res.tasks) == ["piqa"]
    assert "hellaswag_val.jsonl not found" in res.skipped["hellaswag"]
    assert res.average["tasks"] == ["piqa"] and res.average["missing"] == ["hellaswag"]
    assert "skipping hellaswag" in capsys.readouterr().err
    assert "skipped" in format_zeroshot_table(res)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DataError, match="none of the tasks"):
        evaluate_zeroshot(None, None, "piqa", data_dir=empty, lm=ScriptedLM({}))
    with pytest.raises(DataError, match="does not exist"):
        evaluate_zeroshot(None, None, "piqa", data_dir=empty / "nope", lm=ScriptedLM({}))


def test_bad_local_file_names_the_line(data_dir):
    (data_dir / "piqa/valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(DataError, match="4 questions but .* 2 labels"):
        build_local_task("piqa", data_dir)
    (data_dir / "boolq/dev.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match="record 1 has no field 'answer'"):
        build_local_task("boolq", data_dir)


# --- accuracy from log-likelihoods we control --------------------------------------------------
class ScriptedLM(LM):
    """An lm-eval LM whose answers are a table: (context, continuation) -> (loglik, is_greedy)."""

    def __init__(self, table: dict, default: float | None = None):
        super().__init__()
        self.table, self.default, self.seen = table, default, []

    def loglikelihood(self, requests, disable_tqdm=False):
        out = []
        for r in requests:
            self.seen.append(r.args)
            if r.args in self.table:
                out.append(self.table[r.args])
            elif self.default is not None:
                out.append((self.default, False))
            else:
                raise KeyError(r.args)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


def test_accuracy_by_hand_with_scripted_loglikelihoods(data_dir):
    q = "Question: {}\nAnswer:".format
    piqa = FIXTURES["piqa/valid.jsonl"]
    # gold labels 0, 0, 1, 0 (valid-labels.lst).
    table = {
        # doc 0: sol1 more likely -> acc 1; per character sol2 is better -> acc_norm 0
        (q(piqa[0]["goal"]), " " + piqa[0]["sol1"]): (-10.0, False),  # 14 chars: -0.714/char
        (q(piqa[0]["goal"]), " " + piqa[0]["sol2"]): (-12.0, False),  # 26 chars: -0.462/char
        # doc 1: sol2 more likely (acc 0); per char sol2 too (acc_norm 0)
        (q(piqa[1]["goal"]), " " + piqa[1]["sol1"]): (-30.0, False),
        (q(piqa[1]["goal"]), " " + piqa[1]["sol2"]): (-20.0, False),
        # doc 2: sol2 (gold) more likely both ways
        (q(piqa[2]["goal"]), " " + piqa[2]["sol1"]): (-20.0, False),
        (q(piqa[2]["goal"]), " " + piqa[2]["sol2"]): (-5.0, False),
        # doc 3: sol1 (gold, 26 chars) -8 vs sol2 (21 chars) -7.5: acc 0, acc_norm 1
        (q(piqa[3]["goal"]), " " + piqa[3]["sol1"]): (-8.0, False),
        (q(piqa[3]["goal"]), " " + piqa[3]["sol2"]): (-7.5, False),
    }
    lam = FIXTURES["lambada_openai/lambada_test.jsonl"]
    lam_ll = [-2.0, -0.5, -3.5]
    for rec, ll, greedy in zip(lam, lam_ll, [True, False, True]):
        words = rec["text"].split(" ")
        table[(" ".join(words[:-1]), " " + words[-1])] = (ll, greedy)
    lm = ScriptedLM(table)
    res = evaluate_zeroshot(None, None, ["piqa", "lambada_openai"], data_dir=data_dir, lm=lm)
    p, la = res.tasks["piqa"], res.tasks["lambada_openai"]
    assert p.n == p.n_total == 4 and la.n == 3
    assert p.acc == pytest.approx(2 / 4)  # docs 0 and 2
    assert p.acc_norm == pytest.approx(2 / 4)  # docs 2 and 3
    assert p.acc_stderr == pytest.approx(math.sqrt(0.25 / 3))  # sample std / sqrt(n)
    assert la.acc == pytest.approx(2 / 3)
    assert la.perplexity == pytest.approx(math.exp(-sum(lam_ll) / 3))
    assert res.average["value"] == pytest.approx((2 / 4 + 2 / 3) / 2)
    assert res.average["tasks"] == ["piqa", "lambada_openai"]
    assert len(lm.seen) == 8 + 3


def test_limit_takes_the_first_examples(data_dir):
    lm = ScriptedLM({}, default=-1.0)
    res = evaluate_zeroshot(None, None, "arc_easy,winogrande", data_dir=data_dir, limit=2, lm=lm)
    assert res.tasks["arc_easy"].n == 2 and res.tasks["arc_easy"].n_total == 4
    assert res.limit == 2 and res.tasks["winogrande"].n == 2
    # equal scores: argmax picks the first choice (A for arc e1 -> wrong, "1" for e2 -> wrong)
    assert res.tasks["arc_easy"].acc == 0.0


def test_result_schema_is_stable(data_dir):
    res = evaluate_zeroshot(None, None, "boolq,lambada_openai", data_dir=data_dir,
                            lm=ScriptedLM({}, default=-1.0))
    d = res.to_dict()
    assert set(d) == {"kind", "num_fewshot", "limit", "batch_size", "data_dir", "lm_eval_version",
                      "seconds", "requested", "tasks", "skipped", "average"}
    for r in d["tasks"].values():
        assert set(r) == {"task", *METRICS, "n", "n_total", "source", "version"}
    assert d["tasks"]["boolq"]["acc_norm"] is None and d["tasks"]["lambada_openai"]["perplexity"] > 0
    json.dumps(d)
    assert isinstance(res, ZeroShotResult)


# --- a real (tiny) model through HFLM against a plain log-likelihood computation ----------------
def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def reference_loglik(model, tok, ctx: str, cont: str) -> tuple[float, bool]:
    # lm-eval scores a context's trailing whitespace as part of the continuation
    n_space = len(ctx) - len(ctx.rstrip())
    if n_space:
        ctx, cont = ctx[:-n_space], ctx[-n_space:] + cont
    ctx_ids = tok(ctx)["input_ids"]
    ids = tok(ctx + cont)["input_ids"]
    cont_ids = ids[len(ctx_ids):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    rows = logp[len(ctx_ids) - 1:]
    ll = sum(rows[j, t].item() for j, t in enumerate(cont_ids))
    return ll, bool(all(rows[j].argmax().item() == t for j, t in enumerate(cont_ids)))


class Wrapped(torch.nn.Module):
    """Not a PreTrainedModel: just a module with the HF forward and a config."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, **kw):
        return self.inner(input_ids=input_ids, **kw)


def test_tiny_model_accuracy_matches_plain_loglikelihoods(data_dir):
    from pgprune.evaluate.zeroshot import make_lm
    from pgprune.models.synthetic import synthetic_model

    tok = byte_tokenizer()
    model = synthetic_model("llama", seed=3, vocab_size=260, max_position_embeddings=512)
    expected = {}
    for task in ("piqa", "arc_easy", "winogrande"):
        docs = requests_and_gold(build_local_task(task, data_dir))
        correct = 0
        for reqs, gold in docs:
            lls = [reference_loglik(model, tok, c, x)[0] for c, x in reqs]
            ranked = sorted(lls, reverse=True)
            assert ranked[0] - ranked[1] > 1e-3, "near tie: pick another seed"
            correct += int(max(range(len(lls)), key=lls.__getitem__) == gold)
        expected[task] = correct / len(docs)
    assert 0 < sum(expected.values()) < len(expected)  # not a degenerate all-right/all-wrong case
    for subject in (model, Wrapped(model)):
        subject.train()  # evaluation must put it back the way it was
        res = evaluate_zeroshot(subject, tok, list(expected), data_dir=data_dir, batch_size=3)
        assert subject.training
        for task, acc in expected.items():
            assert res.tasks[task].acc == pytest.approx(acc), (type(subject).__name__, task)

    # the log-likelihoods themselves, including LAMBADA's context with a trailing space
    lm = make_lm(model.eval(), tok, batch_size=2)
    reqs = [args for r, _ in requests_and_gold(build_local_task("lambada_openai", data_dir)) for args in r]

    class Req:  # the request shape lm-eval passes (an Instance with .args)
        def __init__(self, args):
            self.args = args

    got = lm.loglikelihood([Req(a) for a in reqs], disable_tqdm=True)
    for a, (ll, greedy) in zip(reqs, got):
        ref_ll, ref_greedy = reference_loglik(model, tok, *a)
        assert ll == pytest.approx(ref_ll, abs=1e-3) and greedy == ref_greedy


# --- command line ------------------------------------------------------------------------------
def test_cli_eval_tasks_writes_the_common_schema(tmp_path, data_dir, capsys):
    from pgprune.cli import main
    from pgprune.models.synthetic import synthetic_model

    model = synthetic_model("llama", seed=0, vocab_size=260, max_position_embeddings=512)
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    (data_dir / "hellaswag/hellaswag_val.jsonl").unlink()  # as in the shared data folder
    out = tmp_path / "r.json"
    rc = main(["eval", str(tmp_path / "m"), "--ppl", "none", "--tasks", "hellaswag,piqa", "--limit", "2",
               "--data-dir", str(data_dir), "--dtype", "fp32", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "piqa" in printed.out and "skipped" in printed.out and "skipping hellaswag" in printed.err
    d = json.loads(out.read_text())
    assert d["schema"] == "pgprune.eval/1" and d["perplexity"] is None and d["speed"] is None
    assert d["zeroshot"]["tasks"]["piqa"]["n"] == 2 and "hellaswag" in d["zeroshot"]["skipped"]
    assert d["zeroshot"]["average"]["tasks"] == ["piqa"]


@pytest.mark.parametrize("argv, message", [(["--tasks", "boolq,mmlu"], "known tasks: boolq"),
                                           (["--tasks", "piqa", "--limit", "0"], "limit")])
def test_cli_eval_bad_options_fail_before_loading(argv, message, tmp_path, capsys):
    from pgprune.cli import main

    assert main(["eval", str(tmp_path / "not-loaded"), "--ppl", "none", *argv]) == 1
    assert message in capsys.readouterr().err
