"""Delta checkpoints: only what a retrofitted (or trained) model changed, relative to the model it was made from.

``save_delta`` writes a folder of ``config.json`` (the changed model's full config, ``kan_config`` included, with
the checkpoint code beside it), ``delta.safetensors`` (every tensor that is new, such as the KAN feedforwards, or
differs from the base's) and ``kallm_delta.json``, the manifest. ``kallm.load_delta`` (in ``kallm.checkpoints.load``) and,
for ``trust_remote_code`` users without kallm, the checkpoint code (``kallm.core.delta_checkpoint``) rebuild the
model from the base and the delta after checking the base's hash, so a delta never silently lands on another base.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.dynamic_module_utils import custom_object_save

from ..core.delta_checkpoint import DELTA_FORMAT, DELTA_MANIFEST, DELTA_WEIGHTS, base_weights_hash, named
from ..core.retrofit_config import retrofitted_blocks
from .load import load_base, recorded_base_model
from .save import check_output_folder, replacing_checkpoint


def save_delta(model: nn.Module, folder: str | os.PathLike, base: str | os.PathLike | nn.Module | None = None,
               tokenizer=None, revision: str | None = None) -> dict:
    """Save what ``model`` changed relative to ``base`` into ``folder``; returns the manifest.

    ``base``: the model ``model`` was made from, loaded (an ``nn.Module`` as it was before ``kallm.retrofit``;
    pass a copy, since retrofit changes a model in place) or as ``kallm.load_model`` takes it (a hub id, folder,
    ``.gguf`` file or bundled name, loaded here; ``revision`` goes to ``from_pretrained``). Default: the base
    ``model``'s config records (a bundled name, hub id or absolute path). The manifest records that name, a local
    one as an absolute path (or the base model's own ``name_or_path``), for ``load_delta``. ``tokenizer``, if
    given, is saved beside. ``folder`` may not be, lie inside or hold the folder of the model or of the base.
    Everything is written to a temporary folder first; ``folder`` changes only once it is complete.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise TypeError("save_delta takes a model without PEFT adapters: merge them first (merge_and_unload()), "
                        "or save the adapter itself with save_pretrained")
    if base is None:
        base = recorded_base_model(model, "save_delta", "base=")
    check_output_folder(folder, (model, base))
    base_model, _, source = load_base(base, revision)
    _check_base_is_another_model(model, base_model)
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
    with replacing_checkpoint(folder, model) as staging:
        if hasattr(model, "_record_auto_classes"):  # a retrofitted model: loadable with trust_remote_code too
            model._record_auto_classes()
            custom_object_save(model, staging, config=model.config)
        model.config.save_pretrained(staging)
        save_file(changed, str(staging / DELTA_WEIGHTS), metadata={"format": "pt"})
        (staging / DELTA_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return manifest


def _check_base_is_another_model(model: nn.Module, base: nn.Module) -> None:
    """Refuse a base that is ``model`` itself, shares tensors with it or is retrofitted where it is: a delta on it
    would hold nothing, and load as the retrofit of a model that no longer exists (retrofit works in place)."""
    if base is model:
        raise ValueError("the base is the model itself; pass the model it was made from as base (retrofit changes a "
                         "model in place: keep a copy, or pass the base's name or folder)")
    storages = {tensor.untyped_storage().data_ptr() for tensor in model.state_dict().values() if tensor.numel()}
    shared = [name for name, tensor in base.state_dict().items()
              if tensor.numel() and tensor.untyped_storage().data_ptr() in storages]
    if shared:
        raise ValueError(f"the base shares tensors with the model ({', '.join(shared[:3])}, ...); pass the model it "
                         f"was made from as base, as it was before retrofit (a copy, or its name or folder)")
    both = sorted(set(retrofitted_blocks(model)) & set(retrofitted_blocks(base)))
    if both:
        raise ValueError(f"the base is itself retrofitted in blocks {both}, like the model; pass the model it was "
                         f"retrofitted from as base, as it was before retrofit (a copy, or its name or folder)")


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
