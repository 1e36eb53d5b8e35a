"""Calibration for the fit init: the text the original model reads, and the records of its feedforwards.

``retrofit(..., init="fit")`` runs the original model on calibration text (the user's texts or token ids, or by
default conversations the model writes itself) and records each chosen feedforward's inputs and outputs, one row
per token; kallm/surgery/fit.py then fits the new KAN feedforwards to those records.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..inference import chat_prompt, eval_mode, generate, model_device
from .architectures import Architecture

#: generic requests for the default calibration text, answered by the original model itself:
#: encyclopedic prose (the register of most pretraining text) and everyday assistant work
DEFAULT_PROMPTS = (
    "Write an encyclopedia article about the history of a large European city.",
    "Write an encyclopedia article about a famous 19th-century scientist.",
    "Write an encyclopedia article about a river and the region it flows through.",
    "Write an encyclopedia article about a popular sport and its origins.",
    "Write an encyclopedia article about a well-known music album.",
    "Write an encyclopedia article about a major battle in military history.",
    "Write an encyclopedia article about a species of bird.",
    "Write an encyclopedia article about an ancient civilization.",
    "Explain how photosynthesis works.",
    "Explain the difference between weather and climate.",
    "Tell me a short story about a lighthouse keeper.",
    "Write a Python function that checks whether a number is prime, and explain it.",
    "Give me some advice for preparing for a job interview.",
    "Summarize the plot of a famous novel.",
    "What is the capital of Japan, and what is it known for?",
    "Describe how a bill becomes a law in a parliamentary democracy.",
)
#: reply length of the default calibration: about 2,600 tokens in all for SmolLM2 and its template
DEFAULT_NEW_TOKENS = 128
#: longest calibration sequence; longer texts are cut into pieces of this many tokens
MAX_SEQUENCE_LENGTH = 512


class _StopForward(Exception):
    """Raised by a recording hook once the last needed block has run."""


def check_calibration(calibration, tokenizer) -> None:
    """Refuse a ``calibration``/``tokenizer`` pair that ``calibration_sequences`` cannot read, before anything runs."""
    if calibration is None:
        if tokenizer is None:
            raise ValueError(
                "init='fit' without calibration generates calibration text with the model's chat template, "
                "which needs tokenizer=...; or pass calibration= (a list of texts or a LongTensor of token ids)"
            )
        _check_chat_template(tokenizer)
        return
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype != torch.long or calibration.dim() not in (1, 2):
            raise ValueError(
                f"calibration token ids must be a 1-D or 2-D LongTensor, got dtype {calibration.dtype} "
                f"with shape {tuple(calibration.shape)}"
            )
        if calibration.numel() == 0:
            raise ValueError("calibration is empty: give at least one token")
        return
    if isinstance(calibration, str) or not isinstance(calibration, Sequence):
        raise TypeError(
            f"calibration must be a list of texts or a LongTensor of token ids, got {type(calibration).__name__}"
        )
    if not all(isinstance(t, str) for t in calibration):
        raise TypeError("calibration texts must all be strings")
    if not any(t.strip() for t in calibration):
        raise ValueError("calibration is empty: give at least one non-empty text")
    if tokenizer is None:
        raise ValueError("calibration texts need tokenizer=... to turn them into token ids")


def _check_chat_template(tokenizer):
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the default calibration needs a tokenizer with a chat template; pass calibration= "
            "(a list of texts or a LongTensor of token ids) instead"
        )


def calibration_sequences(model, calibration, tokenizer, max_length: int = MAX_SEQUENCE_LENGTH,
                          progress: bool = False) -> list[torch.Tensor]:
    """The calibration as a list of 1-D token id tensors of at most ``max_length`` tokens (``progress``: a bar
    while the default calibration is generated)."""
    if calibration is None:
        return default_calibration(model, tokenizer, progress=progress)
    if isinstance(calibration, torch.Tensor):
        rows = [calibration] if calibration.dim() == 1 else list(calibration)
    else:
        rows = [tokenizer(text, return_tensors="pt").input_ids[0] for text in calibration if text.strip()]
    pieces = [row[start : start + max_length] for row in rows for start in range(0, row.numel(), max_length)]
    vocab = model.get_input_embeddings().num_embeddings
    for piece in pieces:
        if piece.numel() and (int(piece.min()) < 0 or int(piece.max()) >= vocab):
            raise ValueError(f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary)")
    pieces = [piece for piece in pieces if piece.numel()]
    if not pieces:
        raise ValueError("calibration is empty: it holds no tokens")
    return pieces


@torch.no_grad()
def default_calibration(model, tokenizer, prompts: Sequence[str] | None = None, max_new_tokens: int | None = None,
                        seed: int = 0, progress: bool = False) -> list[torch.Tensor]:
    """Conversations the original model writes itself: each prompt (default ``DEFAULT_PROMPTS``)
    as a user turn through the tokenizer's chat template, answered in one batch by seeded
    sampling (temperature 0.8, at most ``DEFAULT_NEW_TOKENS`` tokens), so the same model always
    gets the same text. Returns one token id tensor per conversation (prompt and reply).
    """
    prompts = DEFAULT_PROMPTS if prompts is None else prompts
    max_new_tokens = DEFAULT_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    _check_chat_template(tokenizer)
    conversations = generate(model, tokenizer, [chat_prompt(tokenizer, prompt) for prompt in prompts],
                             max_new_tokens=max_new_tokens, batch_size=len(prompts), temperature=0.8, top_p=0.95,
                             seed=seed, progress=progress, desc="kallm fit: generating calibration text")
    return [torch.cat([prompt, reply]) for prompt, reply in conversations]


def original_feedforward(block: nn.Module, architecture: Architecture) -> nn.Module:
    """The block's feedforward as one module (OPT spreads it over several attributes)."""
    modules = [getattr(block, name) for name in (architecture.mlp_attribute, *architecture.bypassed_attributes)]
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


