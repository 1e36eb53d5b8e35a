"""Config fields that are also command-line flags: a field's default, help and argparse options are written
once, on the field, and ``HfArgumentParser`` turns them into ``kallm train``'s and ``kallm heal``'s flags."""

from __future__ import annotations

import dataclasses
import functools
import typing
import warnings

from ..values import Number, finite_float, finite_int


def option(default=None, help: str = "", valid=None, **argparse_options):
    """A config field: its default, its help text, its valid values (a ``kallm.values.Number``: the flag
    refuses others while the command line is read, ``check_values`` when the config is made; or another argparse
    type of ``kallm.values``, for the flag only) and any argparse options (``aliases``, ``choices``,
    ``metavar``)."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options,
                                                        **({"valid": valid} if valid else {})})


def check_values(config) -> None:
    """Raise ``ValueError`` for the first field of ``config`` whose value its ``valid`` range refuses."""
    for f in dataclasses.fields(config):
        if isinstance(f.metadata.get("valid"), Number):  # other checks (local paths) are the command line's
            f.metadata["valid"].check(f.name, getattr(config, f.name))


def flag_fields(config_class, group: str, manual: tuple[str, ...]):
    """``config_class``'s fields but the ``manual`` ones (whose flags a command writes itself), as a dataclass
    ``HfArgumentParser`` reads."""
    hints = typing.get_type_hints(config_class)
    chosen = [f for f in dataclasses.fields(config_class) if f.name not in manual]
    flags = dataclasses.make_dataclass(f"{config_class.__name__}Flags", [
        (f.name, hints[f.name], dataclasses.field(
            default=f.default, metadata={key: value for key, value in f.metadata.items() if key != "valid"}))
        for f in chosen
    ])
    flags._argument_group_name = group
    flags._valid = {f.name: f.metadata["valid"] for f in chosen if "valid" in f.metadata}
    return flags


def add_flags(parser, *dataclasses_):
    """Add the flags ``HfArgumentParser`` makes of ``dataclasses_`` to ``parser``."""
    from transformers import HfArgumentParser

    flags = HfArgumentParser(dataclasses_, add_help=False)
    valid = {name: check for flags_class in dataclasses_ for name, check in getattr(flags_class, "_valid", {}).items()}
    for action in flags._actions:  # HfArgumentParser types a flag by its field's type: the range checks instead
        if action.dest in valid:
            action.type = valid[action.dest]
        elif action.type in (int, float):
            action.type = finite_int if action.type is int else finite_float
    # argparse's own way of taking over another parser's options (what parents= does)
    parser._add_container_actions(flags)


def field_values(args, config_class) -> dict:
    """The parsed flags named like ``config_class``'s fields."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}


def renamed_fields(renamed: dict[str, str]):
    """A config class decorator: the fields' names of the previous release (``{old: new}``) still work for one
    release, as keywords and as attributes, with a FutureWarning that names the new one."""

    def decorate(config_class):
        init = config_class.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"give {new} or its old name {old}, not both")
                    _warn_renamed(config_class, old, new)
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        def old_attribute(new, old):
            def read(self):
                _warn_renamed(config_class, old, new)
                return getattr(self, new)

            return property(read)

        config_class.__init__ = __init__
        for old, new in renamed.items():
            setattr(config_class, old, old_attribute(new, old))
        return config_class

    return decorate


def _warn_renamed(config_class, old: str, new: str) -> None:
    warnings.warn(f"{config_class.__name__}.{old} is now {new}; the old name is kept for this release only",
                  FutureWarning, stacklevel=3)
