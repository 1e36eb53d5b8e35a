"""BIG-Bench Hard: loading, chat prompts, answer extraction, scoring, and the two evaluation modes.

``generate`` (the research's way): each example is the user turn of a chat, the model answers
by greedy decoding, the answer is extracted from the reply and compared with the target.
``loglik`` (the Open LLM Leaderboard way): for examples with a closed answer set, the model's
log-likelihood of each candidate answer after the prompt picks its choice; no decoding, so
it is much cheaper. Free-form tasks are skipped (and reported) in that mode.
"""

from __future__ import annotations

import inspect
import json
import re
import string
from pathlib import Path

import torch

from ..data.padding import pad_sequences
from ..inference import chat_prompt, eval_mode, generate_replies, model_device

#: the 27 tasks of BIG-Bench Hard
TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)
DEFAULT_HUB_DATASET = "lukaemon/bbh"
MODES = ("generate", "loglik")

# ----------------------------------------------------------------------------- loading


def load_bbh(source: str | Path | None = None, tasks=None, limit: int | None = None, *,
             dataset: str | None = None) -> dict[str, list[dict]]:
    """BBH examples per task, ``{task: [{"input", "target"}, ...]}`` in task-name order.

    ``source``: a local folder of task JSON files (``<task>.json`` holding
    ``{"examples": [{"input", "target"}]}``, directly or under ``bbh/`` as in the original
    repository); it must exist, it is never taken for a hub id. ``dataset``: a hub dataset id
    instead (default ``lukaemon/bbh`` when neither is given): either one config per task with a
    ``test`` split, or a repository of task JSON files. ``tasks``: names (a list or a
    comma-separated string; default every task present). ``limit``: the first N examples of
    each task.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples per task, got {limit}")
    if source is not None and dataset is not None:
        raise ValueError(f"give a local BBH folder ({source}) or a hub dataset ({dataset}), not both")
    if source is not None:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"BBH folder not found: {source} (a hub dataset is read with dataset=... "
                                    f"in Python, --bbh-dataset on the command line, bbh_dataset in experiment configs)")
        available, read, where = _local_task_files(path), _read_task_file, str(source)
    else:
        where = dataset or DEFAULT_HUB_DATASET
        available, read = _hub_tasks(where)
    data = {}
    for task in select_tasks(tasks, available):
        examples = read(available[task])[:limit]
        if not examples:
            raise ValueError(f"BBH task {task!r} from {where} has no examples")
        data[task] = examples
    return data


def select_tasks(tasks, available) -> list[str]:
    """The requested task names (all of ``available`` when ``tasks`` is empty), validated."""
    if isinstance(tasks, str):
        tasks = [name.strip() for name in tasks.split(",") if name.strip()]
    if not tasks:
        return sorted(available)
    unknown = [name for name in tasks if name not in available]
    if unknown:
        raise ValueError(f"unknown BBH task(s) {', '.join(unknown)}; available: {', '.join(sorted(available))}")
    return list(dict.fromkeys(tasks))


def _local_task_files(folder: Path) -> dict[str, Path]:
    files = sorted(folder.glob("*.json")) or sorted((folder / "bbh").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no BBH task files (<task>.json) in {folder} or {folder / 'bbh'}")
    return {file.stem: file for file in files}


def _read_task_file(file) -> list[dict]:
    with open(file, encoding="utf-8") as handle:
        content = json.load(handle)
    if not isinstance(content, dict) or not isinstance(content.get("examples"), list):
        raise ValueError(f"{file} is not a BBH task file: expected {{\"examples\": [{{\"input\", \"target\"}}]}}")
    return [_example(row, file) for row in content["examples"]]


def _example(row, where) -> dict:
    if not isinstance(row, dict) or "input" not in row or "target" not in row:
        raise ValueError(f"a BBH example in {where} lacks 'input' or 'target': {str(row)[:200]}")
    return {"input": str(row["input"]), "target": str(row["target"])}


def _hub_tasks(repo: str):
    """``(task -> handle, reader)`` for a hub dataset: task JSON files if it has them, else configs."""
    import huggingface_hub

    files = huggingface_hub.list_repo_files(repo, repo_type="dataset")
    json_files = {Path(name).stem: name for name in files if name.endswith(".json") and Path(name).stem in TASKS}
    if json_files:
        def read(name):
            return _read_task_file(huggingface_hub.hf_hub_download(repo, name, repo_type="dataset"))

        return json_files, read

    def read_config(task):
        import datasets

        return [_example(row, f"{repo}/{task}") for row in datasets.load_dataset(repo, task, split="test")]

    return {task: task for task in TASKS}, read_config


# ----------------------------------------------------------------------------- answers and scoring

_BINARY = {"true": "false", "false": "true", "yes": "no", "no": "yes", "valid": "invalid", "invalid": "valid"}
_BRACKETS = "()[]{}<>"
_NUMBER_WORDS = {word: index for index, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split()
)}
# "the answer is", "Answer:", "final answer would be" ...; the last one in a reply wins.
_MARKER = re.compile(r"\banswers?\s*(?:(?:is|would be|should be|will be)\b\s*:?|:|=)", re.IGNORECASE)
_LETTER = re.compile(r"\(([A-Z])\)|(?<![A-Za-z])([A-Z])\)|\b[Oo]ption\s+([A-Z])\b")
_BARE_LETTER = re.compile(r"^[\s\"'*_:`-]*([A-Z])(?:[.):,]|\s*$)")
_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")
_BRACKET_RUN = re.compile(r"[()\[\]{}<>](?:[\s,]*[()\[\]{}<>])*")
_OPTION_LINE = re.compile(r"^\s*\(([A-Z])\)\s*(.*?)\s*$", re.MULTILINE)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation + "‘’“”")


def answer_kind(target: str) -> str:
    """How a target is matched: ``choice`` ("(B)"), ``binary`` (True/False, Yes/No,
    valid/invalid), ``number``, ``brackets`` (dyck closers such as ") ] }") or ``text``."""
    target = target.strip()
    if re.fullmatch(r"\([A-Z]\)", target):
        return "choice"
    if target.lower() in _BINARY:
        return "binary"
    if _parse_number(target) is not None and _NUMBER.fullmatch(target):
        return "number"
    if target and all(char in _BRACKETS or char.isspace() for char in target):
        return "brackets"
    return "text"


def normalize(text: str) -> str:
    """Lowercase, punctuation and articles removed, whitespace collapsed."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def extract_answer(response: str, target: str, question: str | None = None) -> str | None:
    """The answer found in ``response`` in the canonical form of ``target``'s kind (see
    :func:`canonical`), or None when the reply holds no answer of that kind.

    After an "answer is" / "Answer:" marker the first answer of the right kind is taken;
    without one, an answer the reply opens with, else its last one. ``question`` (the
    example's input) lets a reply that gives an option's text instead of its letter count,
    and lets a dyck reply that repeats the input sequence before the closers count.
    """
    text = response.replace("**", "").replace("__", "").replace("`", "")
    marked = list(_MARKER.finditer(text))
    if marked:
        answer = _extract(text[marked[-1].end():], True, target, question)
        if answer is not None:
            return answer
    # No marker, or nothing usable after it ("My answer:" closing the reply).
    return _extract(text, False, target, question)