@torch.no_grad()
def record_feedforwards(model, architecture: Architecture, indices: list[int], sequences: list[torch.Tensor],
                        batch_size: int = 8, progress: bool = True) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{block: (inputs, outputs)}`` of the feedforwards of ``indices``, one row per token.

    Padding never reaches the records (right padding with an attention mask; causal models
    give real tokens the same states as without it). The forward stops after the last
    recorded block, so the rest of the model and its LM head are never run.
    """
    blocks = model.get_submodule(architecture.blocks_path)
    last = max(indices)
    records = {i: ([], []) for i in indices}
    keep = None  # boolean mask of real tokens in the current batch, flattened
    hooks = []

    def hook_for(index, role):
        def hook(module, args, output):
            tensor = args[0] if role == 0 else output
            records[index][role].append(tensor.reshape(-1, tensor.shape[-1])[keep].float())
            if role == 1 and index == last:
                raise _StopForward

        return hook

    for index in indices:
        names = (architecture.mlp_attribute, *architecture.bypassed_attributes)
        hooks.append(getattr(blocks[index], names[0]).register_forward_hook(hook_for(index, 0)))
        hooks.append(getattr(blocks[index], names[-1]).register_forward_hook(hook_for(index, 1)))
    device = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: -sequences[i].numel())
    try:
        with eval_mode(model):
            for start in tqdm(range(0, len(order), batch_size), desc="kallm fit: recording",
                              disable=not progress, unit="batch"):
                batch = [sequences[i] for i in order[start : start + batch_size]]
                width = batch[0].numel()
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for row, sequence in enumerate(batch):
                    ids[row, : sequence.numel()] = sequence
                    mask[row, : sequence.numel()] = 1
                keep = mask.reshape(-1).bool().to(device)
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for hook in hooks:
            hook.remove()
    return {i: (torch.cat(inputs), torch.cat(outputs)) for i, (inputs, outputs) in records.items()}
