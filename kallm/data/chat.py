"""Chat datasets in the ``messages`` format: loading, cleaning, tokenization with an
assistant-only loss mask, packing and batching.

A conversation is a list of ``{"role", "content"}`` messages with roles ``system``, ``user``
and ``assistant``. Rows that cannot be trained on are dropped and counted by reason (see
``SKIP_REASONS``) instead of failing somewhere inside a batch.

Training (``kallm.train``) and evaluation (``kallm.eval.chat_loss``) both read chat data through
this module, so a held-out loss is computed on exactly the tokens training targets.
"""

from __future__ import annotations

import bisect
import glob
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jinja2 import TemplateError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
TRUNCATION = ("truncate", "skip")
#: why a row was dropped
SKIP_REASONS = {
    "invalid_json": "a line of a JSONL file is not valid JSON",
    "no_messages": "the row has no 'messages' list",
    "bad_message": "a message is not a dict with string 'role' and 'content'",
    "unknown_role": f"a message has a role other than {', '.join(ROLES)}",
    "empty": "the conversation has no messages",
    "no_assistant": "the conversation has no assistant turn",
    "template_error": "the chat template refused the conversation",
    "template_mismatch": "the chat template renders a prefix of the conversation differently from the whole",
    "too_long": "longer than max_length (truncation='skip'), or no assistant token left after truncation",
}
_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
IGNORE_INDEX = -100


class TemplateMismatch(ValueError):
    """A chat template rendered a prefix of a conversation differently from the whole."""


@dataclass
class DataStats:
    """What happened to the rows of a dataset on their way to training."""

    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    tokens: int = 0
    assistant_tokens: int = 0
    packed_rows: int | None = None
    #: reason -> where the first row skipped for it is (``file line N``, ``file row N`` or ``row N``)
    first_skipped: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "rows": self.rows, "kept": self.kept, "skipped": dict(self.skipped), "truncated": self.truncated,
            "tokens": self.tokens, "assistant_tokens": self.assistant_tokens, "packed_rows": self.packed_rows,
            "first_skipped": dict(self.first_skipped),
        }

    def describe_skipped(self, explain: bool = False) -> str:
        """``"2 invalid_json (first at chat.jsonl line 3), 1 empty (...)"``, or ``"none"``; ``explain``
        adds what each reason means."""
        parts = []
        for reason, count in sorted(self.skipped.items()):
            details = [SKIP_REASONS[reason]] if explain else []
            if reason in self.first_skipped:
                details.append(f"first at {self.first_skipped[reason]}")
            parts.append(f"{count} {reason}" + (f" ({'; '.join(details)})" if details else ""))
        return ", ".join(parts) or "none"

    def describe(self) -> str:
        skipped = self.describe_skipped()
        return (f"{self.kept} of {self.rows} conversations kept (skipped: {skipped}; truncated: {self.truncated}); "
                f"{self.tokens:,} tokens, {self.assistant_tokens:,} in assistant turns")


def clean_messages(messages) -> tuple[list[dict] | None, str | None]:
    """``(messages reduced to role and content, None)``, or ``(None, reason)`` for a bad row."""
    if not isinstance(messages, (list, tuple)):
        return None, "no_messages"
    if not messages:
        return None, "empty"
    cleaned = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            return None, "bad_message"
        if message["role"] not in ROLES:
            return None, "unknown_role"
        cleaned.append({"role": message["role"], "content": message["content"]})
    if not any(message["role"] == "assistant" for message in cleaned):
        return None, "no_assistant"
    return cleaned, None


