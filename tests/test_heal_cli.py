"""``kallm heal``: the command in-process, its errors, and two processes under torchrun (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kallm
from kallm.cli import main
from kallm.testing.data import TEXTS
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny teacher, its saved retrofit recording the teacher as its base model, and a text file."""
    root = tmp_path_factory.mktemp("heal_cli")
    tokenizer = make_tiny_tokenizer()
    teacher = tiny_model("llama")
    teacher.save_pretrained(root / "teacher")
    student = kallm.retrofit(tiny_model("llama"), last_n=1)
    student.config.kan_config["base_model"] = str(root / "teacher")
    student.save_pretrained(root / "student")
    for folder in ("student", "teacher"):
        tokenizer.save_pretrained(root / folder)
    (root / "book.txt").write_text("\n".join(TEXTS))
    return root


def test_heal_command_heals_and_saves(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["heal", "--model", str(workspace / "student"), "--data", str(workspace / "book.txt"),
                 "--out", str(out), "--max-steps", "4", "--batch-size", "2", "--max-length", "32",
                 "--local-tokens", "256", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "healed 4 end-to-end steps" in printed and "local stage, held-out error per block: 2: " in printed
    assert (out / "heal_curve.png").is_file() and (out / "metrics.jsonl").is_file()
    model, _ = kallm.load_model(str(out))
    before, _ = kallm.load_model(str(workspace / "student"))
    assert not torch.equal(model.model.layers[2].mlp.layers[0].weight, before.model.layers[2].mlp.layers[0].weight)
    assert torch.equal(model.model.layers[2].self_attn.q_proj.weight, before.model.layers[2].self_attn.q_proj.weight)


def test_heal_command_errors(workspace, tmp_path, capsys):
    common = ["heal", "--model", str(workspace / "student"), "--out", str(tmp_path / "x"), "--quiet"]
    with pytest.raises(SystemExit) as refused:  # refused while the command line is read
        main(common + ["--minutes", "0"])
    assert refused.value.code == 2
    assert "argument --minutes: must be a finite number > 0, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common + ["--max-steps", "1", "--max-grad-norm", "-1"])
    assert "argument --max_grad_norm/--max-grad-norm: must be a finite number >= 0, got '-1'" in capsys.readouterr().err
    assert main(common) == 2
    assert "needs a budget" in capsys.readouterr().err
    assert main(common + ["--max-steps", "1", "--teacher", str(workspace / "student")]) == 2
    assert "the teacher is itself retrofitted" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common + ["--max-steps", "1", "--data", str(tmp_path / "none.txt")])
    assert f"argument --data: no such file or folder: {tmp_path / 'none.txt'}" in capsys.readouterr().err
    assert not (tmp_path / "x" / "config.json").exists()


@pytest.mark.integration  # slow: starts torchrun and two workers
def test_two_processes_with_torchrun(workspace, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "kallm.cli", "heal", "--model", str(workspace / "student"), "--data", str(workspace / "book.txt"),
               "--out", str(out), "--max-steps", "3", "--batch-size", "2", "--max-length", "32",
               "--local-tokens", "256", "--save-steps", "2", "--quiet"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((out / "heal_report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 3
    # each step trains on 2 sequences per process: 3 steps x 2 processes x 2 x 32 tokens at most
    assert 3 * 2 * 32 < report["tokens"] <= 3 * 2 * 2 * 32
    assert "healed 3 end-to-end steps in" in completed.stdout and "on 2 process(es)" in completed.stdout
    assert (out / "checkpoint-2" / "trainable.safetensors").is_file()
    model, _ = kallm.load_model(str(out))
    before, _ = kallm.load_model(str(workspace / "student"))
    assert not torch.equal(model.model.layers[2].mlp.layers[-1].weight, before.model.layers[2].mlp.layers[-1].weight)


def test_heal_command_refuses_to_write_over_the_model_it_reads(workspace, capsys):
    before = {p.name: p.read_bytes() for p in (workspace / "student").iterdir()}
    for out in (workspace / "student", workspace / "student" / "healed"):
        code = main(["heal", "--model", str(workspace / "student"), "--data", str(workspace / "book.txt"),
                     "--out", str(out), "--max-steps", "1", "--quiet"])
        assert code == 2
        assert f"kallm heal: error: cannot write to {out}: it " in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (workspace / "student").iterdir()} == before


def test_heal_command_never_saves_non_finite_weights(workspace, tmp_path, capsys):
    diverged, tokenizer = kallm.load_model(str(workspace / "student"))
    with torch.no_grad():
        diverged.model.layers[2].mlp.layers[0].weight[0, 0] = float("nan")
    diverged.save_pretrained(tmp_path / "diverged")  # transformers' own save writes what it is given
    tokenizer.save_pretrained(tmp_path / "diverged")
    out = tmp_path / "out"
    code = main(["heal", "--model", str(tmp_path / "diverged"), "--data", str(workspace / "book.txt"),
                 "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--max-length", "32",
                 "--local-passes", "0", "--quiet"])
    assert code == 2
    error = capsys.readouterr().err
    assert "kallm heal: error: refusing to save to" in error and "NaN or infinite values in model.layers.2.mlp" in error
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
