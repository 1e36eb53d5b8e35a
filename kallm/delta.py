"""Delta checkpoints: only what a retrofitted (or trained) model changed, relative to the model it was made from.

A delta folder holds ``config.json`` (the full config of the changed model, ``kan_config`` included),
``delta.safetensors`` (every tensor that is new, such as the KAN feedforwards, or differs from the base's) and
``kallm_delta.json``, the manifest: where the base came from, a SHA-256 of the base's weights, the base tensors
the model no longer has (the replaced feedforwards), and the changed model's dtype. ``load_delta`` rebuilds the
model from the base and the delta, after checking the base's hash, so a delta never silently lands on
another base.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .loading import DELTA_MANIFEST, TOKENIZER_FILES, load_model
from .saving import replacing_checkpoint

DELTA_WEIGHTS = "delta.safetensors"
DELTA_FORMAT = 1


def base_weights_hash(model: nn.Module) -> str:
    """SHA-256 over every tensor of ``model.state_dict()``: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def save_delta(model: nn.Module, folder: str | os.PathLike, base: str | os.PathLike | nn.Module, tokenizer=None,
               revision: str | None = None) -> dict:
    """Save what ``model`` changed relative to ``base`` into ``folder``; returns the manifest.

    ``base``: the model ``model`` was made from, loaded (an ``nn.Module`` as it was before ``kallm.retrofit``;
    pass a copy, since retrofit changes a model in place) or as ``kallm.load_model`` takes it (a hub id, folder,
    ``.gguf`` file or bundled name, loaded here; ``revision`` goes to ``from_pretrained``). The manifest
    records that name (or the base model's own ``name_or_path``) for ``load_delta``. ``tokenizer``, if given, is
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
        raise ValueError(f"none of the model's weight matrices equals the base's: {_named(source)} is not the model "
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
                                                   manifest.get("base_revision"))
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"the base model of the delta in {folder} cannot be loaded ({error}); pass base= "
                                f"the model it was made from ({_named(recorded)})") from error
    digest = base_weights_hash(base_model)
    if digest != manifest["base_sha256"]:
        raise ValueError(
            f"the base model {_named(source)} does not match the delta in {folder}: its weights hash to "
            f"{digest[:16]}..., the delta was made from weights hashing to {manifest['base_sha256'][:16]}... ({_named(recorded)}); on "
            f"another base it would be a different model. Pass base= the model the delta was made from"
        )
    state = {name: tensor for name, tensor in base_model.state_dict().items()
             if name not in set(manifest["dropped_tensors"])}
    state.update(load_file(str(folder / DELTA_WEIGHTS)))
    state.update({name: state[source] for name, source in manifest.get("tied_tensors", {}).items()})
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, manifest["dtype"]))
    expected = set(model.state_dict())
    if expected != set(state):
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"the base and the delta in {folder} do not make up the model its config.json describes: "
                         f"missing {missing[:6]}, unexpected {extra[:6]}")
    model.load_state_dict(state)
    model.eval()
    if any((folder / name).exists() for name in TOKENIZER_FILES):
        return model, AutoTokenizer.from_pretrained(folder)
    return model, base_tokenizer


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a delta folder, checked for the fields ``load_delta`` needs."""
    path = Path(folder) / DELTA_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is no delta checkpoint: it has no {DELTA_MANIFEST} (kallm.save_delta "
                                f"writes one)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    missing = [key for key in ("base_model", "base_sha256", "dtype", "dropped_tensors") if key not in manifest]
    if manifest.get("format") != DELTA_FORMAT or missing:
        raise ValueError(f"{path} is not a delta manifest kallm can read (format {manifest.get('format')!r}, "
                         f"missing {missing})")
    return manifest


def _base(base, revision):
    """``(loaded base model, its tokenizer or None, its name for the manifest)``."""
    if isinstance(base, nn.Module):
        return base, None, getattr(base, "name_or_path", "") or ""
    if not isinstance(base, (str, os.PathLike)):
        raise TypeError(f"base must be a model or a name kallm.load_model takes, got {type(base).__name__}")
    options = {"revision": revision} if revision else {}
    return *load_model(os.fspath(base), **options), os.fspath(base)


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


def _named(source: str) -> str:
    return repr(source) if source else "(a base model without a name)"


def _equal(tensor: torch.Tensor, other: torch.Tensor | None) -> bool:
    return (other is not None and tensor.shape == other.shape and tensor.dtype == other.dtype
            and torch.equal(tensor, other.to(tensor.device)))
