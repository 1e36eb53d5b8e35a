"""``kallm train``: the command in-process, its errors, and two processes under torchrun (gloo)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kallm
from kallm.cli.train import add_arguments, run
from kallm.testing.data import sums
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import chat_tokenizer
from kallm.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved retrofitted tiny model whose recorded base model is a saved teacher, and chat data."""
    root = tmp_path_factory.mktemp("train_cli")
    tokenizer = chat_tokenizer()
    teacher = tiny_model("llama")
    teacher.save_pretrained(root / "teacher")
    student = kallm.retrofit(tiny_model("llama"), last_n=1)
    student.config.kan_config["base_model"] = str(root / "teacher")
    for folder in ("student", "teacher"):
        tokenizer.save_pretrained(root / folder)
    student.save_pretrained(root / "student")
    (root / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in sums(32)))
    return root


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_train_command_trains_and_saves(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    code = run(parse("--model", workspace / "student", "--data", workspace / "chat.jsonl", "--out", out,
                     "--max-steps", 3, "--batch-size", 4, "--logging-steps", 1, "--lr", 1e-3, "--quiet"))
    assert code == 0
    printed = capsys.readouterr().out
    assert "32 of 32 conversations kept" in printed and "trained 3 steps on 1 process(es)" in printed
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3
    model, _ = kallm.load_model(str(out))
    assert model.config.kan_config["blocks"] == [2]


def test_train_command_distills_from_the_recorded_base_model(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    code = run(parse("--model", workspace / "student", "--data", workspace / "chat.jsonl", "--out", out,
                     "--max-steps", 2, "--batch-size", 4, "--logging-steps", 1, "--distill", "--quiet"))
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("distill_kl" in r for r in records if "loss" in r) and len(records) == 3
    summary = json.loads((out / "train_result.json").read_text())
    assert summary["config"]["distill_alpha"] == 0.5


def test_train_command_errors(workspace, tmp_path):
    data = workspace / "chat.jsonl"
    with pytest.raises(ValueError, match="--teacher is only used with --distill"):
        run(parse("--model", workspace / "student", "--data", data, "--teacher", workspace / "teacher"))
    with pytest.raises(ValueError, match="--distill needs --teacher"):
        run(parse("--model", workspace / "teacher", "--data", data, "--trainable", "all", "--distill",
                  "--out", tmp_path / "x"))
    with pytest.raises(SystemExit):  # refused while the command line is read
        parse("--model", workspace / "student", "--data", data, "--max-steps", 0)
    with pytest.raises(ValueError, match=r"max_steps must be an integer >= 1 \(or -1\), got 0"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="choose at most one of bf16 and fp16"):
        run(parse("--model", "m", "--data", "d", "--bf16", "--fp16"))
    with pytest.raises(SystemExit):
        parse("--model", "m", "--data", "d", "--trainable", "head")


def test_distill_never_guesses_a_teacher_from_a_local_folder_name(workspace, tmp_path, monkeypatch):
    """retrofit records a local base by its folder name only; that name must not be loaded as
    the teacher (it could be any folder of that name in the working directory)."""
    import shutil

    shutil.copytree(workspace / "student", tmp_path / "local_student")
    config_file = tmp_path / "local_student" / "config.json"
    config = json.loads(config_file.read_text())
    config["kan_config"]["base_model"] = "teacher"
    config_file.write_text(json.dumps(config))
    monkeypatch.chdir(workspace)  # a folder named "teacher" is right here
    with pytest.raises(ValueError, match="recorded only by its folder name .*pass --teacher"):
        run(parse("--model", tmp_path / "local_student", "--data", workspace / "chat.jsonl", "--distill",
                  "--max-steps", 1, "--out", tmp_path / "out"))


@pytest.mark.integration  # slow: starts torchrun and two workers
def test_two_processes_with_torchrun(workspace, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "kallm.cli", "train", "--model", str(workspace / "student"), "--data",
               str(workspace / "chat.jsonl"), "--out", str(out), "--max-steps", "3", "--batch-size", "2",
               "--logging-steps", "1", "--save-steps", "2", "--quiet"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads((out / "train_result.json").read_text())
    # DDP all-reduces gradients every step, so 3 steps with world size 2 means both ranks trained.
    assert summary["world_size"] == 2 and summary["global_step"] == 3
    assert "trained 3 steps on 2 process(es)" in completed.stdout
    assert (out / "checkpoint-2").is_dir()
    model, _ = kallm.load_model(str(out))
    before, _ = kallm.load_model(str(workspace / "student"))
    assert not torch.equal(model.model.norm.weight, before.model.norm.weight)


# ------------------------------------------------------------------ options from TrainConfig and TrainingArguments


def test_every_config_field_is_a_flag_with_help_and_the_fields_default():
    from kallm.cli.train import MANUAL_FIELDS, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    by_dest = {action.dest: action for action in parser._actions}
    for field in dataclasses.fields(TrainConfig):
        if field.name in MANUAL_FIELDS:
            continue
        action = by_dest[field.name]
        assert action.help and action.default == field.default, field.name
        assert f"--{field.name.replace('_', '-')}" in action.option_strings
    assert all(action.help for action in parser._actions if action.option_strings)
    assert config_from_args(parse("--model", "m", "--data", "d")) == TrainConfig()
    short = config_from_args(parse("--model", "m", "--data", "d", "--out", "o", "--lr", "0.5", "--scheduler", "linear",
                                   "--packing", "--quiet", "--resume"))
    assert (short.output_dir, short.learning_rate, short.lr_scheduler) == ("o", 0.5, "linear")
    assert short.packing and not short.progress_bar and short.resume is True


def test_training_arguments_pass_through_from_flags_and_a_yaml_file(tmp_path):
    from kallm.cli.train import config_from_args
    from kallm.train.trainer import training_arguments

    settings = tmp_path / "args.yaml"
    settings.write_text("optim: sgd\nlr_scheduler_kwargs: {}\nhub_strategy: end\n")
    config = config_from_args(parse("--model", "m", "--data", "d", "--report-to", "tensorboard", "--optim",
                                    "adamw_torch", "--torch-compile", "--training-args", settings))
    assert config.training_arguments == {"optim": "adamw_torch", "lr_scheduler_kwargs": {}, "hub_strategy": "end",
                                         "report_to": "tensorboard", "torch_compile": True}  # flags win
    args = training_arguments(config)
    assert args.report_to == ["tensorboard"] and args.optim == "adamw_torch" and args.torch_compile
    assert training_arguments(TrainConfig()).report_to == []  # nothing unless asked for ("none")


@pytest.mark.parametrize("name", ["ADAPTER_TYPES", "DERIVED_ARGUMENTS", "PASS_THROUGH", "SCHEDULERS",
                                  "check_training_arguments"])
def test_settings_moved_to_train_config_still_import_from_the_trainer_with_a_warning(name):
    from kallm.train import config, trainer

    with pytest.warns(FutureWarning, match=f"kallm.train.trainer.{name} is now kallm.train.config.{name}"):
        assert getattr(trainer, name) is getattr(config, name)
    with pytest.raises(AttributeError, match="has no attribute 'NO_SUCH_NAME'"):
        trainer.NO_SUCH_NAME  # noqa: B018


@pytest.mark.parametrize(("content", "message"), [
    ("learning_rate: 0.1\n", "learning_rate is kallm's setting 'learning_rate', set it there"),
    ("no_such_field: 1\n", "no_such_field is not TrainingArguments fields"),
    ("- a list\n", "must hold a mapping of TrainingArguments fields"),
])
def test_training_args_file_errors_name_the_field(tmp_path, content, message):
    from kallm.cli.train import config_from_args

    settings = tmp_path / "args.yaml"
    settings.write_text(content)
    with pytest.raises(ValueError, match=message):
        config_from_args(parse("--model", "m", "--data", "d", "--training-args", settings))
    with pytest.raises(SystemExit):  # refused while the command line is read
        parse("--model", "m", "--data", "d", "--training-args", tmp_path / "missing.yaml")


def test_early_stopping_needs_evaluation_data():
    with pytest.raises(ValueError, match="early stopping compares evaluations: give eval_data or eval_fraction"):
        TrainConfig(early_stopping_patience=2)
    with pytest.raises(ValueError, match="give eval_data or eval_fraction, not both"):
        TrainConfig(eval_data="x.jsonl", eval_fraction=0.1)


def test_held_out_split_evaluation_and_early_stopping_reach_the_card(workspace, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    run(parse("--model", workspace / "student", "--data", workspace / "chat.jsonl", "--out", out, "--max-steps", 40,
              "--batch-size", 4, "--logging-steps", 1, "--save-steps", 1, "--lr", 1.0, "--eval-fraction", 0.25,
              "--early-stopping-patience", 1, "--quiet"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r["eval_loss"] for r in records if "eval_loss" in r]
    summary = json.loads((out / "train_result.json").read_text())
    assert len(evaluations) >= 2 and summary["global_step"] < 40  # a learning rate of 1.0 soon stops improving
    assert summary["data"]["kept"] == 32  # read before 8 of them were held out
    card = ModelCard((out / "README.md").read_text())
    metrics = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert metrics["evaluation loss (assistant tokens, last logged)"] == pytest.approx(evaluations[-1])
    assert card.data.eval_results[0].dataset_name == "chat.jsonl"  # a local file by its name only
    assert card.data.datasets is None  # no hub dataset to name


def test_trainer_push_to_hub_uploads_kallms_card(workspace, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    uploads = []

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append(repo_id)
        shutil.copytree(folder_path, tmp_path / "hub", dirs_exist_ok=True)
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/x/commit/0", "oid": "0"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kwargs: type("RepoUrl", (), {"repo_id": repo_id})())
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    run(parse("--model", workspace / "student", "--data", workspace / "chat.jsonl", "--out", tmp_path / "out",
              "--max-steps", 1, "--batch-size", 4, "--logging-steps", 1, "--push-to-hub", "--hub-model-id",
              "someone/tiny-kan",
              "--training-args", _yaml(tmp_path, "hub_strategy: end\n"), "--quiet"))
    assert uploads and set(uploads) == {"someone/tiny-kan"}
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "| retrofitted blocks |" in card and 'from_pretrained("someone/tiny-kan"' in card
    assert "automatically generated" not in card  # not transformers' generic card
    assert "training loss (assistant tokens, last logged)" in card


def _yaml(folder, text):
    path = folder / "training.yaml"
    path.write_text(text)
    return path
