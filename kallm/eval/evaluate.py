"""One entry point for every evaluation, and the writers of its report (markdown and JSON)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .bbh import MODES, evaluate_bbh, load_bbh
from .chat_loss import chat_loss
from .perplexity import load_text, perplexity

TASKS = ("bbh", "perplexity", "chat_loss")
DEFAULT_TEXT = "Salesforce/wikitext:wikitext-2-raw-v1"


def parse_tasks(tasks) -> list[str]:
    """Validated evaluation names from a list or a comma-separated string."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    tasks = [name.strip() for name in tasks if name.strip()]
    unknown = [name for name in tasks if name not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown evaluation(s) {', '.join(unknown) or '(none given)'}; choose from: {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def evaluate(model, tokenizer, tasks=("bbh", "perplexity"), *, bbh_source=None, bbh_dataset=None, bbh_tasks=None,
             limit: int | None = None, mode: str = "generate", batch_size: int = 8, max_new_tokens: int = 256,
             text: str = DEFAULT_TEXT, max_length: int = 512, max_tokens: int | None = None, chat_data=None,
             chat_limit: int | None = None, progress: bool = True) -> dict:
    """Evaluate ``model`` on ``tasks`` (any of ``bbh``, ``perplexity``, ``chat_loss``).

    BBH: ``bbh_source`` (a local folder, or examples already loaded by
    :func:`~kallm.eval.bbh.load_bbh`) or ``bbh_dataset`` (a hub dataset id; the default,
    ``lukaemon/bbh``, when neither is given), ``bbh_tasks`` (default
    every task present), ``limit`` examples per task, ``mode`` (``generate`` or ``loglik``),
    ``batch_size``, ``max_new_tokens``. Perplexity: ``text`` (a file or ``hub_id[:config]``;
    default WikiText-2 test), windows of ``max_length`` tokens, at most ``max_tokens``
    scored. Chat loss: ``chat_data`` (a file, folder or hub id of ``messages`` rows; required),
    its first ``chat_limit`` conversations. Returns ``{"model", <task>: results...}``, each
    with the ``seconds`` it took.
    """
    tasks = parse_tasks(tasks)
    if mode not in MODES:
        raise ValueError(f"unknown BBH mode {mode!r}; choose one of: {', '.join(MODES)}")
    if "chat_loss" in tasks and chat_data is None:
        raise ValueError("the chat_loss evaluation needs chat_data (a JSONL/JSON/parquet file or hub id of "
                         "'messages' conversations)")
    results = {"model": str(getattr(model.config, "_name_or_path", "") or type(model).__name__)}
    for task in tasks:
        started = time.perf_counter()
        if task == "bbh":
            data = bbh_source if isinstance(bbh_source, dict) else load_bbh(bbh_source, bbh_tasks, limit,
                                                                           dataset=bbh_dataset)
            results[task] = evaluate_bbh(model, tokenizer, data, mode, batch_size, max_new_tokens, progress)
        elif task == "perplexity":
            results[task] = {"source": str(text), **perplexity(model, tokenizer, load_text(str(text)), max_length,
                                                               max_tokens=max_tokens, batch_size=batch_size,
                                                               progress=progress)}
        else:
            results[task] = {"source": str(chat_data), **chat_loss(model, tokenizer, chat_data,
                                                                   batch_size=batch_size, limit=chat_limit,
                                                                   progress=progress)}
        results[task]["seconds"] = round(time.perf_counter() - started, 1)
    return results


def to_markdown(results: dict) -> str:
    """The report as markdown: one BBH table (accuracy per task and macro average) and
    the perplexity and chat-loss figures."""
    lines = [f"# Evaluation of {results.get('model', 'model')}", ""]
    bbh = results.get("bbh")
    if bbh:
        lines += [f"## BIG-Bench Hard ({bbh['mode']} mode)", "", "| task | accuracy | correct / scored |",
                  "| --- | ---: | ---: |"]
        for task, entry in bbh["tasks"].items():
            skipped = f" ({entry['skipped']} skipped)" if entry.get("skipped") else ""
            lines.append(f"| {task} | {100 * entry['accuracy']:.1f}% | {entry['correct']} / {entry['total']}{skipped} |")
        if bbh["average"] is not None:
            lines.append(f"| **average ({len(bbh['tasks'])} tasks, macro)** | **{100 * bbh['average']:.1f}%** | |")
        lines.append("")
        for task, reason in bbh.get("skipped_tasks", {}).items():
            lines.append(f"- {task}: not scored ({reason})")
        if bbh.get("skipped_tasks"):
            lines.append("")
    if "perplexity" in results:
        entry = results["perplexity"]
        lines += ["## Perplexity", "", "| text | perplexity | tokens |", "| --- | ---: | ---: |",
                  f"| {entry['source']} | {entry['perplexity']:.2f} | {entry['tokens']:,} |", ""]
    if "chat_loss" in results:
        entry = results["chat_loss"]
        skipped = sum(entry["skipped"].values())
        lines += ["## Held-out chat loss (assistant tokens)", "",
                  "| data | loss | perplexity | conversations | tokens |", "| --- | ---: | ---: | ---: | ---: |",
                  f"| {entry['source']} | {entry['loss']:.4f} | {entry['perplexity']:.2f} | "
                  f"{entry['conversations']} ({skipped} skipped, {entry['truncated']} truncated) | {entry['tokens']:,} |",
                  ""]
    if "harness" in results:
        entry = results["harness"]
        shots = "the tasks' own" if entry["num_fewshot"] is None else entry["num_fewshot"]
        lines += [f"## lm-evaluation-harness {entry['lm_eval_version']} ({shots} few-shot, "
                  f"{'chat template' if entry['chat_template'] else 'plain prompts'})", "",
                  "| task | metric | value |", "| --- | --- | ---: |"]
        lines += [f"| {task} | {metric} | {value:.4f} |" for task, metrics in entry["tasks"].items()
                  for metric, value in metrics.items()]
        lines.append("")
    return "\n".join(lines)


def card_results(results: dict) -> list:
    """The results of :func:`evaluate` as ``huggingface_hub.EvalResult`` entries of a model card's
    ``model-index``: the BBH macro average and each task's accuracy, the perplexity, the chat loss."""
    from huggingface_hub import EvalResult

    def result(data: str, metric: str, value: float, name: str, **extra) -> EvalResult:
        return EvalResult(task_type="text-generation", dataset_type=data, dataset_name=data, metric_type=metric,
                          metric_value=float(value), metric_name=name, **extra)

    entries = []
    bbh = results.get("bbh")
    if bbh and bbh["average"] is not None:
        entries.append(result("BBH", "accuracy", bbh["average"], f"BBH macro accuracy ({bbh['mode']} mode)"))
        entries += [result(f"BBH {task}", "accuracy", entry["accuracy"], f"accuracy ({bbh['mode']} mode)")
                    for task, entry in bbh["tasks"].items()]
    if "perplexity" in results:
        entry = results["perplexity"]
        entries.append(result(_public(entry["source"]), "perplexity", entry["perplexity"],
                              f"perplexity ({entry['tokens']:,} tokens)"))
    if "chat_loss" in results:
        entry = results["chat_loss"]
        entries.append(result(_public(entry["source"]), "loss", entry["loss"], "chat loss (assistant tokens)"))
    if "harness" in results:
        entries += [result(task, metric, value, f"{metric} (lm-evaluation-harness)")
                    for task, metrics in results["harness"]["tasks"].items() for metric, value in metrics.items()]
    return entries


def _public(source: str) -> str:
    from ..checkpoints.load import public_source_name

    return public_source_name(source)


def write_results(results: dict, out_dir) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and, for BBH, ``bbh_examples.jsonl`` (every
    example's reply or choice, to audit the scoring) into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    summary = {key: value for key, value in results.items()}
    if "bbh" in results:
        summary["bbh"] = {key: value for key, value in results["bbh"].items() if key != "examples"}
        paths["examples"] = out / "bbh_examples.jsonl"
        with open(paths["examples"], "w", encoding="utf-8") as handle:
            for record in results["bbh"].get("examples", []):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    paths["json"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(to_markdown(results) + "\n", encoding="utf-8")
    return paths
