"""``kallm train``: the command in-process, its errors, and two processes under torchrun (gloo)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_train_data import chat_tokenizer
from test_train_trainer import sums

import kallm
from kallm.train.cli import add_arguments, run

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


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
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        run(parse("--model", workspace / "student", "--data", data, "--max-steps", 0))
    with pytest.raises(SystemExit):
        parse("--model", "m", "--data", "d", "--bf16", "--fp16")
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
