"""``kallm.shrink``: a smaller model of the same family from a pretrained one, for fast exploration.

Two cuts, each optional:

- blocks: keep the first ``num_blocks`` decoder blocks (or the blocks listed in ``blocks``), renumbered from 0;
- vocabulary: keep the tokens that occur in ``vocab_from`` texts (or the ``max_tokens`` most frequent of them),
  plus the special tokens, the tokens the kept ones are merged from, and a fallback for everything else. The
  embedding rows (and those of an untied LM head) are cut to match, and the tokenizer is rebuilt so that it
  produces exactly the kept ids.

Every kept tensor is copied bit for bit. The tokenizer is rebuilt from its ``tokenizers`` JSON (a BPE model):
vocabulary entries renumbered, merges kept when both parts and their result are kept (in their original order,
so that on the texts the new tokenizer applies the same merges as the original), added tokens renumbered. A
byte-level tokenizer keeps its 256 byte symbols, so any text still tokenizes (into more, shorter pieces); any
other BPE tokenizer needs an ``unk_token``, which pieces outside the kept set become.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from .architectures import architecture_for
from .checks import base_model_type

#: config fields holding one token id (or a list of them) that must follow the renumbering
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id")
#: config fields holding one entry per decoder block
_PER_BLOCK_FIELDS = ("layer_types",)


def shrink(
    model: nn.Module,
    tokenizer,
    num_blocks: int | None = None,
    vocab_from: Iterable[str] | None = None,
    blocks: list[int] | None = None,
    max_tokens: int | None = None,
):
    """A smaller copy of ``model`` (a supported, not yet retrofitted causal LM or classifier) and its tokenizer.

    Args:
        num_blocks: keep the first ``num_blocks`` decoder blocks (default: all, unless ``blocks`` is given).
        blocks: keep these blocks instead (indices into the original, negative ones count from the end), in
            ascending order.
        vocab_from: texts; keep only the tokens they are tokenized into (plus special tokens, merge parts and the
            fallback, see the module docstring). ``None`` keeps the whole vocabulary.
        max_tokens: keep only the ``max_tokens`` most frequent tokens of ``vocab_from`` (ties: the lower id
            first); the tokens they are merged from, the special tokens and the fallback come on top.

    Returns ``(model, tokenizer)``: new objects, the originals untouched. ``config.kallm_shrunk_from`` records
    the kept blocks and the original block count and vocabulary size. Bad arguments raise before any work.
    """
    if getattr(model.config, "kan_config", None) or getattr(model.config, "kallm_restarted_layers", None):
        raise ValueError("shrink works on the original model: this one is already retrofitted; shrink the model it "
                         "came from, then retrofit the small one")
    base_type = base_model_type(model.config)
    architecture = architecture_for(base_type)
    decoder_blocks = model.get_submodule(architecture.blocks_path)
    kept_blocks = _blocks_to_keep(len(decoder_blocks), num_blocks, blocks)
    if max_tokens is not None and vocab_from is None:
        raise ValueError("max_tokens chooses among the tokens of vocab_from texts; pass vocab_from too")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if vocab_from is None:
        kept_ids, new_tokenizer = None, copy.deepcopy(tokenizer)
    else:
        # the special tokens the config and the generation config name (eos, bos, pad) are kept, used in the texts
        # or not: generation stops on them
        special = _config_token_ids(model.config) | _config_token_ids(getattr(model, "generation_config", None))
        kept_ids, new_tokenizer = trim_tokenizer(tokenizer, vocab_from, max_tokens, special)
    embedding_rows = model.get_input_embeddings().weight.shape[0]
    if kept_ids is not None and kept_ids[-1] >= embedding_rows:
        raise ValueError(f"the tokenizer produces id {kept_ids[-1]}, but the model has only {embedding_rows} "
                         f"embedding rows: this tokenizer does not belong to this model")

    config = copy.deepcopy(model.config)
    old_blocks = len(decoder_blocks)
    config.num_hidden_layers = len(kept_blocks)
    for name in _PER_BLOCK_FIELDS:
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == old_blocks:
            setattr(config, name, [values[i] for i in kept_blocks])
    if kept_ids is not None:
        config.vocab_size = len(kept_ids)
        _renumber_config_token_ids(config, {old: new for new, old in enumerate(kept_ids)})
    config.kallm_shrunk_from = {"blocks": kept_blocks, "num_blocks": old_blocks, "vocab_size": embedding_rows}

    small = type(model)(config).to(model.dtype)
    small.load_state_dict(_cut_state(model, architecture.blocks_path, kept_blocks, kept_ids), strict=True)
    generation = getattr(model, "generation_config", None)
    if generation is not None and kept_ids is not None:
        small.generation_config = copy.deepcopy(generation)
        _renumber_config_token_ids(small.generation_config, {old: new for new, old in enumerate(kept_ids)})
    small.train(model.training)
    return small, new_tokenizer


def _blocks_to_keep(count: int, num_blocks, blocks) -> list[int]:
    if blocks is not None:
        if num_blocks is not None:
            raise ValueError("pass num_blocks (keep the first N blocks) or blocks (keep these blocks), not both")
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Iterable):
            raise TypeError(f"blocks must be a list of block indices, got {blocks!r}")
        kept = []
        for index in blocks:
            if not isinstance(index, int) or isinstance(index, bool) or not -count <= index < count:
                raise ValueError(f"block index {index!r} is out of range for a model with {count} blocks "
                                 f"(0..{count - 1}, or negative from the end)")
            kept.append(index % count)
        if not kept or len(set(kept)) != len(kept):
            raise ValueError(f"blocks must list distinct blocks, at least one, got {list(blocks)}")
        return sorted(kept)
    if num_blocks is None:
        return list(range(count))
    if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or not 1 <= num_blocks <= count:
        raise ValueError(f"num_blocks must be an integer between 1 and {count} (the model's block count), "
                         f"got {num_blocks!r}")
    return list(range(num_blocks))


def _config_token_ids(config) -> set[int]:
    ids = set()
    for name in _TOKEN_ID_FIELDS if config is not None else ():
        value = getattr(config, name, None)
        ids.update(value if isinstance(value, list) else [value] if isinstance(value, int) else [])
    return ids


def _renumber_config_token_ids(config, new_id: dict[int, int]) -> None:
    for name in _TOKEN_ID_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, list):
            setattr(config, name, [new_id[i] for i in value])
        elif isinstance(value, int):
            setattr(config, name, new_id[value])


def _cut_state(model, blocks_path: str, kept_blocks: list[int], kept_ids: list[int] | None) -> dict:
    """The state dict of the small model: kept blocks renumbered, embedding rows cut."""
    prefix = blocks_path + "."
    new_index = {old: new for new, old in enumerate(kept_blocks)}
    vocab_tensors = {id(model.get_input_embeddings().weight)}
    output = model.get_output_embeddings()
    if output is not None:
        vocab_tensors.update(id(t) for t in (output.weight, getattr(output, "bias", None)) if t is not None)
    rows = torch.tensor(kept_ids) if kept_ids is not None else None
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            if int(index) not in new_index:
                continue
            name = f"{prefix}{new_index[int(index)]}.{rest}"
        value = tensor.detach()
        if rows is not None and id(tensor) in vocab_tensors:
            value = value.index_select(0, rows)
        state[name] = value.clone()
    return state


def trim_tokenizer(tokenizer, texts: Iterable[str], max_tokens: int | None = None, extra_ids: Iterable[int] = ()):
    """``(kept original ids, sorted; new tokenizer)`` keeping the tokens of ``texts`` (see ``shrink``).

    The new tokenizer maps kept token ``kept[i]`` to id ``i``: on ``texts`` it produces exactly the original ids
    renumbered. ``extra_ids`` (the config's special ids) are kept too.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"shrink rebuilds fast (tokenizers-backed) tokenizers; {type(tokenizer).__name__} has no "
                         f"backend_tokenizer. Load the tokenizer with AutoTokenizer (use_fast=True)")
    spec = json.loads(backend.to_str())
    model_spec = spec["model"]
    if model_spec.get("type") != "BPE":
        raise ValueError(f"shrink can trim the vocabulary of BPE tokenizers only; this one is "
                         f"{model_spec.get('type')!r}. Shrink without vocab_from to keep the whole vocabulary")
    vocab: dict[str, int] = model_spec["vocab"]
    byte_level = _is_byte_level(spec)
    fallback = model_spec.get("unk_token")
    if not byte_level and not model_spec.get("byte_fallback") and fallback is None:
        raise ValueError("this tokenizer has no fallback for text outside the kept vocabulary: it is not byte-level, "
                         "has no byte_fallback and no unk_token; give it an unk_token, or shrink without vocab_from")
    if isinstance(texts, str):
        raise TypeError("vocab_from must be a list of texts, not one string")
    texts = list(texts)
    if not all(isinstance(text, str) for text in texts):
        raise TypeError("vocab_from must be a list of texts (str)")
    counts = Counter(token for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for token in ids)
    if not counts:
        raise ValueError(f"the {len(texts)} texts of vocab_from tokenize to no tokens at all, so no vocabulary "
                         f"would be kept; pass the texts the small model will see")
    chosen = sorted(counts, key=lambda token: (-counts[token], token))[:max_tokens]

    token_of = {index: token for token, index in vocab.items()}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model_spec["merges"]]
    made_from: dict[str, list[tuple[str, str]]] = {}
    for left, right in merges:
        made_from.setdefault(left + right, []).append((left, right))
    kept_tokens = set()
    pending = [token_of[i] for i in chosen if i in token_of]
    while pending:  # a kept token needs every token it may be merged from, or the merges leading to it drop out
        token = pending.pop()
        if token in kept_tokens:
            continue
        kept_tokens.add(token)
        pending.extend(part for pair in made_from.get(token, ()) for part in pair)
    if byte_level:
        kept_tokens.update(token for token in vocab if len(token) == 1)
    if model_spec.get("byte_fallback"):
        kept_tokens.update(token for token in vocab if len(token) == 6 and token.startswith("<0x") and token[-1] == ">")
    if fallback is not None:
        kept_tokens.add(fallback)
    added = {entry["id"] for entry in spec.get("added_tokens", [])}
    special_ids = set(tokenizer.all_special_ids) | added | set(extra_ids)
    missing = sorted(i for i in set(chosen) | special_ids if i not in token_of and i not in added)
    if missing:
        raise ValueError(f"token ids {missing[:5]} are in neither the tokenizer's vocabulary nor its added tokens")
    kept_ids = sorted({vocab[token] for token in kept_tokens} | special_ids)
    new_id = {old: new for new, old in enumerate(kept_ids)}

    model_spec["vocab"] = {token: new_id[index] for token, index in vocab.items() if index in new_id}
    model_spec["merges"] = [
        [left, right] for left, right in merges if left in kept_tokens and right in kept_tokens and left + right in kept_tokens
    ]
    for entry in spec.get("added_tokens", []):
        entry["id"] = new_id[entry["id"]]
    _renumber_post_processor(spec.get("post_processor"), new_id)
    return kept_ids, _rebuilt_tokenizer(tokenizer, json.dumps(spec))


