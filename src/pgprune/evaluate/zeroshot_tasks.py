"""Offline definitions of the zero-shot tasks: lm-eval's prompts, choices and metrics over local files.

Every task here is a copy of one lm-evaluation-harness task (same name, same split, same
`doc_to_text` / `doc_to_target` / `doc_to_choice`, same metrics, same version) whose data comes
from a local file instead of the Hugging Face hub. Each reader turns the file's records into the
documents the hub dataset would give (same field names and values), so lm-eval's prompt templates
apply unchanged. tests/test_zeroshot.py checks, request by request, that the offline task asks the
model exactly what lm-eval's own task asks for the same records.

Local layout (relative to the data directory, as in /work/shared/data; see docs/evaluation.md):

| task           | file(s)                                                | lm-eval split |
|----------------|--------------------------------------------------------|---------------|
| boolq          | boolq/dev.jsonl (Google's release)                     | validation    |
| piqa           | piqa/valid.jsonl + piqa/valid-labels.lst               | validation    |
| hellaswag      | hellaswag/hellaswag_val.jsonl (original release)       | validation    |
| winogrande     | winogrande/dev.jsonl (winogrande 1.1, xl dev)          | validation    |
| arc_easy       | ai2_arc/ARC-Easy-Test.jsonl (AI2 release)              | test          |
| arc_challenge  | ai2_arc/ARC-Challenge-Test.jsonl                       | test          |
| openbookqa     | openbookqa/test.jsonl (OpenBookQA V1 Main)             | test          |
| lambada_openai | lambada_openai/lambada_test.jsonl (OpenAI's file)      | test          |
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pgprune.errors import DataError

# The order used everywhere (tables, averages): the usual pruning-paper order, LAMBADA last.
KNOWN_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
               "openbookqa", "lambada_openai")

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}


@dataclass(frozen=True)
class LocalTaskSpec:
    name: str
    files: tuple[str, ...]  # relative to the data directory; the first one holds the records
    split: str  # the split lm-eval evaluates; the local file is that split
    config: dict[str, Any]  # lm-eval TaskConfig fields (prompts, choices, metrics) as in lm-eval
    read: Callable[..., list[dict]]  # (*paths) -> documents in the hub dataset's schema
    hub_dataset: str  # what lm-eval's built-in task downloads, for the record
    note: str = ""
    extra: dict = field(default_factory=dict)

    def paths(self, data_dir: Path) -> list[Path]:
        return [Path(data_dir) / f for f in self.files]


# --- file readers -----------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """JSON lines, one record per non-empty line; errors name the file and line."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); the file should hold "
                                    "one JSON object per line") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def read_labels(path: Path) -> list[str]:
    try:
        labels = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    return [x for x in labels if x]


def _field(rec: dict, key: str, path: Path, i: int) -> Any:
    if key not in rec:
        raise DataError(f"{path}: record {i + 1} has no field {key!r} (fields: {sorted(rec)}); "
                        "is this the right file for the task? See docs/evaluation.md")
    return rec[key]


def _choices(rec: dict, path: Path, i: int) -> dict[str, list[str]]:
    """AI2 style {"question": {"stem", "choices": [{"text", "label"}]}} -> hub style choices."""
    q = _field(rec, "question", path, i)
    if not isinstance(q, dict) or "choices" not in q or "stem" not in q:
        raise DataError(f"{path}: record {i + 1}: 'question' should be an object with 'stem' and "
                        "'choices' (the AI2 release format)")
    return {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}


def _check_answer_key(key: str, labels: list[str], path: Path, i: int) -> None:
    # ARC mixes letter keys (A-E) and digit keys (1-4); a key always names one of its own labels.
    if key.strip() not in labels:
        raise DataError(f"{path}: record {i + 1}: answerKey {key!r} is not one of the choice labels "
                        f"{labels}")


def read_boolq(path: Path) -> list[dict]:
    # lm-eval reads SuperGLUE's copy of BoolQ dev: passage = title + " -- " + passage, label = answer.
    docs = []
    for i, r in enumerate(read_jsonl(path)):
        answer = _field(r, "answer", path, i)
        if not isinstance(answer, bool):
            raise DataError(f"{path}: record {i + 1}: 'answer' should be true/false, got {answer!r}")
        docs.append({"question": _field(r, "question", path, i),
                     "passage": f"{_field(r, 'title', path, i)} -- {_field(r, 'passage', path, i)}",
                     "idx": i, "label": int(answer)})
    return docs


