"""``kallm.checkpoints.save``: a checkpoint is replaced as a whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest
import torch
import transformers.modeling_utils

import kallm
from kallm.checkpoints.save import check_output_folder, replacing_checkpoint, resume_checkpoint, save_checkpoint
from kallm.testing.compare import logits_of
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import make_tiny_tokenizer

IDS = torch.tensor([[1, 5, 9, 17, 33]])


def failing_weights_writer(monkeypatch):
    """Make the next save fail after config.json is written, while writing the weights."""
    def fail(state_dict, filename, metadata=None):
        assert os.path.isfile(os.path.join(os.path.dirname(filename), "config.json"))
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fail)


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    old = kallm.retrofit(tiny_model("llama", seed=0), last_n=1)
    save_checkpoint(old, make_tiny_tokenizer(), folder)
    old_files = {path.name: path.read_bytes() for path in folder.iterdir()}

    new = kallm.retrofit(tiny_model("llama", seed=1), last_n=2)  # another config.json, other weights
    failing_weights_writer(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(new, make_tiny_tokenizer(), folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == old_files
    assert os.listdir(tmp_path) == ["model"]  # no temporary folder left behind
    monkeypatch.undo()
    reloaded, _ = kallm.load_model(str(folder))
    assert torch.equal(logits_of(reloaded.eval(), IDS), logits_of(old.eval(), IDS))


def test_a_new_folder_is_created_with_ordinary_permissions(tmp_path):
    folder = tmp_path / "nested" / "model"
    save_checkpoint(tiny_model("llama"), make_tiny_tokenizer(), folder)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert sorted(os.listdir(folder.parent)) == ["model"]
    assert torch.equal(logits_of(kallm.load_model(str(folder))[0].eval(), IDS),
                       logits_of(tiny_model("llama").eval(), IDS))


def test_the_model_files_are_replaced_as_a_set_and_other_entries_stay(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoint-10").mkdir(parents=True)
    (folder / "checkpoint-10" / "config.json").write_text("{}")
    (folder / "metrics.jsonl").write_text('{"step": 10}\n')
    for stale in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                  "model.safetensors.index.json"):
        (folder / stale).write_text("old shard")
    new = tiny_model("llama", seed=3)
    save_checkpoint(new, make_tiny_tokenizer(), folder)
    names = set(os.listdir(folder))
    assert {"checkpoint-10", "metrics.jsonl", "model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not any(name.startswith("model-0000") or name.endswith(".index.json") for name in names)
    assert (folder / "checkpoint-10" / "config.json").read_text() == "{}"
    assert torch.equal(logits_of(kallm.load_model(str(folder))[0].eval(), IDS), logits_of(new.eval(), IDS))
    assert os.listdir(tmp_path) == ["run"]


def test_a_failed_move_puts_every_file_back(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    old = tiny_model("llama", seed=0)
    save_checkpoint(old, make_tiny_tokenizer(), folder)
    old_files = {path.name: path.read_bytes() for path in folder.iterdir()}
    real_replace, calls = os.replace, []

    def replace_failing_midway(source, target):
        calls.append(source)
        if len(calls) == len(old_files) + 2:  # every old file moved aside, two new ones moved in
            raise OSError("disk removed")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_failing_midway)
    with pytest.raises(OSError, match="disk removed"):
        save_checkpoint(tiny_model("llama", seed=1), make_tiny_tokenizer(), folder)
    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == old_files
    assert os.listdir(tmp_path) == ["model"]


def test_refuses_a_file_and_cleans_up_after_an_error_inside_the_block(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        save_checkpoint(tiny_model("llama"), None, tmp_path / "file")
    with pytest.raises(RuntimeError, match="stop"):
        with replacing_checkpoint(tmp_path / "never") as staging:
            (staging / "config.json").write_text("{}")
            raise RuntimeError("stop")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_model_with_non_finite_weights_is_refused_and_the_previous_checkpoint_stays(tmp_path):
    folder = tmp_path / "model"
    save_checkpoint(tiny_model("llama"), make_tiny_tokenizer(), folder)
    old_files = {path.name: path.read_bytes() for path in folder.iterdir()}
    diverged = tiny_model("llama", seed=1)
    with torch.no_grad():
        diverged.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
        diverged.model.norm.weight[3] = float("inf")
    with pytest.raises(ValueError, match=r"refusing to save to .*model: the model holds NaN or infinite values in "
                                         r"model\.layers\.1\.mlp\.up_proj\.weight, model\.norm\.weight "):
        save_checkpoint(diverged, make_tiny_tokenizer(), folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == old_files
    assert os.listdir(tmp_path) == ["model"]


def test_an_output_folder_overlapping_a_model_read_is_refused(tmp_path):
    source = tmp_path / "models" / "base"
    save_checkpoint(tiny_model("llama"), make_tiny_tokenizer(), source)
    loaded, _ = kallm.load_model(str(source))
    for output, overlap in ((source, "is the folder this reads a model from"),
                            (source / "out", "lies inside .*base, which this reads a model from"),
                            (tmp_path / "models", "holds .*base, which this reads a model from")):
        for read in (str(source), source, loaded):  # by name, by path, or as a model loaded from there
            with pytest.raises(ValueError, match=f"cannot write to .*: it {overlap}, and saving there would"):
                check_output_folder(output, (read,))
    check_output_folder(tmp_path / "models" / "base-2", (loaded, "user/hub-model", None, tiny_model("llama")))


def test_resume_takes_the_latest_complete_checkpoint_and_says_which(tmp_path, capsys):
    for step, state in ((2, '{"step": 2}'), (9, '{"step": 9}'), (10, '{"step": 1'), (11, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:  # checkpoint-10 was cut off while writing its state, checkpoint-11 before
            (tmp_path / f"checkpoint-{step}" / "state.json").write_text(state)
    assert resume_checkpoint(True, tmp_path, "checkpoint-", "state.json") == tmp_path / "checkpoint-9"
    assert capsys.readouterr().out == (f"resuming from {tmp_path / 'checkpoint-9'} (passed over the incomplete "
                                       f"checkpoint-10, checkpoint-11)\n")
    assert resume_checkpoint(tmp_path / "checkpoint-2", None, "checkpoint-", "state.json") == tmp_path / "checkpoint-2"
    assert resume_checkpoint(None, tmp_path, "checkpoint-", "state.json") is None
    with pytest.raises(FileNotFoundError, match="checkpoint-10 is no complete checkpoint to resume from: its "
                                                "state.json is missing or cut off"):
        resume_checkpoint(tmp_path / "checkpoint-10", None, "checkpoint-", "state.json")
    for step in (2, 9):
        (tmp_path / f"checkpoint-{step}" / "state.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint-N folder to resume from \(only incomplete"):
        resume_checkpoint(True, tmp_path, "checkpoint-", "state.json")
