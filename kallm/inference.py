"""Running a model without training it: evaluation mode, chat generation in batches, and the summed negative
log-likelihood of target tokens. Shared by fit init, healing, evaluation and the demo."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .data.chat import IGNORE_INDEX


def model_device(model) -> torch.device:
    """The device of ``model``'s first parameter, where its inputs must go."""
    return next(model.parameters()).device


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """Run the block with ``model`` in evaluation mode (no dropout); its training flag is restored after, even
    when the block fails."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def chat_prompt(tokenizer, user_text: str) -> str:
    """``user_text`` as the user turn of a chat in the tokenizer's template, ready for the assistant's reply."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                         add_generation_prompt=True)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The end-of-sequence ids of the model's generation config and of the tokenizer: a reply ends at any."""
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    return list(dict.fromkeys(eos + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 8,
             temperature: float | None = None, top_p: float | None = None, seed: int = 0, progress: bool = False,
             desc: str = "generating") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Replies of ``model`` to already formatted ``prompts`` (see :func:`chat_prompt`), as ``(prompt_ids,
    reply_ids)`` per prompt: CPU token ids without padding, the reply up to and including its first stop token.

    Greedy unless ``temperature`` is given; sampling is seeded with ``seed`` and leaves the global random state
    as it was, so the same model always writes the same text. Prompts run longest first in left-padded batches
    of ``batch_size`` (similar lengths share a batch, and memory trouble shows at once), on the model's device,
    in evaluation mode; the tokenizer's padding side is restored after.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    device = model_device(model)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0] if stops else 0
    # Both modes name every sampling setting, so that a generation config's own defaults never apply.
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None} if temperature
                else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
    results: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(prompts)  # type: ignore[list-item]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                tqdm(total=len(prompts), disable=not progress, desc=desc, unit="prompt") as bar:
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                                  add_special_tokens=False)
                output = model.generate(**batch.to(device), max_new_tokens=max_new_tokens, pad_token_id=pad,
                                        eos_token_id=stops or None, **sampling).cpu()
                width = batch["input_ids"].shape[1]
                for index, row, mask in zip(chunk, output, batch["attention_mask"].cpu()):
                    reply = row[width:]
                    ends = torch.isin(reply, torch.tensor(stops, dtype=reply.dtype)).nonzero()
                    results[index] = (row[:width][mask.bool()], reply[: int(ends[0]) + 1 if len(ends) else None])
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = padding_side
    return results


def generate_replies(model, tokenizer, prompts: Sequence[str], **options) -> list[str]:
    """The replies of :func:`generate` as text, special tokens dropped and surrounding whitespace stripped."""
    replies = [reply for _, reply in generate(model, tokenizer, prompts, **options)]
    return [text.strip() for text in tokenizer.batch_decode(replies, skip_special_tokens=True)] if replies else []


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(summed negative log-likelihood, target count)`` of next-token predictions: ``logits[:, t]`` scores
    ``labels[:, t + 1]``, and labels equal to ``IGNORE_INDEX`` are no targets. Computed in float32."""
    targets = labels[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, int((targets != IGNORE_INDEX).sum())
