"""The command line: retrofit, inspect, plot (tiny models, offline)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import kallm
import kallm.cli
from kallm.cli import main
from kallm.cli.retrofit import parse_options
from kallm.eval.plot import edge_functions, strongest_edges
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved_tiny(tmp_path):
    """A tiny Llama with a tokenizer, saved like a hub checkpoint."""
    folder = tmp_path / "base"
    tiny_model("llama").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def test_parse_options_types_values_and_rejects_malformed():
    assert parse_options(["alpha=0.5", "input_map=tanh", "grid_size=7"]) == {
        "alpha": 0.5, "input_map": "tanh", "grid_size": 7,
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["alpha"])


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"kallm {kallm.__version__}"


def test_help_imports_only_the_command_it_describes(monkeypatch, capsys):
    imported = []
    real_import = kallm.cli.importlib.import_module
    monkeypatch.setattr(kallm.cli.importlib, "import_module", lambda name: imported.append(name) or real_import(name))
    with pytest.raises(SystemExit):
        main(["--help"])
    assert imported == [] and "retrofit" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    assert imported == ["kallm.cli.inspect"]


LIGHT_IMPORT = """
import sys
import kallm.cli
kallm.cli.build_parser(commands=[]).format_help()
heavy = sorted({"torch", "transformers"} & set(sys.modules))
assert not heavy, f"kallm --help imported {heavy}"
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
config = AutoConfig.for_model("kallama")
print(type(config).__name__, MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__)
"""


def test_help_imports_neither_torch_nor_transformers_yet_kallm_registers_when_they_load():
    # A fresh process is the only place where import-time behaviour can be seen.
    result = subprocess.run([sys.executable, "-c", LIGHT_IMPORT], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["KALlamaConfig", "KALlamaForCausalLM"]


def _subcommand_parsers(parser):
    (subparsers,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return subparsers.choices


# train and demo belong to their own modules' owners; every other command documents each option.
DOCUMENTED_COMMANDS = ("retrofit", "inspect", "eval", "experiment", "plot")


@pytest.mark.parametrize("command", DOCUMENTED_COMMANDS)
def test_every_option_has_help(command):
    parser = _subcommand_parsers(kallm.cli.build_parser(commands=[command]))[command]
    undocumented = [action.dest for action in parser._actions if not action.help]
    assert undocumented == []


def test_help_shows_defaults_and_closed_choices(capsys):
    with pytest.raises(SystemExit):
        main(["retrofit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "retrofit the last N decoder blocks (default: 5)" in help_text
    assert "--kind {kan,linear}" in help_text and "--form {kan,glu,gated}" in help_text
    assert "--trainable {retrofitted,functions,tail,tail+embeddings,all}" in help_text
    with pytest.raises(SystemExit) as exit_info:
        main(["retrofit", "--out", "never", "--kind", "mlp"])
    assert exit_info.value.code == 2 and "argument --kind: invalid choice: 'mlp'" in capsys.readouterr().err


def test_retrofit_command_saves_a_loadable_model_and_prints_the_table(saved_tiny, tmp_path, capsys):
    out = tmp_path / "kan"
    code = main(["retrofit", "--model", str(saved_tiny), "--out", str(out), "--last-n", "2",
                 "--basis", "legendre", "--degree", "3", "--option", "input_map=tanh"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| block | feedforward | parameters | trainable |" in printed and "| 2 | kan |" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.kan_config["blocks"] == [1, 2]
    assert model.config.kan_config["basis"] == "legendre" and model.config.kan_config["degree"] == 3
    assert model.config.kan_config["input_map"] == "tanh"
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()


def test_retrofit_command_reports_bad_input_without_a_traceback(saved_tiny, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["retrofit", "--model", str(saved_tiny), "--out", str(out), "--last-n", "1", "--basis", "nope"]) == 2
    error = capsys.readouterr().err
    assert "unknown basis 'nope'" in error and "cheby2" in error
    assert not out.exists()


def test_retrofit_command_refuses_to_save_over_the_model_it_reads(saved_tiny, capsys):
    before = {path.name: path.read_bytes() for path in saved_tiny.iterdir()}
    for out in (saved_tiny, saved_tiny / "retrofitted", saved_tiny.parent):
        assert main(["retrofit", "--model", str(saved_tiny), "--out", str(out), "--last-n", "1"]) == 2
        assert f"kallm retrofit: error: cannot write to {out}: it " in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in saved_tiny.iterdir()} == before


def test_retrofit_command_fit_init_on_a_calibration_file(saved_tiny, tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text("The river flows past the old mill and under the stone bridge. " * 12)
    out = tmp_path / "fitted"
    code = main(["retrofit", "--model", str(saved_tiny), "--out", str(out), "--last-n", "1", "--init", "fit",
                 "--calibration", str(text)])
    assert code == 0
    errors = capsys.readouterr().out.split("Fit relative error per block: ")[1].splitlines()[0]
    block, error = errors.split(": ")
    assert block == "2" and 0 < float(error) < 0.9
    fitted = AutoModelForCausalLM.from_pretrained(out)
    random = kallm.retrofit(tiny_model("llama"), last_n=1)
    first = "model.layers.2.mlp.layers.0.input_scale"
    assert not torch.equal(fitted.state_dict()[first], random.state_dict()[first])  # set from the data


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--calibration", "calibration.txt"], "--calibration is only used with --init fit"),
        (["--init", "fit", "--calibration", "missing.txt"], "missing.txt"),
    ],
)
def test_retrofit_command_refuses_bad_calibration(saved_tiny, tmp_path, capsys, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calibration.txt").write_text("some text")
    out = tmp_path / "never"
    try:  # a missing file is refused while the command line is read (SystemExit), other errors when it runs
        status = main(["retrofit", "--model", str(saved_tiny), "--out", str(out), "--last-n", "1", *arguments])
    except SystemExit as error:
        status = error.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_inspect_prints_kan_config_and_table(saved_tiny, tmp_path, capsys):
    out = tmp_path / "kan"
    main(["retrofit", "--model", str(saved_tiny), "--out", str(out), "--last-n", "1"])
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed.split("kan_config:\n")[1].split("\n\n")[0])["blocks"] == [2]
    assert "| 2 | kan |" in printed and "| 0 | original |" in printed


def test_edge_functions_match_the_layer_output():
    model = tiny_model("llama")
    kallm.retrofit(model, last_n=1, basis="cheby2+rbf", degree=3)
    layer = model.model.layers[2].mlp.layers[0].double()
    with torch.no_grad():
        layer.input_scale.uniform_(0.5, 2.0)
        layer.input_shift.uniform_(-0.5, 0.5)
    edges = [(0, 1), (5, 3)]
    x, y = edge_functions(layer, edges)
    for row, (i, o) in enumerate(edges):
        inputs = torch.zeros(x.shape[1], layer.in_features, dtype=torch.float64)
        inputs[:, i] = x[row]
        with torch.no_grad():
            out = layer(inputs)[:, o]
        # Other inputs are constant, so differences along x come from edge (i, o) alone.
        torch.testing.assert_close(out - out[0], y[row] - y[row][0])


def test_strongest_edges_ranks_by_coefficient_norm():
    layer = kallm.KANLinear(4, 3)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight.view(3, 2, 4)[2, :, 1] = 5.0
    assert strongest_edges(layer, 1) == [(1, 2)]


def test_plot_command_writes_png_and_rejects_non_kan_blocks(saved_tiny, tmp_path, capsys):
    out = tmp_path / "kan"
    main(["retrofit", "--model", str(saved_tiny), "--out", str(out), "--blocks", "2"])
    png = tmp_path / "f.png"
    assert main(["plot", str(out), "--block", "2", "--edges", "6", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(out), "--block", "0"]) == 2
    assert "not a KAN block" in capsys.readouterr().err
    # --layer is the deprecated name of --block
    with pytest.warns(FutureWarning, match="--layer is deprecated: use --block"):
        assert main(["plot", str(out), "--layer", "0"]) == 2
    assert "not a KAN block" in capsys.readouterr().err


# --- which failures read as one line, and which keep their traceback --------------------------------


def test_a_truncated_weights_file_is_one_line_naming_it(saved_tiny, tmp_path, capsys):
    weights = saved_tiny / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["retrofit", "--model", str(saved_tiny), "--out", str(tmp_path / "never"), "--last-n", "1"]) == 2
    error = capsys.readouterr().err
    assert f"error: cannot read the weights of {saved_tiny}: {weights} is damaged or incomplete" in error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()


def test_a_hub_id_in_offline_mode_says_how_to_work_offline(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = main(["retrofit", "--model", "kallm-tests/no-such-model", "--out", str(tmp_path / "never")])
    error = capsys.readouterr().err
    assert code == 2 and len(error.strip().splitlines()) == 1, error
    assert "HF_HUB_OFFLINE is set and the files are not in the local cache" in error
    assert "a .gguf file or the bundled smollm2-135m-instruct" in error


@pytest.mark.parametrize("name", ["./out/nothing", "out/nothing", "out/deeper/nothing", "~/surely-no-such-kallm-model"])
def test_a_local_folder_that_does_not_exist_is_not_taken_for_an_unreachable_hub(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()  # "out/nothing" reads like a hub id, but out/ is a folder here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=f"model folder {name} does not exist"):
        kallm.load_model(name)
    with pytest.raises(SystemExit) as refused:
        main(["inspect", name])
    error = capsys.readouterr().err
    assert refused.value.code == 2 and f"kallm inspect: error: argument model: no such file or folder: {name}" in error
    assert "Hub" not in error and "Traceback" not in error
    assert kallm.checkpoints.load.resolve_model("someone/model") == ("someone/model", None)  # no folder someone/ here


def test_an_unreachable_hub_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    import socket

    import kallm.cli.retrofit

    def unreachable(name):
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except OSError as cause:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.") from cause

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(kallm.cli.retrofit, "load_model", unreachable)
    arguments = ["retrofit", "--model", "someone/model", "--out", str(tmp_path / "never")]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert "error: the Hugging Face Hub cannot be reached (We couldn't connect" in error and "HF_HUB_OFFLINE=1" in error

    def bug(name):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(kallm.cli.retrofit, "load_model", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(arguments)


def test_an_option_of_the_wrong_type_is_still_bad_input(saved_tiny, tmp_path, capsys):
    code = main(["retrofit", "--model", str(saved_tiny), "--out", str(tmp_path / "never"), "--basis", "rbf",
                 "--option", "width=wide"])
    error = capsys.readouterr().err
    assert code == 2 and "basis 'rbf': width must be > 0" in error and "got 'wide'" in error
    assert "Traceback" not in error


def test_a_failed_retrofit_save_keeps_the_previous_checkpoint(saved_tiny, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils

    out = tmp_path / "kan"
    assert main(["retrofit", "--model", str(saved_tiny), "--out", str(out), "--last-n", "1"]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    assert main(["retrofit", "--model", str(saved_tiny), "--out", str(out), "--last-n", "2"]) == 2
    assert "kallm retrofit: error: [Errno 28] No space left on device" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base", "kan"]


@pytest.mark.parametrize("command", kallm.cli.COMMANDS)
def test_every_option_has_help_text(command):
    subparsers = next(action for action in kallm.cli.build_parser(commands=[command])._actions
                      if isinstance(action, argparse._SubParsersAction))
    undocumented = [action.option_strings[0] for action in subparsers.choices[command]._actions
                    if action.option_strings and not action.help]
    assert not undocumented, f"kallm {command}: options without help: {undocumented}"
