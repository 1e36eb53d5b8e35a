"""Delta checkpoints: only what a retrofitted (or trained) model changed, relative to the model it was made from.

``save_delta`` writes a folder of ``config.json`` (the changed model's full config, ``kan_config`` included, with
the checkpoint code beside it), ``delta.safetensors`` (every tensor that is new, such as the KAN feedforwards, or
differs from the base's) and ``kallm_delta.json``, the manifest (see ``kallm.core.delta_checkpoint``, which
rebuilds it, also for ``trust_remote_code`` users without kallm). ``load_delta`` rebuilds the model from the base
and the delta after checking the base's hash, so a delta never silently lands on another base; unlike the
checkpoint code, it also loads bases by the names only kallm knows (bundled models).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.dynamic_module_utils import custom_object_save

from .core.delta_checkpoint import (
    DELTA_FORMAT,
    DELTA_MANIFEST,
    DELTA_WEIGHTS,
    base_weights_hash,
    check_base,
    load_into,
    named,
    read_delta_manifest,
)
from .loading import TOKENIZER_FILES, load_model
from .saving import replacing_checkpoint


def save_delta(model: nn.Module, folder: str | os.PathLike, base: str | os.PathLike | nn.Module, tokenizer=None,
               revision: str | None = None) -> dict:
    """Save what ``model`` changed relative to ``base`` into ``folder``; returns the manifest.

    ``base``: the model ``model`` was made from, loaded (an ``nn.Module`` as it was before ``kallm.retrofit``;
    pass a copy, since retrofit changes a model in place) or as ``kallm.load_model`` takes it (a hub id, folder,
    ``.gguf`` file or bundled name, loaded here; ``revision`` goes to ``from_pretrained``). The manifest
    records that name, a local one as an absolute path (or the base model's own ``name_or_path``), for
    ``load_delta``. ``tokenizer``, if given, is
    saved beside. Everything is written to a temporary folder first; ``folder`` changes only once it is
    complete.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise TypeError("save_delta takes a model without PEFT adapters: merge them first (merge_and_unload()), "
                        "or save the adapter itself with save_pretrained")
    base_model, _, source = _base(base, revision)
    model_state, base_state = model.state_dict(), base_model.state_dict()
    unchanged = {name for name, tensor in model_state.items() if _equal(tensor, base_state.get(name))}
    if not any(model_state[name].dim() > 1 for name in unchanged):  # norms and biases may start out equal anyway
        raise ValueError(f"none of the model's weight matrices equals the base's: {named(source)} is not the model "
                         f"this one was made from (or the dtypes differ, or every weight trained), and a delta would "
                         f"hold the whole model")
    tied = _tied_names(model_state)
    changed = {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in model_state.items()
               if name not in unchanged and name not in tied}
    manifest = {
        "format": DELTA_FORMAT,
        "base_model": source,
        "base_revision": revision,
        "base_sha256": base_weights_hash(base_model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "changed_tensors": sorted(changed),
        # a name that shares its tensor with another (tied embeddings) -> the name stored
        "tied_tensors": {name: source for name, source in sorted(tied.items()) if source in changed},
        "dropped_tensors": sorted(set(base_state) - set(model_state)),
    }
    with replacing_checkpoint(folder) as staging:
        if hasattr(model, "_record_auto_classes"):  # a retrofitted model: loadable with trust_remote_code too
            model._record_auto_classes()
            custom_object_save(model, staging, config=model.config)
        model.config.save_pretrained(staging)
        save_file(changed, str(staging / DELTA_WEIGHTS), metadata={"format": "pt"})
        (staging / DELTA_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return manifest


def load_delta(folder: str | os.PathLike, base: str | os.PathLike | nn.Module | None = None):
    """Rebuild the model a delta folder was saved from; returns ``(model, tokenizer)``.

    ``base``: the base model, loaded or by name (default: the one the manifest records, loaded with
    ``kallm.load_model``). Its weights must hash to the manifest's ``base_sha256``; any other base is refused
    before anything is built. The tokenizer comes from the folder when one was saved there, else from a base
    given by name (None for a base given as a model without a tokenizer in the folder).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    manifest = read_manifest(folder)
    recorded = manifest["base_model"]
    if base is None and not recorded:
        raise ValueError(f"the delta in {folder} records no base model; pass base= the model it was made from")
    try:
        base_model, base_tokenizer, source = _base(base if base is not None else recorded,
                                                   manifest.get("base_revision"), manifest["dtype"])
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"the base model of the delta in {folder} cannot be loaded ({error}); pass base= "
                                f"the model it was made from ({named(recorded)})") from error
    check_base(base_model, manifest, folder, source)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, manifest["dtype"]))
    model = load_into(model, base_model, manifest, str(folder / DELTA_WEIGHTS), folder)
    if any((folder / name).exists() for name in TOKENIZER_FILES):
        return model, AutoTokenizer.from_pretrained(folder)
    return model, base_tokenizer


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a delta folder, checked for the fields ``load_delta`` needs."""
    manifest = read_delta_manifest(folder) if os.path.isdir(folder) else None
    if manifest is None:
        raise FileNotFoundError(f"{folder} is no delta checkpoint: it has no {DELTA_MANIFEST} (kallm.save_delta "
                                f"writes one)")
    return manifest


def _base(base, revision, dtype: str | None = None):
    """``(loaded base model, its tokenizer or None, its name for the manifest)``; a base loaded by name comes in
    ``dtype`` (a delta's base is hashed as the delta's dtype)."""
    if isinstance(base, nn.Module):
        return base, None, getattr(base, "name_or_path", "") or ""
    if not isinstance(base, (str, os.PathLike)):
        raise TypeError(f"base must be a model or a name kallm.load_model takes, got {type(base).__name__}")
    options = {"revision": revision} if revision else {}
    if dtype:
        options["dtype"] = getattr(torch, dtype)
    name = os.fspath(base)
    # a local base is recorded by its absolute path, so that the delta finds it from any working directory
    return *load_model(name, **options), os.path.abspath(name) if os.path.exists(name) else name


def _tied_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each name whose tensor is one seen under an earlier name (tied weights) -> that earlier name."""
    first, tied = {}, {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


def _equal(tensor: torch.Tensor, other: torch.Tensor | None) -> bool:
    return (other is not None and tensor.shape == other.shape and tensor.dtype == other.dtype
            and torch.equal(tensor, other.to(tensor.device)))
