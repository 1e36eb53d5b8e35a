"""The command line: retrofit, inspect, plot (tiny models, offline)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_tokenizer, tiny_model
from transformers import AutoModelForCausalLM

import kallm
from kallm.cli import main
from kallm.plot import edge_functions, strongest_edges
from kallm.surgery.cli import parse_options


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


def test_retrofit_command_saves_a_loadable_model_and_prints_the_table(saved_tiny, tmp_path, capsys):
    out = tmp_path / "kan"
    code = main(["retrofit", "--model", str(saved_tiny), "--out", str(out), "--last-n", "2",
                 "--basis", "legendre", "--degree", "3", "--option", "input_map=tanh"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| block | feedforward | parameters | trainable |" in printed and "| 2 | kan |" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.kan_config["layers"] == [1, 2]
    assert model.config.kan_config["basis"] == "legendre" and model.config.kan_config["degree"] == 3
    assert model.config.kan_config["layer_options"] == {"input_map": "tanh"}
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()


def test_retrofit_command_reports_bad_input_without_a_traceback(saved_tiny, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["retrofit", "--model", str(saved_tiny), "--out", str(out), "--last-n", "1", "--basis", "nope"]) == 2
    error = capsys.readouterr().err
    assert "unknown basis 'nope'" in error and "cheby2" in error
    assert not out.exists()


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
    assert main(["retrofit", "--model", str(saved_tiny), "--out", str(out), "--last-n", "1", *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_inspect_prints_kan_config_and_table(saved_tiny, tmp_path, capsys):
    out = tmp_path / "kan"
    main(["retrofit", "--model", str(saved_tiny), "--out", str(out), "--last-n", "1"])
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed.split("kan_config:\n")[1].split("\n\n")[0])["layers"] == [2]
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
    main(["retrofit", "--model", str(saved_tiny), "--out", str(out), "--last-n", "1"])
    png = tmp_path / "f.png"
    assert main(["plot", str(out), "--layer", "2", "--edges", "6", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(out), "--layer", "0"]) == 2
    assert "not a KAN block" in capsys.readouterr().err