def _extract(span: str, marked: bool, target: str, question: str | None) -> str | None:
    kind = answer_kind(target)
    if kind == "choice":
        return _extract_choice(span, marked, question)
    if kind == "binary":
        return _extract_binary(span, marked, _BINARY[target.strip().lower()], target.strip().lower())
    if kind == "number":
        return _extract_number(span, marked)
    if kind == "brackets":
        return _extract_brackets(span, marked, question)
    if marked:
        span = re.split(r"\n|(?<=\w)\.\s", span.strip(), maxsplit=1)[0]
    return _text_key(span, target)


def canonical(target: str) -> str:
    """``target`` in the form :func:`extract_answer` returns for it."""
    kind = answer_kind(target)
    target = target.strip()
    if kind == "choice":
        return target
    if kind == "binary":
        return target.lower()
    if kind == "number":
        return _format_number(_parse_number(target))
    if kind == "brackets":
        return " ".join(char for char in target if not char.isspace())
    return _text_key(target, target)


def is_correct(response: str, target: str, question: str | None = None) -> bool:
    """Whether ``response`` answers a BBH example whose gold answer is ``target``."""
    predicted = extract_answer(response, target, question)
    return predicted is not None and predicted == canonical(target)


def _first_or_opening_or_last(matches: list, span: str, marked: bool):
    """The answer after a marker is its first mention; without a marker a reply that opens
    with an answer means it, otherwise its conclusion (last mention) does."""
    if not matches:
        return None
    if marked or not span[: matches[0].start()].strip(" \t\n\"'*_:#>-"):
        return matches[0]
    return matches[-1]


