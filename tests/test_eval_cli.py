"""The evaluate() API, its markdown/JSON report, the ``kallm eval`` command, and the real model."""

from __future__ import annotations

import argparse
import json

import pytest

from kallm.cli import eval as cli
from kallm.eval import evaluate, is_correct, to_markdown, write_results
from kallm.eval.evaluate import parse_tasks
from kallm.testing.data import TOY, write_tasks
from kallm.testing.models import chat_model
from kallm.testing.tokenizers import make_tiny_tokenizer

TEXT = "A tiny text to score, long enough for a couple of windows of a few tokens each.\n"
CHATS = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
         {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]


@pytest.fixture
def inputs(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(row) + "\n" for row in CHATS))
    return {"bbh": write_tasks(tmp_path / "bbh", TOY), "text": text, "chats": chats}


def test_parse_tasks():
    assert parse_tasks("bbh, perplexity,bbh") == ["bbh", "perplexity"]
    assert parse_tasks(["chat_loss"]) == ["chat_loss"]
    with pytest.raises(ValueError, match="unknown evaluation.*mmlu; choose from: bbh, perplexity, chat_loss"):
        parse_tasks("bbh,mmlu")
    with pytest.raises(ValueError, match="none given"):
        parse_tasks(" , ")


def test_evaluate_every_task_and_write_the_report(inputs, tmp_path):
    model, tokenizer = chat_model("llama"), make_tiny_tokenizer()
    results = evaluate(model, tokenizer, "bbh,perplexity,chat_loss", bbh_source=inputs["bbh"], limit=2,
                       mode="loglik", text=str(inputs["text"]), max_length=16, chat_data=str(inputs["chats"]),
                       batch_size=2, progress=False)
    assert list(results) == ["model", "bbh", "perplexity", "chat_loss"]
    assert results["bbh"]["mode"] == "loglik" and set(results["bbh"]["tasks"]) == {"boolean_expressions", "hyperbaton"}
    assert results["bbh"]["tasks"]["boolean_expressions"]["total"] == 2  # limit
    assert results["perplexity"]["tokens"] == len(TEXT) - 1 and results["perplexity"]["source"] == str(inputs["text"])
    assert results["chat_loss"]["conversations"] == 2
    assert all(results[task]["seconds"] >= 0 for task in ("bbh", "perplexity", "chat_loss"))

    markdown = to_markdown(results)
    accuracy = results["bbh"]["tasks"]["hyperbaton"]["accuracy"]
    assert f"| hyperbaton | {100 * accuracy:.1f}% | {results['bbh']['tasks']['hyperbaton']['correct']} / 2 |" in markdown
    assert f"| **average (2 tasks, macro)** | **{100 * results['bbh']['average']:.1f}%** | |" in markdown
    assert "- object_counting: not scored (free-form answers" in markdown
    assert f"| {inputs['text']} | {results['perplexity']['perplexity']:.2f} |" in markdown
    assert f"| {inputs['chats']} | {results['chat_loss']['loss']:.4f} |" in markdown

    paths = write_results(results, tmp_path / "out")
    saved = json.loads(paths["json"].read_text())
    assert "examples" not in saved["bbh"] and saved["bbh"]["tasks"] == results["bbh"]["tasks"]
    assert saved["perplexity"] == results["perplexity"]
    assert paths["markdown"].read_text() == markdown + "\n"
    records = [json.loads(line) for line in paths["examples"].read_text().splitlines()]
    assert records == results["bbh"]["examples"] and len(records) == 4


def test_evaluate_errors(inputs):
    model, tokenizer = chat_model("llama"), make_tiny_tokenizer()
    with pytest.raises(ValueError, match="needs chat_data"):
        evaluate(model, tokenizer, "chat_loss")
    with pytest.raises(ValueError, match="unknown BBH mode 'fast'; choose one of: generate, loglik"):
        evaluate(model, tokenizer, "bbh", bbh_source=inputs["bbh"], mode="fast")
    with pytest.raises(ValueError, match="unknown BBH task"):
        evaluate(model, tokenizer, "bbh", bbh_source=inputs["bbh"], bbh_tasks="snarks")
    with pytest.raises(FileNotFoundError, match="text file not found"):
        evaluate(model, tokenizer, "perplexity", text=str(inputs["text"]) + ".missing")