def read_piqa(path: Path, labels_path: Path) -> list[dict]:
    records, labels = read_jsonl(path), read_labels(labels_path)
    if len(records) != len(labels):
        raise DataError(f"{path} has {len(records)} questions but {labels_path} has {len(labels)} "
                        "labels; they must be the matching pair from the PIQA release")
    docs = []
    for i, (r, lab) in enumerate(zip(records, labels)):
        if lab not in ("0", "1"):
            raise DataError(f"{labels_path}: line {i + 1}: label should be 0 or 1, got {lab!r}")
        docs.append({"goal": _field(r, "goal", path, i), "sol1": _field(r, "sol1", path, i),
                     "sol2": _field(r, "sol2", path, i), "label": int(lab)})
    return docs


def read_winogrande(path: Path) -> list[dict]:
    docs = []
    for i, r in enumerate(read_jsonl(path)):
        sentence, answer = _field(r, "sentence", path, i), str(_field(r, "answer", path, i))
        if "_" not in sentence or answer not in ("1", "2"):
            raise DataError(f"{path}: record {i + 1}: expected a sentence with a '_' blank and answer "
                            f"'1' or '2', got answer {answer!r}")
        docs.append({"sentence": sentence, "option1": _field(r, "option1", path, i),
                     "option2": _field(r, "option2", path, i), "answer": answer})
    return docs


def read_arc(path: Path) -> list[dict]:
    docs = []
    for i, r in enumerate(read_jsonl(path)):
        choices = _choices(r, path, i)
        key = _field(r, "answerKey", path, i)
        _check_answer_key(key, choices["label"], path, i)
        docs.append({"id": _field(r, "id", path, i), "question": r["question"]["stem"],
                     "choices": choices, "answerKey": key})
    return docs


def read_openbookqa(path: Path) -> list[dict]:
    docs = []
    for i, r in enumerate(read_jsonl(path)):
        choices = _choices(r, path, i)
        key = _field(r, "answerKey", path, i)
        _check_answer_key(key, choices["label"], path, i)
        docs.append({"id": _field(r, "id", path, i), "question_stem": r["question"]["stem"],
                     "choices": choices, "answerKey": key})
    return docs


def read_lambada(path: Path) -> list[dict]:
    return [{"text": _field(r, "text", path, i)} for i, r in enumerate(read_jsonl(path))]


def _hellaswag_clean(text: str) -> str:
    # Same cleaning as lm-eval's hellaswag task: WikiHow "[title]" marks become sentence breaks,
    # other bracketed tags are dropped, one pass of double-space removal.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {**doc, "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}


def read_hellaswag(path: Path) -> list[dict]:
    docs = []
    for i, r in enumerate(read_jsonl(path)):
        for key in ("activity_label", "ctx_a", "ctx_b", "endings", "label"):
            _field(r, key, path, i)
        # The hub copy stores label as a string; keep that so "{{label}}" renders identically.
        docs.append(hellaswag_process({**r, "label": str(r["label"])}))
    return docs


# --- winogrande's prompt functions: the blank splits the sentence; each option fills it to make
# one context, and the text after the blank is the shared continuation. doc_to_text returns the
# index of the right context (lm-eval's convention for "multiple inputs").
def winogrande_doc_to_text(doc: dict) -> int:
    return int(doc["answer"]) - 1


def winogrande_doc_to_target(doc: dict) -> str:
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def _mc(task: str, version: float, metrics: list[dict], **prompt) -> dict:
    return {"task": task, "output_type": "multiple_choice", "num_fewshot": 0,
            "metric_list": metrics, "metadata": {"version": version}, **prompt}


_ARC_PROMPT = dict(doc_to_text="Question: {{question}}\nAnswer:",
                   doc_to_target="{{choices.label.index(answerKey)}}",
                   doc_to_choice="{{choices.text}}")

