"""lm-evaluation-harness on a loaded kallm model: ``kallm eval --harness TASKS`` (the ``kallm[harness]`` extra).

The model and tokenizer kallm loaded are handed to the harness as they are (``lm_eval``'s ``HFLM`` wraps a model
instance), so a retrofitted checkpoint, a ``.gguf`` file or the bundled model all work, offline with local task
YAMLs (``include`` folders). Results join kallm's report under ``"harness"``.
"""

from __future__ import annotations

import math
from pathlib import Path


def evaluate_harness(model, tokenizer, tasks, *, include: str | None = None, limit: int | None = None,
                     num_fewshot: int | None = None, batch_size: int = 8, chat_template: bool = True,
                     seed: int = 0) -> dict:
    """Run lm-evaluation-harness ``tasks`` (names or a comma-separated string; tasks of the harness's own
    catalogue or of the YAML files under ``include``) on ``model``. ``chat_template`` renders each prompt with
    the tokenizer's chat template, as kallm's BBH scorer does. Returns ``{"tasks": {task: {metric: value}},
    "limit", "num_fewshot", "chat_template", "lm_eval_version"}``."""
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    names, manager = check_harness_tasks(tasks, include)
    device = str(next(model.parameters()).device)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    output = lm_eval.simple_evaluate(
        model=wrapped, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        apply_chat_template=chat_template, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, log_samples=False, bootstrap_iters=0,
    )
    scores = {}
    for task, metrics in output["results"].items():
        scores[task] = {name.split(",")[0]: value for name, value in metrics.items()
                        if "," in name and not name.split(",")[0].endswith("_stderr")
                        and isinstance(value, (int, float)) and not math.isnan(value)}
    return {"tasks": scores, "limit": limit, "num_fewshot": num_fewshot, "chat_template": chat_template,
            "lm_eval_version": lm_eval.__version__}


def check_harness_tasks(tasks, include: str | None = None):
    """``(task names, lm_eval TaskManager)``; refuses task names neither the harness nor ``include`` knows."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    names = [name.strip() for name in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [name for name in names if name]
    if not names:
        raise ValueError("--harness needs at least one task name")
    if include is not None and not Path(include).is_dir():
        raise FileNotFoundError(f"--harness-include folder not found: {include}")
    # Indexing the harness's own catalogue takes a while; tasks that all come from ``include`` do without it.
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(name not in manager.all_tasks for name in names):
        manager = TaskManager(include_path=include)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = f" or the YAML files under {include}" if include else " (add local task YAMLs with --harness-include)"
        raise ValueError(f"unknown lm-evaluation-harness task(s) {', '.join(unknown)}: not in the harness's "
                         f"catalogue{where}")
    return names, manager


def write_bbh_tasks(data: dict[str, list[dict]], folder) -> list[str]:
    """Write BBH examples (from :func:`kallm.eval.bbh.load_bbh`) as lm-evaluation-harness tasks under
    ``folder``, scored the way kallm's ``loglik`` mode scores them: the question as the user turn, each answer of
    the closed set appended right after the prompt (no delimiter), the most likely one chosen. Free-form
    examples are left out, as in ``loglik`` mode. Returns the task names (``kallm_bbh_<task>``)."""
    import json

    import yaml

    from .bbh import answer_choices

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task, examples in data.items():
        rows = [{"input": example["input"], "choices": choices, "answer": choices.index(example["target"].strip())}
                for example in examples if (choices := answer_choices(example))]
        if not rows:
            continue
        name = f"kallm_bbh_{task}"
        rows_file = folder / f"{name}.jsonl"
        rows_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        spec = {
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(rows_file.resolve())}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{input}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        names.append(name)
    return names


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError("--harness runs lm-evaluation-harness, which is not installed: "
                          "pip install 'kallm[harness]' (or pip install lm-eval)") from error
    return lm_eval