def load_conversations(source, split: str = "train", limit: int | None = None, num_proc: int | None = None):
    """A ``datasets.Dataset`` with columns ``messages`` (cleaned, or None) and ``skip``
    (the reason a row is unusable, or ``""``).

    ``source``: a local ``.jsonl``/``.json``/``.parquet`` file, a folder or glob of them, a hub
    dataset id (``"name"`` or ``"name:config"``, read with ``datasets.load_dataset``), a
    ``datasets.Dataset``, or a list of rows. ``limit`` keeps the first rows only.
    """
    from datasets import Dataset

    if isinstance(source, list):
        return _from_rows(source[:limit] if limit is not None else source)
    if isinstance(source, Dataset):
        return _clean_dataset(source, limit, num_proc)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"data must be a path, a hub dataset id, a datasets.Dataset or a list of rows, "
                        f"got {type(source).__name__}")
    files = _local_files(str(source))
    if files is None:
        return _clean_dataset(_load_hub(str(source), split), limit, num_proc)
    if all(_FORMATS[Path(f).suffix] == "parquet" for f in files):
        return _clean_dataset(Dataset.from_parquet(files), limit, num_proc)
    rows, origins = [], []
    for file in files:
        file_rows, file_origins = _read_json_rows(file)
        rows += file_rows
        origins += file_origins
    if limit is not None:
        rows, origins = rows[:limit], origins[:limit]
    return _from_rows(rows, origins)


def _local_files(source: str) -> list[str] | None:
    """The data files ``source`` names, or None when it is a hub id."""
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix in _FORMATS)
        if not files:
            raise FileNotFoundError(f"no {', '.join(_FORMATS)} files in folder {source}")
    elif glob.has_magic(source):
        files = sorted(glob.glob(source))
        if not files:
            raise FileNotFoundError(f"no files match {source}")
    elif path.is_file():
        files = [source]
    elif path.suffix in _FORMATS or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"data file not found: {source}")
    else:
        return None
    unknown = [f for f in files if Path(f).suffix not in _FORMATS]
    if unknown:
        raise ValueError(f"unsupported data file {unknown[0]}; valid formats: {', '.join(_FORMATS)}")
    formats = {_FORMATS[Path(f).suffix] == "parquet" for f in files}
    if len(formats) > 1:
        raise ValueError(f"mix of parquet and JSON files in {source}; use one format")
    return files


def _load_hub(source: str, split: str):
    from datasets import load_dataset

    name, _, config = source.partition(":")
    return load_dataset(name, config or None, split=split)


#: stands for a line that is not valid JSON among the rows read from a JSONL file
_INVALID_LINE = object()


def _read_json_rows(file: str) -> tuple[list, list[str]]:
    """The rows of a JSON or JSONL file and where each comes from (``file line N`` / ``file row N``);
    a JSONL line that is not valid JSON is kept as ``_INVALID_LINE``, to be counted like any bad row."""
    text = Path(file).read_text(encoding="utf-8-sig")  # a byte-order mark is no part of the first row
    if Path(file).suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file} is not valid JSON ({error}); use .jsonl for one row per line") from error
        if not isinstance(rows, list):
            raise ValueError(f"{file} must hold a JSON list of rows, got {type(rows).__name__}")
        return rows, [f"{file} row {index}" for index in range(1, len(rows) + 1)]
    rows, origins = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            rows.append(_INVALID_LINE)
        origins.append(f"{file} line {number}")
    return rows, origins


def _from_rows(rows: list, origins: list[str] | None = None):
    from datasets import Dataset, Features, List, Value

    results = [(None, "invalid_json") if row is _INVALID_LINE
               else clean_messages(row.get("messages") if isinstance(row, dict) else None) for row in rows]
    columns = {"messages": [m for m, _ in results], "skip": [r or "" for _, r in results]}
    if origins is not None:
        columns["origin"] = origins
    # Typed explicitly: with every row skipped, inferred types would be null and the next step would fail.
    message = {"role": Value("string"), "content": Value("string")}
    features = {"messages": List(message), "skip": Value("string"), "origin": Value("string")}
    return Dataset.from_dict(columns, features=Features({name: features[name] for name in columns}))


def _clean_dataset(dataset, limit, num_proc):
    if "messages" not in dataset.column_names:
        raise ValueError(f"the dataset has no 'messages' column (columns: {', '.join(dataset.column_names)}); "
                         f"kallm trains on chat data as lists of {{'role', 'content'}} messages")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))

    def clean(batch):
        results = [clean_messages(messages) for messages in batch["messages"]]
        return {"messages": [m for m, _ in results], "skip": [r or "" for _, r in results]}

    return dataset.map(clean, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                       desc="checking conversations")


