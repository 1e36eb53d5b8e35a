"""Every option of every ``kallm`` command, fed bad values: a one-line error naming the option and its valid values,
exit status 2, no traceback and nothing written, before any model loads.

The options come from the parsers themselves (``kallm.cli.build_parser``), so a new option is fuzzed as soon as it
exists: a number gets a negative value, zero, ``inf``, ``nan`` and a word; a local input path one that is missing.
Values an option legitimately takes are listed in ``ACCEPTED`` with the reason.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kallm.cli
from kallm.cli import COMMANDS, build_parser, main
from kallm.cli.sweep import seed_list
from kallm.values import Number, existing_path, path_or_hub_id

REPO = Path(__file__).resolve().parent.parent
BAD_NUMBERS = ("-1", "0", "inf", "nan", "ten")
MISSING = "./missing/nothing"
#: (command, option dest) -> the values of BAD_NUMBERS it rightly takes, and why
ACCEPTED = {
    ("retrofit", "blocks"): ({"-1", "0"}, "block indices: 0 is the first block, negative ones count from the end"),
    ("retrofit", "deprecated_layers"): ({"-1", "0"}, "--layers, the old name of --blocks"),
    ("train", "max_steps"): ({"-1"}, "-1 trains for --epochs over the data instead"),
    ("train", "warmup"): ({"0"}, "no warmup"),
    ("train", "weight_decay"): ({"0"}, "no weight decay"),
    ("train", "max_grad_norm"): ({"0"}, "no gradient clipping"),
    ("train", "eval_fraction"): ({"0"}, "no held-out share"),
    ("train", "distill_alpha"): ({"0"}, "cross-entropy only"),
    ("train", "adapter_dropout"): ({"0"}, "no dropout"),
    ("train", "renamed_lora_dropout"): ({"0"}, "--lora-dropout, the old name of --adapter-dropout"),
    ("train", "seed"): ({"0"}, "a seed"),
    ("heal", "warmup"): ({"0"}, "no warmup"),
    ("heal", "ce_weight"): ({"0"}, "KL only"),
    ("heal", "max_grad_norm"): ({"0"}, "no gradient clipping"),
    ("heal", "local_fraction"): ({"0"}, "skips the block-local stage"),
    ("heal", "local_passes"): ({"0"}, "skips training in the block-local stage"),
    ("heal", "save_steps"): ({"0"}, "no checkpoints"),
    ("heal", "seed"): ({"0"}, "a seed"),
    ("eval", "harness_fewshot"): ({"0"}, "zero-shot prompts"),
    ("plot", "block"): ({"0"}, "the first block"),
    ("plot", "deprecated_layer"): ({"0"}, "--layer, the old name of --block"),
    ("plot", "stage"): ({"0"}, "the first KAN layer of the feedforward"),
    ("demo", "heal_minutes"): ({"0"}, "skips healing"),
    ("sweep", "seeds"): ({"0"}, "a seed"),
}
#: options typed by a function of their own, with the words their error says
OTHER_TYPES = {seed_list: "takes integers in [0, 4294967295]"}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def cases():
    numbers, paths = [], []
    for command, parser in subparsers().items():
        positionals = [a for a in parser._actions if not a.option_strings]
        for action in parser._actions:
            name = action.option_strings[0] if action.option_strings else None
            # a positional is reached by filling those before it with a valid choice
            before = [] if name else [a.choices[0] for a in positionals[:positionals.index(action)]]
            if isinstance(action.type, Number) or action.type in OTHER_TYPES:
                accepted = ACCEPTED.get((command, action.dest), (set(), ""))[0]
                numbers += [pytest.param(command, action, before, value, value in accepted,
                                         id=f"{command}-{action.dest}={value}") for value in BAD_NUMBERS]
            elif action.type in (existing_path, path_or_hub_id):
                paths.append(pytest.param(command, action, before, id=f"{command}-{action.dest}"))
    return numbers, paths


NUMBER_CASES, PATH_CASES = cases()


@pytest.fixture
def run_in_empty_folder(tmp_path, monkeypatch, capsys):
    """``kallm ARGV`` in an empty working folder: (exit status, stderr); each command's parser is built once."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = functools.cache(lambda commands: build_parser(list(commands)))
    monkeypatch.setattr(kallm.cli, "build_parser", lambda commands=None: cached(tuple(commands or COMMANDS)))

    def run(argv):
        try:
            status = main(argv)
        except SystemExit as error:
            status = error.code
        assert list(tmp_path.iterdir()) == [], f"kallm {' '.join(argv)} wrote files"
        return status, capsys.readouterr().err

    return run


def expected_refusal(command: str, action, error: str) -> str:
    """The last line of ``error``, checked to be argparse's one line for ``action``."""
    assert "Traceback" not in error
    line = error.strip().splitlines()[-1]
    shown = "/".join(action.option_strings) or action.metavar or action.dest
    assert line.startswith(f"kallm {command}: error: argument {shown}: "), line
    return line


def test_every_numeric_option_has_a_checked_range():
    """No option is typed plain int or float, which would take inf, nan and any sign."""
    unchecked = [f"kallm {command} {'/'.join(a.option_strings)}" for command, parser in subparsers().items()
                 for a in parser._actions if a.type in (int, float)]
    assert unchecked == []
    assert len(NUMBER_CASES) >= 5 * 70 and len(PATH_CASES) >= 25  # the walk found the options


def test_the_accepted_values_table_names_real_options():
    found = {(command, a.dest) for command, parser in subparsers().items() for a in parser._actions}
    assert set(ACCEPTED) <= found


@pytest.mark.parametrize("command, action, before, value, accepted", NUMBER_CASES)
def test_numbers_out_of_range_are_refused_while_the_command_line_is_read(run_in_empty_folder, command, action,
                                                                         before, value, accepted):
    option = [action.option_strings[0]] if action.option_strings else []
    if accepted:  # the value parses; the command then goes on (and is not run here)
        assert action.type(value) is not None
        return
    status, error = run_in_empty_folder([command, *before, *option, value])
    line = expected_refusal(command, action, error)
    assert status == 2
    valid = OTHER_TYPES.get(action.type) or f"must be {action.type.describe()}"
    assert valid in line and repr(value) in line


@pytest.mark.parametrize("command, action, before", PATH_CASES)
def test_a_missing_input_path_is_refused_while_the_command_line_is_read(run_in_empty_folder, command, action,
                                                                        before):
    option = [action.option_strings[0]] if action.option_strings else []
    status, error = run_in_empty_folder([command, *before, *option, MISSING])
    line = expected_refusal(command, action, error)
    assert status == 2 and f"no such file or folder: {MISSING}" in line


@pytest.mark.parametrize("argv, expected", [
    (["heal", "--model", "m", "--out", "o", "--max-grad-norm", "-1"],
     "kallm heal: error: argument --max_grad_norm/--max-grad-norm: must be a finite number >= 0, got '-1'"),
    (["eval", "--max-tokens", "-5"], "kallm eval: error: argument --max-tokens: must be an integer >= 2, got '-5'"),
])
def test_end_to_end_the_refusal_is_one_line_without_a_traceback(tmp_path, argv, expected):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-m", "kallm.cli", *argv], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1] == expected
    assert list(tmp_path.iterdir()) == []
