"""The main job (kallm demo) end to end on a tiny model: every stage runs and the saved
model reloads in a fresh process without kallm."""

from __future__ import annotations

import json

from conftest import make_tiny_tokenizer, tiny_model

from kallm.cli import main
from kallm.demo import format_table


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
    assert list(rows) == ["original", "retrofitted (fit init)", "+ 2 healing steps"]
    assert "fit relative error per block: 2: " in printed
    assert all(row["chat_loss"] > 0 for row in rows.values())
    assert "KALlamaForCausalLM |" in printed  # the fresh process loaded the remote-code class and replied
    assert "custom code" not in printed  # nothing stopped to ask for trust_remote_code
    assert len((out / "generated_held_out.jsonl").read_text().splitlines()) == 4


def test_format_table_shows_only_measured_columns():
    table = format_table({"original": {"chat_loss": 1.5}, "healed": {"chat_loss": 1.25}})
    assert table.splitlines()[0] == "| model | held-out chat loss |"
    assert "| healed | 1.250 |" in table
