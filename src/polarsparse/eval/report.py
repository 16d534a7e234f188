"""Accuracy tables (markdown) and JSON records of an evaluation run."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from polarsparse.eval.harness import TaskResult
from polarsparse.eval.tasks import MC_TASKS

ACCURACY_TASKS = ("lambada", *MC_TASKS)


def mean_accuracy(results: dict[str, TaskResult], variant: str) -> float | None:
    """Mean primary accuracy over the zero-shot tasks that were run (LAMBADA + multiple choice)."""
    accs = [r.metrics[variant]["primary"] for t, r in results.items() if t in ACCURACY_TASKS]
    return sum(accs) / len(accs) if accs else None


def _metric_name(task: str) -> str:
    if task == "ppl":
        return "perplexity (lower is better)"
    if task == "lambada":
        return "last-word acc"
    return MC_TASKS[task]


def _cell(task: str, value: float, base: float, is_base: bool) -> str:
    if task == "ppl":
        return f"{value:.2f}" if is_base else f"{value:.2f} ({(value / base - 1):+.1%})"
    return f"{100 * value:.1f}" if is_base else f"{100 * value:.1f} ({100 * (value - base):+.1f})"


def accuracy_markdown(results: dict[str, TaskResult], variants: list[str], baseline: str = "dense") -> str:
    """One row per task (+ mean zero-shot accuracy), one column per variant; deltas vs ``baseline``."""
    base = baseline if baseline in variants else variants[0]
    head = ["task", "items", "metric", *variants]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, r in results.items():
        b = r.metrics[base]["primary"]
        cells = [_cell(task, r.metrics[v]["primary"], b, v == base) for v in variants]
        rows.append(f"| {task} | {r.items} | {_metric_name(task)} | " + " | ".join(cells) + " |")
    means = {v: mean_accuracy(results, v) for v in variants}
    if means[base] is not None:
        cells = [_cell("mean", means[v], means[base], v == base) for v in variants]
        n = sum(t in ACCURACY_TASKS for t in results)
        rows.append(f"| **mean zero-shot** | {n} tasks | accuracy | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def read_results(paths: list[Path]) -> tuple[dict[str, TaskResult], list[str], list[dict]]:
    """Merge the tasks of several ``write_results`` files made with the same variants."""
    results: dict[str, TaskResult] = {}
    variants: list[str] | None = None
    metas = []
    for path in paths:
        payload = json.loads(Path(path).read_text())
        meta = payload["meta"]
        if variants is not None and meta["variants"] != variants:
            raise ValueError(f"{path} has variants {meta['variants']}, expected {variants}")
        variants = meta["variants"]
        metas.append(meta)
        results.update({t: TaskResult(**r) for t, r in payload["tasks"].items()})
    return results, variants or [], metas


def write_results(path: Path, results: dict[str, TaskResult], meta: dict) -> None:
    """JSON with every metric of every variant plus the run's metadata (command, settings, model)."""
    payload = {"meta": meta, "tasks": {t: asdict(r) for t, r in results.items()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1))