SPECS: dict[str, LocalTaskSpec] = {s.name: s for s in [
    LocalTaskSpec(
        "boolq", ("boolq/dev.jsonl",), "validation",
        _mc("boolq", 2.0, [_ACC], doc_to_text="{{passage}}\nQuestion: {{question}}?\nAnswer:",
            doc_to_target="label", doc_to_choice=["no", "yes"]),
        read_boolq, "aps/super_glue boolq"),
    LocalTaskSpec(
        "piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation",
        _mc("piqa", 1.0, [_ACC, _ACC_NORM], doc_to_text="Question: {{goal}}\nAnswer:",
            doc_to_target="label", doc_to_choice="{{[sol1, sol2]}}"),
        read_piqa, "baber/piqa"),
    LocalTaskSpec(
        "hellaswag", ("hellaswag/hellaswag_val.jsonl",), "validation",
        _mc("hellaswag", 1.0, [_ACC, _ACC_NORM], doc_to_text="{{query}}",
            doc_to_target="{{label}}", doc_to_choice="choices"),
        read_hellaswag, "Rowan/hellaswag",
        note="the original hellaswag_val.jsonl (12 MB) is not in the offline data set"),
    LocalTaskSpec(
        "winogrande", ("winogrande/dev.jsonl",), "validation",
        _mc("winogrande", 1.0, [_ACC], doc_to_text=winogrande_doc_to_text,
            doc_to_target=winogrande_doc_to_target, doc_to_choice=winogrande_doc_to_choice),
        read_winogrande, "allenai/winogrande winogrande_xl"),
    LocalTaskSpec(
        "arc_easy", ("ai2_arc/ARC-Easy-Test.jsonl",), "test",
        _mc("arc_easy", 1.0, [_ACC, _ACC_NORM], **_ARC_PROMPT),
        read_arc, "allenai/ai2_arc ARC-Easy"),
    LocalTaskSpec(
        "arc_challenge", ("ai2_arc/ARC-Challenge-Test.jsonl",), "test",
        _mc("arc_challenge", 1.0, [_ACC, _ACC_NORM], **_ARC_PROMPT),
        read_arc, "allenai/ai2_arc ARC-Challenge"),
    LocalTaskSpec(
        "openbookqa", ("openbookqa/test.jsonl",), "test",
        _mc("openbookqa", 1.0, [_ACC, _ACC_NORM], doc_to_text="question_stem",
            doc_to_target="{{choices.label.index(answerKey.lstrip())}}",
            doc_to_choice="{{choices.text}}"),
        read_openbookqa, "allenai/openbookqa main"),
    LocalTaskSpec(
        "lambada_openai", ("lambada_openai/lambada_test.jsonl",), "test",
        {"task": "lambada_openai", "output_type": "loglikelihood", "num_fewshot": 0,
         "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
         "doc_to_target": "{{' '+text.split(' ')[-1]}}",
         "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                         _ACC],
         "metadata": {"version": 1.0}},
        read_lambada, "EleutherAI/lambada_openai default"),
]}
assert tuple(SPECS) == KNOWN_TASKS


def missing_files(name: str, data_dir: Path) -> list[Path]:
    return [p for p in SPECS[name].paths(data_dir) if not p.is_file()]


def load_local_docs(name: str, data_dir: Path) -> list[dict]:
    """The task's documents from `data_dir`, in the hub dataset's schema (before lm-eval prompts)."""
    spec = SPECS[name]
    missing = missing_files(name, data_dir)
    if missing:
        raise DataError(f"{name}: missing {', '.join(map(str, missing))}")
    return spec.read(*spec.paths(data_dir))


def build_local_task(name: str, data_dir: Path | None = None, docs: list[dict] | None = None):
    """An lm-eval ConfigurableTask for `name` reading `data_dir` (or the given documents)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    spec = SPECS[name]
    if docs is None:
        if data_dir is None:
            raise DataError(f"{name}: give a data directory or documents")
        docs = load_local_docs(name, Path(data_dir))
    if not docs:
        raise DataError(f"{name}: no documents")

    class _LocalTask(ConfigurableTask):
        # lm-eval's task downloads in __init__; ours builds the split from the local records.
        def download(self, dataset_kwargs=None, **kwargs) -> None:
            self.dataset = datasets.DatasetDict({spec.split: datasets.Dataset.from_list(docs)})

    config = dict(spec.config)
    config[f"{spec.split}_split"] = spec.split
    source = str(Path(data_dir) / spec.files[0]) if data_dir is not None else "<documents>"
    config["metadata"] = {**config["metadata"], "pgprune_source": source}
    return _LocalTask(config=config)
