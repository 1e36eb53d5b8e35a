"""The data folder of kallm's recipes, benchmarks and tests: the one ``$KALLM_DATA_DIR`` names.

kallm never writes a data path into its code: the folder (BIG-Bench Hard, chat sets, WikiText-2, Tiny Shakespeare,
AG News; see its README.md) comes from this variable alone, so every caller reads it here.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_FOLDER_VARIABLE = "KALLM_DATA_DIR"


def data_folder() -> Path | None:
    """The folder ``$KALLM_DATA_DIR`` names, or None when it is unset or names no folder."""
    value = os.environ.get(DATA_FOLDER_VARIABLE)
    return Path(value) if value and Path(value).is_dir() else None


def require_data_folder(purpose: str = "this") -> Path:
    """``data_folder()``, or a FileNotFoundError that says which variable to set for ``purpose``."""
    folder = data_folder()
    if folder is None:
        value = os.environ.get(DATA_FOLDER_VARIABLE)
        state = f"names no folder ({value!r})" if value else "is not set"
        raise FileNotFoundError(f"{purpose} needs the data folder, but ${DATA_FOLDER_VARIABLE} {state}: set it to the "
                                f"folder that holds the bbh/, chat/, text/ and classification/ data")
    return folder