def _extract_choice(span: str, marked: bool, question: str | None) -> str | None:
    bare = _BARE_LETTER.match(span)
    if bare:
        return f"({bare.group(1)})"
    match = _first_or_opening_or_last(list(_LETTER.finditer(span)), span, marked)
    if match:
        return f"({next(group for group in match.groups() if group)})"
    return _choice_by_option_text(span, question) if question else None


def _choice_by_option_text(span: str, question: str) -> str | None:
    """The option whose text the reply names, when exactly one does (ignoring options whose
    text is part of a longer named option)."""
    options = {letter: normalize(text) for letter, text in _OPTION_LINE.findall(question)}
    reply = f" {normalize(span)} "
    named = {letter: text for letter, text in options.items() if text and f" {text} " in reply}
    maximal = [letter for letter, text in named.items()
               if not any(text != other and text in other for other in named.values())]
    return f"({maximal[0]})" if len(maximal) == 1 else None


def _extract_binary(span: str, marked: bool, word: str, other: str) -> str | None:
    matches = list(re.finditer(rf"\b(?:{word}|{other})\b", span, re.IGNORECASE))
    match = _first_or_opening_or_last(matches, span, marked)
    return match.group(0).lower() if match else None


def _parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _extract_number(span: str, marked: bool) -> str | None:
    values = [value for value in map(_parse_number, (m.group(0) for m in _NUMBER.finditer(span))) if value is not None]
    if not values:
        words = re.findall(r"[a-z]+", span.lower())
        values = [float(_NUMBER_WORDS[word]) for word in words if word in _NUMBER_WORDS]
    if not values:
        return None
    return _format_number(values[0] if marked else values[-1])


def _extract_brackets(span: str, marked: bool, question: str | None) -> str | None:
    runs = _BRACKET_RUN.findall(span)
    if not runs:
        return None
    tokens = [char for char in (runs[0] if marked else runs[-1]) if char in _BRACKETS]
    if question and "Input:" in question:
        given = [char for char in question.rsplit("Input:", 1)[1] if char in _BRACKETS]
        if len(tokens) > len(given) and tokens[: len(given)] == given:
            tokens = tokens[len(given):]
    return " ".join(tokens)


def _text_key(text: str, target: str) -> str | None:
    """Normalized text; for a target that normalizes to nothing (punctuation only), its
    non-space symbols instead, so that an empty or unrelated reply never matches it."""
    if normalize(target):
        return normalize(text) or None
    symbols = " ".join(char for char in text if not char.isspace())
    return symbols or None


# ----------------------------------------------------------------------------- prompts and model calls


