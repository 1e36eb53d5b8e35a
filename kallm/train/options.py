"""Config fields that are also command-line flags: a field's default, help and argparse options are written
once, on the field, and ``HfArgumentParser`` turns them into ``kallm train``'s and ``kallm heal``'s flags."""

from __future__ import annotations

import dataclasses
import typing


def option(default=None, help: str = "", **argparse_options):
    """A config field: its default, its help text and any argparse options (``aliases``, ``choices``,
    ``metavar``)."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options})


def flag_fields(config_class, group: str, manual: tuple[str, ...]):
    """``config_class``'s fields but the ``manual`` ones (whose flags a command writes itself), as a dataclass
    ``HfArgumentParser`` reads."""
    hints = typing.get_type_hints(config_class)
    flags = dataclasses.make_dataclass(f"{config_class.__name__}Flags", [
        (f.name, hints[f.name], dataclasses.field(default=f.default, metadata=f.metadata))
        for f in dataclasses.fields(config_class) if f.name not in manual
    ])
    flags._argument_group_name = group
    return flags


def add_flags(parser, *dataclasses_):
    """Add the flags ``HfArgumentParser`` makes of ``dataclasses_`` to ``parser``."""
    from transformers import HfArgumentParser

    # argparse's own way of taking over another parser's options (what parents= does)
    parser._add_container_actions(HfArgumentParser(dataclasses_, add_help=False))


def field_values(args, config_class) -> dict:
    """The parsed flags named like ``config_class``'s fields."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