def _render(tokenizer, messages, add_generation_prompt=False, chat_template=None) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template)


def render_segments(tokenizer, messages: list[dict], chat_template: str | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, is_assistant_reply)`` pieces.

    The conversation is rendered prefix by prefix: for each assistant turn, the text the
    template adds after the generation prompt (the reply and its end-of-turn marker) is the
    assistant part; everything else (system, user turns, role headers) is not. Raises
    ``TemplateMismatch`` when a longer prefix does not extend the shorter one, as happens with
    templates that rewrite earlier turns.
    """
    segments, rendered = [], ""

    def extend(text: str, is_assistant: bool):
        nonlocal rendered
        if not text.startswith(rendered):
            raise TemplateMismatch(f"rendering {len(segments) + 1} pieces: {text!r} does not extend {rendered!r}")
        if len(text) > len(rendered):
            segments.append((text[len(rendered):], is_assistant))
        rendered = text

    for k, message in enumerate(messages):
        is_assistant = message["role"] == "assistant"
        if is_assistant:
            extend(_render(tokenizer, messages[:k], True, chat_template), False)
        extend(_render(tokenizer, messages[: k + 1], False, chat_template), is_assistant)
    return segments


def tokenize_conversation(tokenizer, messages: list[dict], chat_template: str | None = None) -> tuple[list, list]:
    """``(input_ids, assistant_mask)`` of a conversation in the tokenizer's chat template.

    Each piece from ``render_segments`` is tokenized on its own, so the tokens before each
    reply are exactly the prompt the model sees when it generates that reply.
    """
    segments = render_segments(tokenizer, messages, chat_template)
    encoded = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]
    input_ids, mask = [], []
    for ids, (_, is_assistant) in zip(encoded, segments):
        input_ids += ids
        mask += [int(is_assistant)] * len(ids)
    return input_ids, mask


def tokenize_conversations(dataset, tokenizer, max_length: int, truncation: str = "truncate",
                           chat_template: str | None = None, num_proc: int | None = None):
    """Add ``input_ids``, ``labels`` (-100 outside assistant replies) and ``length``; rows that
    fail get a ``skip`` reason. ``truncation``: ``"truncate"`` cuts long conversations at
    ``max_length`` tokens, ``"skip"`` drops them."""
    if truncation not in TRUNCATION:
        raise ValueError(f"unknown truncation {truncation!r}; valid choices: {', '.join(TRUNCATION)}")
    if getattr(tokenizer, "chat_template", None) is None and chat_template is None:
        raise ValueError("the tokenizer has no chat template; pass chat_template= (a Jinja template string)")

    def tokenize(batch):
        out = {"input_ids": [], "labels": [], "length": [], "assistant_tokens": [], "truncated": [], "skip": []}
        for messages, skip in zip(batch["messages"], batch["skip"]):
            ids, labels, truncated = [], [], False
            if not skip:
                try:
                    ids, mask = tokenize_conversation(tokenizer, messages, chat_template)
                except TemplateMismatch:
                    skip = "template_mismatch"
                except (TemplateError, ValueError):  # a template may refuse, e.g., non-alternating roles
                    skip = "template_error"
            if not skip:
                if len(ids) > max_length:
                    truncated = True
                    ids, mask = ids[:max_length], mask[:max_length]
                if truncated and truncation == "skip" or not any(mask):
                    skip, ids, mask = "too_long", [], []
                labels = [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
            out["assistant_tokens"].append(len(ids) - labels.count(IGNORE_INDEX))
            out["truncated"].append(truncated and not skip)
            out["skip"].append(skip)
        return out

    return dataset.map(tokenize, batched=True, remove_columns=["messages"], num_proc=num_proc,
                       desc="tokenizing conversations")


def prepare_chat_dataset(source, tokenizer, max_length: int = 1024, truncation: str = "truncate",
                         packing: bool = False, split: str = "train", limit: int | None = None,
                         chat_template: str | None = None, num_proc: int | None = None):
    """Load, clean and tokenize a chat dataset; returns ``(dataset, DataStats)``.

    The dataset has ``input_ids``, ``labels`` and ``length`` (plus ``position_ids`` when
    ``packing``). Raises ``ValueError`` when no conversation is left to train on.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    dataset = load_conversations(source, split=split, limit=limit, num_proc=num_proc)
    dataset = tokenize_conversations(dataset, tokenizer, max_length, truncation, chat_template, num_proc)
    skips = dataset["skip"]
    origins = dataset["origin"] if "origin" in dataset.column_names else [f"row {i}" for i in range(1, len(skips) + 1)]
    first_skipped = {}
    for skip, origin in zip(skips, origins):
        if skip:
            first_skipped.setdefault(skip, origin)
    reasons = Counter(skips)
    kept_count = reasons.pop("", 0)
    stats = DataStats(rows=len(dataset), kept=kept_count, skipped=dict(reasons), first_skipped=first_skipped)
    if kept_count == 0:
        where = f" ({source})" if isinstance(source, (str, Path)) else ""
        rows = f"{stats.rows} row" + ("" if stats.rows == 1 else "s")
        skipped = stats.describe_skipped(explain=True) if stats.rows else "it has no rows"
        raise ValueError(f"the chat data{where} holds no valid conversation ({rows}): {skipped}")
    kept = dataset.filter(lambda skip: [not s for s in skip], input_columns="skip", batched=True)
    stats.truncated = sum(kept["truncated"])
    stats.tokens = sum(kept["length"])
    stats.assistant_tokens = sum(kept["assistant_tokens"])
    kept = kept.remove_columns([c for c in ("skip", "truncated", "assistant_tokens", "origin") if c in kept.column_names])
    if packing:
        kept = pack(kept, max_length, num_proc)
        stats.packed_rows = len(kept)
    if stats.skipped:
        logger.warning("training data: %s", stats.describe())
    else:
        logger.info("training data: %s", stats.describe())
    return kept, stats