def build_prompt(tokenizer, question: str) -> str:
    """``question`` as the user turn of a chat, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "BBH puts each question to the model through its chat template, but this tokenizer has none; "
            "set tokenizer.chat_template (a Jinja template) first"
        )
    return chat_prompt(tokenizer, question)


def answer_choices(example: dict) -> list[str] | None:
    """The closed answer set of an example (option labels in its input, or the two words of a
    binary target), or None for free-form examples and ones whose target is not in the set."""
    target = example["target"].strip()
    kind = answer_kind(target)
    if kind == "choice":
        choices = [f"({letter})" for letter, _ in _OPTION_LINE.findall(example["input"])]
    elif kind == "binary":
        other = _BINARY[target.lower()]
        other = other.capitalize() if target[0].isupper() else other
        choices = sorted([target, other], key=lambda word: word.lower() not in ("true", "yes", "valid"))
    else:
        return None
    return choices if target in choices else None


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="ex")


@torch.no_grad()
def choice_logprobs(model, tokenizer, prompts: list[str], choices: list[list[str]], batch_size: int = 8,
                    progress: bool = False) -> list[list[float]]:
    """Summed log-probability of each candidate continuation after its prompt.

    Each prompt runs once; its key/value cache is then shared by all of its candidates.
    """
    if len(prompts) != len(choices):
        raise ValueError(f"got {len(prompts)} prompts but {len(choices)} choice lists")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[list[float]] = [[] for _ in prompts]
    with eval_mode(model), _progress(len(prompts), progress, "bbh loglik") as bar:
        for start in range(0, len(prompts), batch_size):
            rows = range(start, min(start + batch_size, len(prompts)))
            for index, values in zip(rows, _score_batch(model, tokenizer, [prompts[i] for i in rows],
                                                        [choices[i] for i in rows], pad, device)):
                scores[index] = values
            bar.update(len(rows))
    return scores


def _cache_argument(model) -> str:
    """The name transformers gives the key/value cache (``cache`` from 5.x's later releases on)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _score_batch(model, tokenizer, prompts, choices, pad, device) -> list[list[float]]:
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    input_ids, mask = pad_sequences(prompt_ids, pad, side="left")  # every prompt ends at the last column
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    owner = [row for row, options in enumerate(choices) for _ in options]
    candidate_ids = [tokenizer(c, add_special_tokens=False).input_ids for options in choices for c in options]
    if any(not ids for ids in candidate_ids):
        raise ValueError("an answer choice tokenizes to nothing")
    totals = torch.stack([first[row, ids[0]] for row, ids in zip(owner, candidate_ids)])
    longest = max(map(len, candidate_ids))
    if longest > 1:
        # Feed every candidate but its last token on top of its prompt's cache; the logits
        # then score tokens 2..n of each candidate.
        owner_index = torch.tensor(owner, device=device)
        cache_name = _cache_argument(model)
        cache = getattr(out, cache_name)
        cache.batch_select_indices(owner_index)
        steps = longest - 1
        tail = torch.full((len(owner), steps), pad, dtype=torch.long, device=device)
        tail_mask = torch.zeros_like(tail)
        for row, ids in enumerate(candidate_ids):
            tail[row, : len(ids) - 1] = torch.tensor(ids[:-1])
            tail_mask[row, : len(ids) - 1] = 1
        tail_positions = positions[owner_index, -1:] + 1 + torch.arange(steps, device=device)
        logits = model(input_ids=tail, attention_mask=torch.cat([mask[owner_index], tail_mask], dim=1),
                       position_ids=tail_positions, use_cache=True, **{cache_name: cache}).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, ids in enumerate(candidate_ids):
            if len(ids) > 1:
                following = torch.tensor(ids[1:], device=device)
                totals[row] += logprobs[row, torch.arange(len(ids) - 1, device=device), following].sum()
    values = totals.tolist()
    result, cursor = [], 0
    for options in choices:
        result.append(values[cursor : cursor + len(options)])
        cursor += len(options)
    return result


# ----------------------------------------------------------------------------- evaluation


def evaluate_bbh(model, tokenizer, data: dict[str, list[dict]], mode: str = "generate", batch_size: int = 8,
                 max_new_tokens: int = 256, progress: bool = True) -> dict:
    """Score ``data`` (from :func:`load_bbh`) in ``mode`` (``generate`` or ``loglik``).

    Returns ``{"mode", "tasks": {task: {"accuracy", "correct", "total", "skipped"}}, "average"
    (macro over scored tasks), "skipped_tasks": {task: reason}, "examples": [per-example records]}``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown BBH mode {mode!r}; choose one of: {', '.join(MODES)}")
    if not data:
        raise ValueError("no BBH tasks to evaluate")
    items = [(task, index, example) for task, examples in data.items() for index, example in enumerate(examples)]
    records = []
    if mode == "generate":
        prompts = [build_prompt(tokenizer, example["input"]) for _, _, example in items]
        replies = generate_replies(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   progress=progress, desc="bbh generate")
        for (task, index, example), reply in zip(items, replies):
            records.append({"task": task, "index": index, "target": example["target"], "response": reply,
                            "predicted": extract_answer(reply, example["target"], example["input"]),
                            "correct": is_correct(reply, example["target"], example["input"])})
    else:
        closed = [(item, answer_choices(item[2])) for item in items]
        closed = [(item, options) for item, options in closed if options]
        scores = choice_logprobs(model, tokenizer, [build_prompt(tokenizer, item[2]["input"]) for item, _ in closed],
                                 [options for _, options in closed], batch_size, progress)
        for ((task, index, example), options), values in zip(closed, scores):
            choice = options[max(range(len(options)), key=values.__getitem__)]
            records.append({"task": task, "index": index, "target": example["target"], "choices": options,
                            "logprobs": values, "predicted": choice, "correct": choice == example["target"].strip()})
    return _summarize(data, records, mode)


def _summarize(data, records, mode) -> dict:
    tasks, skipped_tasks = {}, {}
    for task, examples in data.items():
        scored = [record for record in records if record["task"] == task]
        if not scored:
            skipped_tasks[task] = "free-form answers: no closed answer set to score by log-likelihood"
            continue
        correct = sum(record["correct"] for record in scored)
        tasks[task] = {"accuracy": correct / len(scored), "correct": correct, "total": len(scored),
                       "skipped": len(examples) - len(scored)}
    average = sum(entry["accuracy"] for entry in tasks.values()) / len(tasks) if tasks else None
    return {"mode": mode, "tasks": tasks, "average": average, "skipped_tasks": skipped_tasks, "examples": records}
