"""Uploading to the Hub (a recording stand-in for huggingface_hub.HfApi): weights, code, card and tokenizer in
one commit, through kallm.push_to_hub and transformers' own push; bad repo ids refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import kallm
import kallm.checkpoints.load
from kallm.testing.checkpoints import reference_ids, word_tokenizer
from kallm.testing.compare import logits_of
from kallm.testing.models import tiny_model
from kallm.testing.processes import CODE_FILES


def check_uploaded_folder(folder: Path, model, repo_id, with_tokenizer):
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "README.md", *CODE_FILES} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    assert {"tokenizer.json", "tokenizer_config.json"} <= files if with_tokenizer else "tokenizer.json" not in files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_kallm.{type(model).__name__}"
    card = (folder / "README.md").read_text()
    assert "| retrofitted blocks |" in card
    assert f'from_pretrained("{repo_id}", trust_remote_code=True)' in card
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = reference_ids()
    assert (logits_of(loaded, ids) - logits_of(model, ids)).abs().max().item() == 0.0


class RecordingHub:
    """Stands in for the Hub behind ``huggingface_hub.HfApi`` (the client transformers' own push uses):
    records the calls and copies every committed file under ``store``."""

    def __init__(self, store: Path, monkeypatch):
        import huggingface_hub

        self.store, self.calls = store, []
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", self.create_commit)

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok}))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        self.calls.append(("create_commit", repo_id, {"commit_message": commit_message}))
        for operation in operations:
            target = self.store / repo_id.replace("/", "--") / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(operation.path_or_fileobj, target)
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


def test_kallm_push_to_hub_uploads_weights_code_card_and_tokenizer_in_one_commit(saved, tmp_path, monkeypatch):
    _, model, _ = saved["llama"]
    hub = RecordingHub(tmp_path, monkeypatch)
    url = kallm.push_to_hub(model, "someone/tiny-kan", tokenizer=word_tokenizer(), private=True)
    assert url == "https://huggingface.co/someone/tiny-kan/commit/0"
    assert [call[:2] for call in hub.calls] == [("create_repo", "someone/tiny-kan"), ("create_commit", "someone/tiny-kan")]
    assert hub.calls[0][2] == {"private": True, "exist_ok": True}
    assert hub.calls[1][2] == {"commit_message": "Upload kallm retrofitted model"}
    check_uploaded_folder(tmp_path / "someone--tiny-kan", model, "someone/tiny-kan", with_tokenizer=True)
    assert AutoTokenizer.from_pretrained(tmp_path / "someone--tiny-kan")("w1")["input_ids"] == [4]


def test_kallm_push_to_hub_refuses_a_model_without_kan_feedforwards(tmp_path, monkeypatch):
    hub = RecordingHub(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="publishes retrofitted models.*use model.push_to_hub"):
        kallm.push_to_hub(tiny_model("llama"), "someone/plain")
    assert hub.calls == []


def test_standard_model_push_to_hub_includes_code_and_kallm_card(saved, tmp_path, monkeypatch):
    _, model, _ = saved["opt"]
    hub = RecordingHub(tmp_path, monkeypatch)
    commit = model.push_to_hub("someone/tiny-opt-kan", commit_message="first", private=True)
    assert commit.commit_url == "https://huggingface.co/someone/tiny-opt-kan/commit/0"
    assert [call[:2] for call in hub.calls] == [("create_repo", "someone/tiny-opt-kan"),
                                                ("create_commit", "someone/tiny-opt-kan")]
    assert hub.calls[0][2] == {"private": True, "exist_ok": True}
    assert hub.calls[1][2] == {"commit_message": "first"}
    check_uploaded_folder(tmp_path / "someone--tiny-opt-kan", model, "someone/tiny-opt-kan", with_tokenizer=False)


def test_save_pretrained_with_push_to_hub_uploads_kallms_card_and_only_what_it_wrote(saved, tmp_path, monkeypatch):
    _, model, _ = saved["gpt2"]
    hub = RecordingHub(tmp_path / "hub", monkeypatch)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("private notes, not part of this save")
    model.save_pretrained(folder, push_to_hub=True, repo_id="someone/tiny-gpt2-kan", commit_message="save+push")
    assert [call[:2] for call in hub.calls] == [("create_repo", "someone/tiny-gpt2-kan"),
                                                ("create_commit", "someone/tiny-gpt2-kan")]
    assert hub.calls[1][2] == {"commit_message": "save+push"}
    uploaded = tmp_path / "hub" / "someone--tiny-gpt2-kan"
    assert not (uploaded / "notes.txt").exists()
    check_uploaded_folder(uploaded, model, "someone/tiny-gpt2-kan", with_tokenizer=False)
    assert "automatically generated" not in (uploaded / "README.md").read_text()  # not transformers' generic card
    assert (folder / "README.md").read_text() == (uploaded / "README.md").read_text()


@pytest.mark.parametrize("repo_id", ["", "a/b/c", "/name", "name with space", 7])
def test_push_to_hub_refuses_bad_repo_ids(saved, tmp_path, repo_id, monkeypatch):
    hub = RecordingHub(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="repo_id must look like 'user/name' or 'name'"):
        kallm.push_to_hub(saved["llama"][1], repo_id)
    assert hub.calls == []
