"""``kallm eval --harness``: lm-evaluation-harness on a tiny model with local task YAMLs, offline, merged into
kallm's report; and kallm's BBH as harness tasks scoring exactly like kallm's own loglik mode."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra kallm[harness] (in dev)")

from kallm.eval import bbh, cli  # noqa: E402
from kallm.eval.harness import evaluate_harness, write_bbh_tasks  # noqa: E402
from kallm.testing.data import TOY
from kallm.testing.models import chat_model
from kallm.testing.tokenizers import make_tiny_tokenizer

#: more closed-answer examples than TOY, so that equal accuracies mean something
BOOLEAN = [{"input": f"{a} {op} {b} is", "target": str(a and b if op == "and" else a or b)}
           for a in (True, False) for op in ("and", "or") for b in (True, False)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_bbh_as_harness_tasks_scores_like_kallms_loglik_mode(tmp_path):
    model, tokenizer = chat_model("llama"), make_tiny_tokenizer()
    data = {"boolean_expressions": BOOLEAN, "hyperbaton": TOY["hyperbaton"], "object_counting": TOY["object_counting"]}
    names = write_bbh_tasks(data, tmp_path / "tasks")
    assert names == ["kallm_bbh_boolean_expressions", "kallm_bbh_hyperbaton"]  # free-form tasks left out
    harness = evaluate_harness(model, tokenizer, names, include=str(tmp_path / "tasks"), batch_size=4)
    ours = bbh.evaluate_bbh(model, tokenizer, data, mode="loglik", progress=False)
    for task in ("boolean_expressions", "hyperbaton"):
        assert harness["tasks"][f"kallm_bbh_{task}"]["acc"] == pytest.approx(ours["tasks"][task]["accuracy"])
    assert 0 < ours["tasks"]["boolean_expressions"]["accuracy"] < 1  # a real comparison, not all-or-nothing


def test_command_merges_harness_results_into_the_report_and_refuses_unknown_tasks(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "model"
    chat_model("llama").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    names = write_bbh_tasks({"boolean_expressions": BOOLEAN}, tmp_path / "tasks")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "report"
    cli.run(parser.parse_args(["--model", str(folder), "--harness", names[0], "--harness-include",
                               str(tmp_path / "tasks"), "--harness-limit", "5", "--out", str(out), "--quiet"]))
    saved = json.loads((out / "results.json").read_text())
    assert list(saved) == ["harness", "model"]  # no kallm evaluation unless --tasks asks for one
    assert set(saved["harness"]["tasks"]) == {names[0]} and saved["harness"]["limit"] == 5
    assert "| kallm_bbh_boolean_expressions | acc |" in capsys.readouterr().out

    import lm_eval.tasks

    import kallm.checkpoints.load

    class CatalogueWithoutIt(lm_eval.tasks.TaskManager):  # indexing the whole catalogue takes long; not needed here
        def __init__(self, include_path=None, include_defaults=True):
            super().__init__(include_path=include_path, include_defaults=False)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", CatalogueWithoutIt)
    monkeypatch.setattr(kallm.checkpoints.load, "load_model", lambda *a, **k: pytest.fail("the model should not load"))
    with pytest.raises(ValueError, match="unknown lm-evaluation-harness task.*no_such_task"):
        cli.run(parser.parse_args(["--model", str(folder), "--harness", "no_such_task", "--harness-include",
                                   str(tmp_path / "tasks")]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # a missing folder is refused while the command line is read
        parser.parse_args(["--model", str(folder), "--harness", names[0], "--harness-include",
                           str(tmp_path / "missing")])
    assert refused.value.code == 2
    assert "argument --harness-include: no such file or folder" in capsys.readouterr().err
