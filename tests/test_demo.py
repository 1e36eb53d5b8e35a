"""The main job (kallm demo) end to end on a tiny model: every stage runs and the saved
model reloads in a fresh process without kallm."""

from __future__ import annotations

import json

import pytest

from kallm.cli import main
from kallm.recipes.demo import format_table
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import make_tiny_tokenizer


def test_demo_runs_every_stage_on_a_tiny_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KALLM_DATA_DIR", raising=False)  # held-out chat loss only: fast and offline
    model_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "demo"
    code = main(["demo", "--model", str(model_dir), "--out", str(out), "--last-n", "1", "--heal-steps", "2",
                 "--held-out", "4", "--max-new-tokens", "8"])
    assert code == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "demo_results.json").read_text())
    assert list(rows) == ["original", "retrofitted (form=glu, exact start)", "retrofitted (fit init)",
                          "healed (kallm.heal)"]
    assert rows["retrofitted (form=glu, exact start)"] == rows["original"]  # it computes what the original did
    assert "2 steps, " in printed and (out / "heal" / "heal_curve.png").is_file()
    assert "fit relative error per block: 2: " in printed
    assert all(row["chat_loss"] > 0 for row in rows.values())
    assert "KALlamaForCausalLM |" in printed  # the fresh process loaded the remote-code class and replied
    assert "custom code" not in printed  # nothing stopped to ask for trust_remote_code
    assert len((out / "generated_held_out.jsonl").read_text().splitlines()) == 4


def test_demo_refuses_an_out_folder_holding_its_model(tmp_path, capsys):
    model_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    assert main(["demo", "--model", str(model_dir), "--out", str(tmp_path)]) == 2
    assert f"kallm demo: error: cannot write to {tmp_path}: it holds {model_dir}" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["base"]


def test_format_table_shows_only_measured_columns():
    table = format_table({"original": {"chat_loss": 1.5}, "healed": {"chat_loss": 1.25}})
    assert table.splitlines()[0] == "| model | held-out chat loss |"
    assert "| healed | 1.250 |" in table


@pytest.mark.integration  # slow: the whole demo in a fresh process
def test_demo_as_the_readme_runs_it_relative_paths_in_a_subprocess(tmp_path):
    """scripts/main.sh runs ``python -m kallm.cli demo`` with the default, relative ``--out``:
    the fresh-process reload must still find the saved model (it once took the relative
    folder for a hub id, because the child runs inside that folder)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tiny_model("llama").save_pretrained(tmp_path / "base")
    make_tiny_tokenizer().save_pretrained(tmp_path / "base")
    repo = Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if key != "KALLM_DATA_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "kallm.cli", "demo", "--model", "base", "--last-n", "1", "--heal-steps", "1",
         "--held-out", "4", "--max-new-tokens", "4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "KALlamaForCausalLM |" in result.stdout  # the fresh process loaded the saved model and replied
    assert (tmp_path / "runs" / "demo" / "model" / "config.json").is_file()  # the default, relative --out
