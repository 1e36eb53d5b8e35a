"""Checks of option values shared by every ``kallm`` command and the settings objects the commands fill.

A ``Number`` is an argparse ``type=``: a value outside its range is refused while the command line is read
(``kallm CMD: error: argument --x: must be an integer >= 1, got '0'``, exit status 2), before any model loads or
any file is written. The same object checks a config field (``HealConfig``, ``TrainConfig``), so a range is
written once. ``existing_path`` and ``path_or_hub_id`` refuse a local path that does not exist.

It imports nothing from kallm, so that every layer may use it.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
from pathlib import Path


class Number:
    """A finite int or float between optional bounds (open or closed), plus ``also``: special values accepted
    outside them (``-1`` for "no limit")."""

    def __init__(self, kind: type = float, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                 also: tuple = ()):
        self.kind, self.low, self.high, self.low_open, self.high_open, self.also = (
            kind, low, high, low_open, high_open, also)
        self.__name__ = self.describe()  # argparse names a type by it in its messages

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            text = f"{what} in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{what} {'>' if self.low_open else '>='} {self.low}"
        elif self.high is not None:
            text = f"{what} {'<' if self.high_open else '<='} {self.high}"
        else:
            text = what
        return text + "".join(f" (or {value})" for value in self.also)

    def accepts(self, value) -> bool:
        if value in self.also and not isinstance(value, bool):
            return True
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return not (too_low or too_high)

    def check(self, name: str, value) -> None:
        """Raise ``ValueError`` naming ``name`` when ``value`` (None: not set; a list: each item) is out of range."""
        values = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
        if not all(self.accepts(item) for item in values):
            each = " each" if isinstance(value, (list, tuple)) else ""
            raise ValueError(f"{name} must be {self.describe()}{each}, got {value!r}")

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or not self.accepts(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value

    def __repr__(self):
        return f"Number({self.describe()})"


finite_int = Number(int)
finite_float = Number(float)
positive_int = Number(int, 1)
non_negative_int = Number(int, 0)
positive_float = Number(float, 0, low_open=True)
non_negative_float = Number(float, 0)
#: a share of something, up to all of it
fraction = Number(float, 0, 1)
#: torch, numpy and Python seeds all take these
seed = Number(int, 0, 2**32 - 1)


#: endings of local files kallm reads; hub ids do not end so
LOCAL_SUFFIXES = (".gguf", ".jsonl", ".json", ".parquet", ".csv", ".txt", ".yaml", ".yml", ".safetensors")


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path (not a hub id such as ``user/name`` nor a bundled name): it
    starts with ``.``, ``/`` or ``~``, has more than one ``/`` or a backslash, ends like a local file, or its first
    folder exists here."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith(LOCAL_SUFFIXES):
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def existing_path(text: str) -> str:
    """A local file or folder that exists."""
    if not _exists(text):
        raise argparse.ArgumentTypeError(f"no such file or folder: {text}")
    return text


def _exists(path: str) -> bool:
    """Whether ``path`` exists, or as a glob pattern (``data/*.jsonl``) matches something."""
    path = os.path.expanduser(path)
    return os.path.exists(path) or (glob.has_magic(path) and bool(glob.glob(path)))


def path_or_hub_id(text: str) -> str:
    """A hub id (or bundled name), or a local file or folder, which must exist."""
    if looks_like_path(text) and not _exists(text):
        raise argparse.ArgumentTypeError(f"no such file or folder: {text} (a local path must exist; a hub id "
                                         f"reads 'user/name')")
    return text