def pack(dataset, max_length: int, num_proc: int | None = None):
    """Pack tokenized conversations into rows of at most ``max_length`` tokens (best fit,
    longest first; a conversation is never split). ``position_ids`` restart at 0 for each
    conversation, which transformers reads as separate sequences: attention stays within
    each conversation, and the first token of each is never a target."""
    from datasets import Dataset

    lengths = dataset["length"]
    if max(lengths) > max_length:
        raise ValueError(f"a conversation has {max(lengths)} tokens, more than max_length={max_length}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), kept sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        position = bisect.bisect_left(free, (lengths[index], -1))
        if position < len(free):
            space, bin_index = free.pop(position)
        else:
            space, bin_index = max_length, len(bins)
            bins.append([])
        bins[bin_index].append(index)
        bisect.insort(free, (space - lengths[index], bin_index))

    def build(batch):
        members = [sorted(b) for b in batch["members"]]
        rows = dataset[[index for group in members for index in group]]
        out = {"input_ids": [], "labels": [], "position_ids": [], "length": []}
        cursor = 0
        for group in members:
            ids, labels, positions = [], [], []
            for ids_i, labels_i in zip(rows["input_ids"][cursor: cursor + len(group)],
                                       rows["labels"][cursor: cursor + len(group)]):
                ids += ids_i
                labels += [IGNORE_INDEX] + labels_i[1:]
                positions += range(len(ids_i))
            cursor += len(group)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["position_ids"].append(positions)
            out["length"].append(len(ids))
        return out

    return Dataset.from_dict({"members": bins}).map(build, batched=True, remove_columns=["members"],
                                                     num_proc=num_proc, desc="packing")


class ChatCollator:
    """Pads a list of tokenized rows into a batch (right padding; labels -100 on padding).

    Rows with ``position_ids`` (packed rows) get no attention mask, so transformers builds
    per-conversation masks from the positions; their padding continues as one more
    pseudo-sequence that is never a target.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        packed = "position_ids" in rows[0]
        batch = {"input_ids": [], "labels": [], "position_ids" if packed else "attention_mask": []}
        for row in rows:
            pad = width - len(row["input_ids"])
            batch["input_ids"].append(list(row["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(row["labels"]) + [IGNORE_INDEX] * pad)
            if packed:
                batch["position_ids"].append(list(row["position_ids"]) + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * len(row["input_ids"]) + [0] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
