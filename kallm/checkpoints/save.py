"""Save a checkpoint so that a failure never leaves a broken one behind.

Everything is written into a temporary sibling of the target folder first; only when that
succeeded do its files replace the model files of the target, as a set, by renames. Other
entries of the target (``kallm train``'s ``checkpoint-N`` folders and ``metrics.jsonl``, files
of the user's) stay where they are; weight files of the previous model that the new one does
not overwrite (old shards, an old index) are removed, so they cannot be mixed with the new.

Before anything is written, a model whose weights hold NaN or infinity is refused (a run that diverged keeps its
last good checkpoint), and so is an output folder that overlaps a model the command reads (``check_output_folder``).
Training runs resume only from checkpoints that were completed (``resume_checkpoint``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: weight files and shard indexes of any format transformers writes (``model-00001-of-00003.safetensors``, ...),
#: and a delta checkpoint's weights and manifest (``kallm.save_delta``)
_WEIGHT_FILE = re.compile(
    r"(?:model|pytorch_model|tf_model|flax_model|adapter_model|delta)(?:-\d+-of-\d+)?"
    r"\.(?:safetensors|bin|h5|msgpack)(?:\.index\.json)?|kallm_delta\.json"
)


@contextmanager
def replacing_checkpoint(folder: str | os.PathLike, model=None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``folder`` to write a checkpoint into.

    On a clean exit its files replace the model files of ``folder`` (created if missing); on an
    error it is removed and ``folder`` is left exactly as it was. ``model``, the model being saved, is
    refused first if any of its weights is not finite (``check_finite``).
    """
    folder = Path(folder).resolve()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot save a checkpoint to {folder}: it is a file, not a folder")
    if model is not None:
        check_finite(model, f"save to {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_sibling(folder, "saving")
    try:
        yield staging
        if folder.exists():
            _replace_model_files(staging, folder)
        else:
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_checkpoint(model, tokenizer, folder: str | os.PathLike) -> Path:
    """``model.save_pretrained`` and ``tokenizer.save_pretrained`` (if given) into ``folder``,
    through :func:`replacing_checkpoint`; returns the folder."""
    with replacing_checkpoint(folder, model) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(folder)


def _replace_model_files(staging: Path, folder: Path) -> None:
    """Move the new files of ``staging`` into ``folder``, the replaced files of ``folder`` aside
    first; if a move fails, every file goes back where it was."""
    new_names = sorted(entry.name for entry in staging.iterdir())
    old_names = sorted(entry.name for entry in folder.iterdir()
                       if entry.name in new_names or (entry.is_file() and _WEIGHT_FILE.fullmatch(entry.name)))
    previous = _new_sibling(folder, "previous")
    moved_aside, moved_in = [], []
    try:
        for name in old_names:
            os.replace(folder / name, previous / name)
            moved_aside.append(name)
        for name in new_names:
            os.replace(staging / name, folder / name)
            moved_in.append(name)
    except BaseException:
        for name in moved_in:
            os.replace(folder / name, staging / name)
        for name in moved_aside:
            os.replace(previous / name, folder / name)
        previous.rmdir()  # empty again; were it not, the old files would stay there, not be deleted
        raise
    shutil.rmtree(previous)


def _new_sibling(folder: Path, purpose: str) -> Path:
    """A new hidden folder beside ``folder``, with the permissions of any new folder (``tempfile.mkdtemp``'s
    are private, which a checkpoint moved into place would keep)."""
    path = folder.parent / f".{folder.name}.{purpose}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def check_finite(model, action: str) -> None:
    """Raise ValueError naming the floating tensors of ``model`` (parameters and buffers) that hold NaN or infinity,
    before ``action`` (``"save to FOLDER"``): a model that diverged is never saved over the last good one."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    bad = non_finite_tensors(tensors)
    if bad:
        raise ValueError(f"refusing to {action}: the model holds NaN or infinite values in {bad} (training "
                         f"diverged? a lower learning rate or temperature may help); nothing was written")


def non_finite_tensors(tensors: dict) -> str:
    """The names of the floating tensors of ``tensors`` (name -> tensor) that hold NaN or infinity, as one phrase
    (empty when there are none). Tensor subclasses (torchao's quantized weights) are checked through the tensors
    they are made of, such as their scales."""
    bad = [name for name, tensor in tensors.items() if not _all_finite(tensor)]
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return ", ".join(bad[:5]) + more


def _all_finite(tensor) -> bool:
    import torch

    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        parts = (getattr(tensor, name) for name in tensor.__tensor_flatten__()[0])
        return all(_all_finite(part) for part in parts if part is not None)
    if tensor.is_meta or not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.detach()).all())


def check_output_folder(folder: str | os.PathLike, inputs: Iterable) -> None:
    """Refuse to write to ``folder`` when it is, lies inside or holds one of ``inputs``: the folders or files a
    command reads its models from, or loaded models (standing for the folder they were loaded from, their
    ``name_or_path``). Saving there would replace or mix with the files being read. Names that are no local path
    (hub ids, bundled names) and None are skipped."""
    target = Path(folder).expanduser().resolve()
    for source in inputs:
        if source is not None and not isinstance(source, (str, os.PathLike)):
            source = getattr(source, "name_or_path", None)
        if not source or not os.path.exists(source):
            continue
        path = Path(source).expanduser().resolve()
        if target == path:
            overlap = "is the folder this reads a model from"
        elif target.is_relative_to(path):
            overlap = f"lies inside {source}, which this reads a model from"
        elif path.is_relative_to(target):
            overlap = f"holds {source}, which this reads a model from"
        else:
            continue
        raise ValueError(f"cannot write to {folder}: it {overlap}, and saving there would replace or mix with the "
                         f"files read; choose an output folder outside it")


def resume_checkpoint(resume: str | os.PathLike | bool | None, output_dir: str | os.PathLike | None, prefix: str,
                      marker: str) -> Path | None:
    """The checkpoint folder to resume from: ``resume`` itself, or with ``resume=True`` the latest complete
    ``{prefix}N`` folder of ``output_dir``; None when ``resume`` is None or False.

    A checkpoint is complete when its ``marker`` file, written last, holds valid JSON: a run killed while saving
    leaves a folder without it (or with a cut-off one), which is passed over. The folder chosen is printed.
    """
    if resume in (None, False):
        return None
    if resume is True:
        folders = Path(output_dir).glob(f"{prefix}*") if output_dir and os.path.isdir(output_dir) else []
        numbered = [(int(path.name[len(prefix):]), path) for path in folders if path.name[len(prefix):].isdigit()]
        complete = [(step, path) for step, path in sorted(numbered) if _is_complete(path, marker)]
        if not complete:
            skipped = " (only incomplete ones, cut off while saving)" if numbered else ""
            raise FileNotFoundError(f"resume=True, but {output_dir} holds no {prefix}N folder to resume from{skipped}")
        last_step, checkpoint = complete[-1]
        passed_over = [path.name for step, path in sorted(numbered) if step > last_step]
        note = f" (passed over the incomplete {', '.join(passed_over)})" if passed_over else ""
    else:
        checkpoint, note = Path(resume), ""
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"checkpoint to resume from not found: {checkpoint}")
        if not _is_complete(checkpoint, marker):
            raise FileNotFoundError(f"{checkpoint} is no complete checkpoint to resume from: its {marker} is missing "
                                    f"or cut off (the run was stopped while saving it)")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"resuming from {checkpoint}{note}", flush=True)
    return checkpoint


def _is_complete(checkpoint: Path, marker: str) -> bool:
    try:
        json.loads((checkpoint / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True
