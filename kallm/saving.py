"""Save a checkpoint so that a failure never leaves a broken one behind.

Everything is written into a temporary sibling of the target folder first; only when that
succeeded do its files replace the model files of the target, as a set, by renames. Other
entries of the target (``kallm train``'s ``checkpoint-N`` folders and ``metrics.jsonl``, files
of the user's) stay where they are; weight files of the previous model that the new one does
not overwrite (old shards, an old index) are removed, so they cannot be mixed with the new.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: weight files and shard indexes of any format transformers writes (``model-00001-of-00003.safetensors``, ...),
#: and a delta checkpoint's weights and manifest (``kallm.save_delta``)
_WEIGHT_FILE = re.compile(
    r"(?:model|pytorch_model|tf_model|flax_model|adapter_model|delta)(?:-\d+-of-\d+)?"
    r"\.(?:safetensors|bin|h5|msgpack)(?:\.index\.json)?|kallm_delta\.json"
)


@contextmanager
def replacing_checkpoint(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``folder`` to write a checkpoint into.

    On a clean exit its files replace the model files of ``folder`` (created if missing); on an
    error it is removed and ``folder`` is left exactly as it was.
    """
    folder = Path(folder).resolve()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot save a checkpoint to {folder}: it is a file, not a folder")
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
    with replacing_checkpoint(folder) as staging:
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