def _is_byte_level(spec: dict) -> bool:
    def has_byte_level(part):
        if not isinstance(part, dict):
            return False
        return part.get("type") == "ByteLevel" or any(has_byte_level(p) for p in part.get("pretokenizers", []))

    return has_byte_level(spec.get("pre_tokenizer"))


def _renumber_post_processor(processor, new_id):
    """Special-token ids in a post-processor (TemplateProcessing, BertProcessing, Sequence of them)."""
    if not isinstance(processor, dict):
        return
    for part in processor.get("processors", []):
        _renumber_post_processor(part, new_id)
    for special in (processor.get("special_tokens") or {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    for key in ("sep", "cls"):
        if isinstance(processor.get(key), list):
            processor[key][1] = new_id[processor[key][1]]


def _rebuilt_tokenizer(tokenizer, tokenizer_json: str):
    """A plain fast tokenizer over ``tokenizer_json`` with the original's special tokens, chat template and
    settings, so that ``AutoTokenizer`` loads it from any folder it is saved to."""
    from tokenizers import Tokenizer

    specials = {
        name: str(getattr(tokenizer, name))
        for name in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
        if getattr(tokenizer, name, None) is not None
    }
    extra = [str(token) for token in getattr(tokenizer, "extra_special_tokens", None) or []
             if str(token) not in specials.values()]
    rebuilt = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json), chat_template=tokenizer.chat_template,
        model_max_length=tokenizer.model_max_length, padding_side=tokenizer.padding_side,
        truncation_side=tokenizer.truncation_side, clean_up_tokenization_spaces=tokenizer.clean_up_tokenization_spaces,
        **specials, **({"extra_special_tokens": extra} if extra else {}),
    )
    for flag in ("add_bos_token", "add_eos_token"):
        if getattr(tokenizer, flag, None) is not None and hasattr(rebuilt, flag):
            setattr(rebuilt, flag, getattr(tokenizer, flag))
    return rebuilt
