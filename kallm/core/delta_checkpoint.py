"""Delta checkpoints, the reading side: rebuild a retrofitted model from the model it was made from (its base) plus
only what changed (``kallm.save_delta`` writes them).

A delta folder (or hub repository) holds ``config.json`` with this folder's code beside it, ``delta.safetensors``
(every tensor that is new or differs from the base's) and ``kallm_delta.json``, the manifest: the base's name
and revision, a SHA-256 of the base's weights, the base tensors the model no longer has, tied names and the dtype.
The hash is checked before anything is built, so a delta never silently lands on another base.

Part of kallm's portable core: plain torch + transformers, sibling imports only, so that
``AutoModelForCausalLM.from_pretrained(delta, trust_remote_code=True)`` rebuilds a delta without kallm installed.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import load_file
from torch import nn

#: the manifest that marks a delta checkpoint
DELTA_MANIFEST = "kallm_delta.json"
#: the changed tensors of a delta checkpoint
DELTA_WEIGHTS = "delta.safetensors"
DELTA_FORMAT = 1
#: ``from_pretrained`` options that are about fetching the delta's own files (a hub repository's revision, cache...)
HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token",
               "_commit_hash")


def base_weights_hash(model: nn.Module) -> str:
    """SHA-256 over every tensor of ``model.state_dict()``: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def delta_file(source: str | os.PathLike, name: str, hub_options: dict | None = None) -> str | None:
    """The local path of file ``name`` of the delta ``source`` (a folder, or a hub repository, downloaded then),
    or None when it has no such file."""
    source = os.fspath(source)
    if os.path.isdir(source):
        path = os.path.join(source, (hub_options or {}).get("subfolder") or "", name)
        return path if os.path.isfile(path) else None
    from transformers.utils import cached_file

    return cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False, **(hub_options or {}))


def read_delta_manifest(source: str | os.PathLike, hub_options: dict | None = None) -> dict | None:
    """The manifest of the delta ``source``, checked for the fields a rebuild needs; None when ``source`` holds
    no delta."""
    path = delta_file(source, DELTA_MANIFEST, hub_options)
    if path is None:
        return None
    with open(path, encoding="utf-8") as file:
        manifest = json.load(file)
    missing = [key for key in ("base_model", "base_sha256", "dtype", "dropped_tensors") if key not in manifest]
    if manifest.get("format") != DELTA_FORMAT or missing:
        raise ValueError(f"{path} is not a delta manifest this code can read (format {manifest.get('format')!r}, "
                         f"missing {missing})")
    return manifest


def check_base(base_model: nn.Module, manifest: dict, source, base_name: str) -> None:
    """Refuse a base whose weights do not hash to the one the delta ``source`` was made from."""
    digest = base_weights_hash(base_model)
    if digest != manifest["base_sha256"]:
        raise ValueError(
            f"the base model {named(base_name)} does not match the delta in {source}: its weights hash to "
            f"{digest[:16]}..., the delta was made from weights hashing to {manifest['base_sha256'][:16]}... "
            f"({named(manifest['base_model'])}); on another base it would be a different model. Pass the model "
            f"the delta was made from as its base"
        )


def load_into(model: nn.Module, base_model: nn.Module, manifest: dict, weights_path: str, source) -> nn.Module:
    """Load the base's tensors with the delta's over them into ``model`` (built from the delta's config); returns
    it in eval mode."""
    delta = load_file(weights_path)
    not_finite = [name for name, tensor in delta.items()
                  if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if not_finite:
        more = f" and {len(not_finite) - 5} more" if len(not_finite) > 5 else ""
        raise ValueError(f"the delta in {source} is damaged: {', '.join(not_finite[:5])}{more} hold NaN or "
                         f"infinite values; save the delta again from a model that holds none")
    dropped = set(manifest["dropped_tensors"])
    state = {name: tensor for name, tensor in base_model.state_dict().items() if name not in dropped}
    state.update(delta)
    state.update({name: state[stored] for name, stored in manifest.get("tied_tensors", {}).items()})
    expected = set(model.state_dict())
    if expected != set(state):
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"the base and the delta in {source} do not make up the model its config.json describes: "
                         f"missing {missing[:6]}, unexpected {extra[:6]}")
    model.load_state_dict(state)
    return model.eval()


def load_base_model(name: str, revision: str | None, dtype: str, source) -> nn.Module:
    """The base model ``name`` loaded with transformers alone, in ``dtype``: a hub id (at ``revision``), a local
    folder or a ``.gguf`` file (dequantized to float). Names only kallm resolves (its bundled models) need kallm
    or an explicit base."""
    from transformers import AutoModelForCausalLM, GgufConfig

    options = {"dtype": getattr(torch, dtype)}
    if revision:
        options["revision"] = revision
    folder = name
    if name.endswith(".gguf") and os.path.isfile(name):
        options.update(gguf_file=os.path.basename(name), quantization_config=GgufConfig(dequantize=True))
        folder = os.path.dirname(os.path.abspath(name))
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **options)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"the base model of the delta in {source} ({named(name)}) cannot be loaded with transformers ({error}); "
            f"pass base_model= the model it was made from (loaded, or a path), or load the delta with "
            f"kallm.load_delta, which also knows kallm's bundled model names"
        ) from error


def named(source: str) -> str:
    return repr(source) if source else "(a base model without a name)"