@pytest.fixture
def saved_model(tmp_path):
    folder = tmp_path / "model"
    chat_model("llama").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def parse(argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_command_end_to_end(saved_model, inputs, tmp_path, capsys):
    out = tmp_path / "report"
    code = cli.run(parse(["--model", str(saved_model), "--tasks", "bbh,perplexity,chat_loss",
                          "--bbh-dir", str(inputs["bbh"]), "--bbh-tasks", "hyperbaton,boolean_expressions",
                          "--limit", "1", "--max-new-tokens", "4", "--batch-size", "2", "--text", str(inputs["text"]),
                          "--max-length", "16", "--chat-data", str(inputs["chats"]), "--out", str(out), "--quiet"]))
    assert code == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"] == str(saved_model) and saved["bbh"]["mode"] == "generate"
    assert list(saved["bbh"]["tasks"]) == ["hyperbaton", "boolean_expressions"]
    assert all(entry["total"] == 1 for entry in saved["bbh"]["tasks"].values())
    assert (out / "results.md").read_text().strip() in printed
    assert len((out / "bbh_examples.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "bbh,mmlu"], "unknown evaluation"),
    (["--tasks", "bbh", "--bbh-tasks", "nope"], "unknown BBH task"),
    (["--tasks", "bbh", "--card", "--model", "someone/hub-model"], "--card writes into the model card of a local"),
])
def test_command_rejects_bad_input_before_loading_the_model(argv, message, inputs, monkeypatch):
    import kallm.checkpoints.load

    monkeypatch.setattr(kallm.checkpoints.load, "load_model", lambda *a, **k: pytest.fail("the model should not load"))
    with pytest.raises(ValueError, match=message):
        cli.run(parse(["--bbh-dir", str(inputs["bbh"]), *argv]))


@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "argument --limit: must be an integer >= 1, got '0'"),
    (["--max-tokens", "-5"], "argument --max-tokens: must be an integer >= 2, got '-5'"),
    (["--max-length", "nan"], "argument --max-length: must be an integer >= 2, got 'nan'"),
    (["--batch-size", "inf"], "argument --batch-size: must be an integer >= 1, got 'inf'"),
    (["--harness-fewshot", "-1"], "argument --harness-fewshot: must be an integer >= 0, got '-1'"),
])
def test_numbers_out_of_range_are_refused_while_the_command_line_is_read(argv, message, capsys):
    with pytest.raises(SystemExit) as refused:
        parse(["--model", "m", *argv])
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_command_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(["--mode", "beam"])
    error = capsys.readouterr().err
    assert "invalid choice: 'beam'" in error and "generate" in error and "loglik" in error
    with pytest.raises(SystemExit):
        parse(["--bbh-dir", "a", "--bbh-dataset", "b"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no BBH task files"):
        cli.run(parse(["--tasks", "bbh", "--bbh-dir", str(tmp_path / "empty")]))


def test_a_missing_bbh_dir_is_an_error_naming_it_and_the_hub_needs_bbh_dataset(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    from kallm.cli import main

    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, repo_type: asked.append(repo) or [])
    with pytest.raises(SystemExit) as refused:
        main(["eval", "--tasks", "bbh", "--bbh-dir", "missing/bbh"])
    assert refused.value.code == 2 and asked == []
    assert "kallm eval: error: argument --bbh-dir: no such file or folder: missing/bbh" in capsys.readouterr().err
    # the hub only through --bbh-dataset (this fake repository has no BBH configs)
    monkeypatch.setattr("datasets.load_dataset", lambda repo, task, split: [])
    assert main(["eval", "--tasks", "bbh", "--bbh-dataset", "someone/bbh", "--bbh-tasks", "navigate"]) == 2
    assert asked == ["someone/bbh"] and "'navigate' from someone/bbh has no examples" in capsys.readouterr().err


def inputs_of(data_dir, record) -> str:
    return json.loads((data_dir / "bbh" / "bbh" / f"{record['task']}.json").read_text())["examples"][record["index"]]["input"]


@pytest.mark.integration
@pytest.mark.all_threads  # the real model gains from every core
def test_real_model_on_two_bbh_tasks(smollm2, data_dir, tmp_path):
    model, tokenizer = smollm2
    tasks = "boolean_expressions,hyperbaton"
    generated = evaluate(model, tokenizer, "bbh", bbh_source=data_dir / "bbh" / "bbh", bbh_tasks=tasks, limit=2,
                         max_new_tokens=48, batch_size=4, progress=False)
    bbh = generated["bbh"]
    assert list(bbh["tasks"]) == tasks.split(",") and all(entry["total"] == 2 for entry in bbh["tasks"].values())
    assert all(record["response"] for record in bbh["examples"])
    # The instruct model gives a recognizable answer to at least half of these (it rambles on the rest).
    assert sum(record["predicted"] is not None for record in bbh["examples"]) >= 2
    for record in bbh["examples"]:
        assert record["correct"] == is_correct(record["response"], record["target"], inputs_of(data_dir, record))
    for task, entry in bbh["tasks"].items():
        assert entry["accuracy"] == sum(r["correct"] for r in bbh["examples"] if r["task"] == task) / 2
    paths = write_results(generated, tmp_path)
    markdown = paths["markdown"].read_text()
    assert "## BIG-Bench Hard (generate mode)" in markdown and "| boolean_expressions |" in markdown
    assert json.loads(paths["json"].read_text())["bbh"]["average"] == pytest.approx(bbh["average"])

    scored = evaluate(model, tokenizer, "bbh", bbh_source=data_dir / "bbh" / "bbh", bbh_tasks=tasks, limit=2,
                      mode="loglik", progress=False)["bbh"]
    assert all(entry["total"] == 2 for entry in scored["tasks"].values())
    for record in scored["examples"]:
        assert record["predicted"] in record["choices"] and all(lp < 0 for lp in record["logprobs"])


def test_card_adds_the_results_to_a_checkpoints_model_index(inputs, tmp_path, capsys):
    from huggingface_hub import ModelCard

    import kallm

    folder = tmp_path / "kan"
    kallm.retrofit(chat_model("llama"), last_n=1).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\n## My notes\n")
    cli.run(parse(["--model", str(folder), "--tasks", "perplexity,chat_loss", "--text", str(inputs["text"]),
                   "--max-length", "16", "--chat-data", str(inputs["chats"]), "--card", "--quiet"]))
    card = ModelCard((folder / "README.md").read_text())
    metrics = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert set(metrics) == {("text.txt", "perplexity"), ("chats.jsonl", "loss")}  # local files by name only
    assert "## My notes" in card.text and "| text.txt (n/a) | perplexity (" in card.text
    assert "added the results to" in capsys.readouterr().out
    with pytest.raises(ValueError, match="is no retrofitted kallm checkpoint"):
        plain = tmp_path / "plain"
        chat_model("llama").save_pretrained(plain)
        make_tiny_tokenizer().save_pretrained(plain)
        cli.run(parse(["--model", str(plain), "--tasks", "perplexity", "--text", str(inputs["text"]), "--card"]))
