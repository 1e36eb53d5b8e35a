"""Degree curriculum (``TrainConfig.degree_stages``, ``kallm train --degree-stages``): stages of rising KAN degree
with an exact conversion between them."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import TrainerCallback

import kallm
from kallm.cli.train import add_arguments, config_from_args
from kallm.testing.compare import logits_of
from kallm.testing.data import sums
from kallm.testing.models import tiny_model
from kallm.testing.processes import load_script
from kallm.testing.tokenizers import chat_tokenizer
from kallm.train import TrainConfig, train

TOKENS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))


class LogitsAtEachStart(TrainerCallback):
    def __init__(self):
        self.starts = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        self.starts.append(logits_of(model.eval(), TOKENS))
        model.train(was_training)


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "run"), max_steps=7, batch_size=4, learning_rate=3e-3, warmup=0,
                    logging_steps=1, save_steps=100, progress_bar=False, degree_stages=[1, 2, 3])
    return TrainConfig(**{**settings, **overrides})


def test_stages_raise_the_degree_with_exact_conversions_and_save_the_final_model(tmp_path):
    model = kallm.retrofit(tiny_model("llama"), last_n=2, degree=1)
    tokenizer, starts = chat_tokenizer(), LogitsAtEachStart()
    result = train(model, tokenizer, sums(16), config(tmp_path), callbacks=[starts])

    assert [(s["degree"], s["global_step"]) for s in result.stages] == [(1, 2), (2, 2), (3, 3)]
    assert result.global_step == 7 and model.config.kan_config["degree"] == 3
    # each stage starts from the model the previous one saved, moved to the next degree without changing its outputs
    for stage, start in zip(result.stages[:-1], starts.starts[1:]):
        previous, _ = kallm.load_model(stage["output_dir"])
        torch.testing.assert_close(start, logits_of(previous.eval(), TOKENS), rtol=1e-4, atol=1e-5)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["degree"]) for r in records if "loss" in r]
    assert losses == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3), (7, 3)]
    final, _ = kallm.load_model(str(tmp_path / "run"))
    assert final.config.kan_config["degree"] == 3
    torch.testing.assert_close(logits_of(final.eval(), TOKENS), logits_of(model.eval(), TOKENS), rtol=0, atol=0)
    summary = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert summary["config"]["degree_stages"] == [1, 2, 3] and len(summary["stages"]) == 3


def test_each_stage_draws_its_own_data_order(tmp_path, monkeypatch):
    from kallm.train import trainer

    seen = []
    real_train = trainer.train

    def recording_train(model, tokenizer, data, stage_config, **kwargs):
        seen.append(stage_config.seed)
        return real_train(model, tokenizer, data, stage_config, **kwargs)

    monkeypatch.setattr(trainer, "train", recording_train)
    model = kallm.retrofit(tiny_model("llama"), last_n=1, degree=1)
    train(model, chat_tokenizer(), sums(8), config(tmp_path, max_steps=3, seed=5))
    assert seen == [5, 6, 7]


def test_the_stages_follow_one_learning_rate_schedule_warmup_once(tmp_path):
    def learning_rates(run, degree_stages):
        model = kallm.retrofit(tiny_model("llama"), last_n=1, degree=degree_stages[0] if degree_stages else 3)
        train(model, chat_tokenizer(), sums(16), config(tmp_path, output_dir=str(tmp_path / run), warmup=2,
                                                         degree_stages=degree_stages))
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["learning_rate"] for r in records if "learning_rate" in r}

    staged, single = learning_rates("staged", [1, 2, 3]), learning_rates("single", None)
    assert list(staged) == list(single) == list(range(1, 8))
    # stage by stage, the learning rate is the one a single 7-step run of the same settings logs: one warmup,
    # one cosine decay, no restart at a stage's first step
    rates = list(staged.values())
    assert rates == pytest.approx(list(single.values()), rel=1e-6)
    assert rates[2:] == sorted(rates[2:], reverse=True) and rates[-1] < 0.1 * max(rates)


def test_the_command_line_takes_degree_stages():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--data", "d", "--degree-stages", "1", "2", "--max-steps", "4"])
    assert config_from_args(args).degree_stages == [1, 2]


@pytest.mark.parametrize("settings, message", [
    (dict(degree_stages=[2, 1]), "degree_stages must be increasing degrees >= 1"),
    (dict(degree_stages=[0, 1]), "degree_stages must be an integer >= 1 each, got \\[0, 1\\]"),
    (dict(max_steps=-1), "degree_stages needs max_steps"),
    (dict(resume=True), "degree_stages cannot resume"),
    (dict(adapter_rank=2), "train without adapter_rank"),
])
def test_bad_settings_are_refused_when_the_config_is_made(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **settings)


def test_models_whose_stages_cannot_convert_exactly_are_refused_before_training(tmp_path):
    tokenizer = chat_tokenizer()
    cases = [
        (tiny_model("llama"), "needs a retrofitted model with KAN layers"),
        (kallm.retrofit(tiny_model("llama"), last_n=1, degree=2), r"must start at the model's degree \(2\)"),
        (kallm.retrofit(tiny_model("llama"), last_n=1, basis="rbf", degree=1), "needs exact conversions"),
    ]
    for model, message in cases:
        with pytest.raises(ValueError, match=message):
            train(model, tokenizer, sums(8), config(tmp_path))
    assert not (tmp_path / "run").exists()


def test_the_curriculum_benchmark_runs_on_a_tiny_model(tmp_path, capsys):
    from kallm.checkpoints.save import save_checkpoint

    bench = load_script("bench_curriculum")
    save_checkpoint(tiny_model("llama"), chat_tokenizer(), tmp_path / "base")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in sums(8)))
    assert bench.main(["--model", str(tmp_path / "base"), "--train-data", str(data), "--eval-data", str(data),
                       "--stages", "1", "2", "--steps", "2", "--last-n", "1", "--max-length", "96",
                       "--seeds", "0", "1", "--json", str(tmp_path / "bench.json")]) == 0
    table = capsys.readouterr().out
    assert "| curriculum 1 -> 2 | 1 |" in table and "| degree 2 from the start | 1 |" in table
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [(row["arm"], row["seed"]) for row in report["runs"]] == [
        ("curriculum 1 -> 2", 0), ("degree 2 from the start", 0), ("curriculum 1 -> 2", 1),
        ("degree 2 from the start", 1)]
    assert [len(row["seed_losses"]) for row in report["means"]] == [2, 2]
