"""kallm.export_onnx / kallm export onnx: one graph with the KV cache, checked against PyTorch in ONNX Runtime, and
the refusals (raised before anything is written)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import kallm
from kallm.cli import main
from kallm.core import bases
from kallm.core.bases import Basis, register_basis
from kallm.export import onnx as onnx_export
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import make_tiny_tokenizer

for _package in onnx_export.ONNX_PACKAGES:
    pytest.importorskip(_package, reason=f"{_package} is not installed (pip install 'kallm[onnx]'; the dev extra has it)")


#: two rows, so the batch axis is checked dynamic; neither the traced batch (2) and lengths (3 past, 2 new) alone
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    """A tiny Llama, its last two blocks retrofitted with a non-default basis (rbf), exported once for the module."""
    model = kallm.retrofit(tiny_model("llama"), last_n=2, basis="rbf")
    folder = kallm.export_onnx(model, tmp_path_factory.mktemp("onnx") / "llama", make_tiny_tokenizer())
    return model, folder


def test_llama_retrofit_export_matches_pytorch_with_the_cache(llama_export):
    model, folder = llama_export
    result = kallm.check_onnx(model, folder, IDS, new_tokens=6)
    assert result.max_logit_diff < 1e-4
    assert len(result.onnx_tokens) == 2 and all(len(row) == 6 for row in result.onnx_tokens)
    assert result.tokens_match, (result.torch_tokens, result.onnx_tokens)
    assert "identical" in result.summary()
    # batch 1 and a one-token prompt: sizes the trace never saw
    single = kallm.check_onnx(model, folder, IDS[:1, :1], new_tokens=3)
    assert single.tokens_match and single.max_logit_diff < 1e-4


def test_attention_mask_handles_left_padding(llama_export):
    import numpy as np
    import onnxruntime

    model, folder = llama_export
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(input_ids=IDS, attention_mask=mask, position_ids=positions).logits.numpy()
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": IDS.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    for spec in session.get_inputs():
        if spec.name.startswith("past."):
            feeds[spec.name] = np.zeros((2, spec.shape[1], 0, spec.shape[3]), np.float32)
    logits = session.run(["logits"], feeds)[0]
    real = mask.bool().numpy()
    assert np.abs(logits[real] - expected[real]).max() < 1e-4


def test_export_folder_holds_what_a_runtime_needs(llama_export):
    model, folder = llama_export
    names = {path.name for path in folder.iterdir()}
    assert {"model.onnx", "model.onnx.data", "config.json", "kallm_onnx.json", "tokenizer.json"} <= names
    settings = json.loads((folder / "kallm_onnx.json").read_text())
    assert settings["family"] == "llama" and settings["bases"] == ["rbf"]
    inputs = {spec["name"]: spec["shape"] for spec in settings["inputs"]}
    layers = model.config.num_hidden_layers
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["past.0.key"] == ["batch", 2, "past_sequence", 8]
    assert {f"past.{n}.{kind}" for n in range(layers) for kind in ("key", "value")} <= set(inputs)
    outputs = {spec["name"]: spec["shape"] for spec in settings["outputs"]}
    assert outputs["logits"] == ["batch", "sequence", 128]
    assert outputs[f"present.{layers - 1}.value"] == ["batch", 2, "past_sequence + sequence", 8]
    assert not [path for path in folder.parent.iterdir() if path.name.startswith(".")]  # no staging folder left


def test_cli_exports_a_gpt2_retrofit_and_checks_it(tmp_path, capsys):
    checkpoint = tmp_path / "retrofit"
    kallm.retrofit(tiny_model("gpt2"), last_n=2).save_pretrained(checkpoint)
    make_tiny_tokenizer().save_pretrained(checkpoint)
    assert main(["export", "onnx", str(checkpoint), "--out", str(tmp_path / "onnx"), "--new-tokens", "5",
                 "--prompt", "Hi there"]) == 0
    printed = capsys.readouterr().out
    assert "max |logit diff|" in printed and "greedy tokens (5 new) identical" in printed
    assert json.loads((tmp_path / "onnx" / "kallm_onnx.json").read_text())["family"] == "gpt2"


def test_non_empty_folder_is_refused_unless_overwrite(llama_export, tmp_path, capsys):
    model, _ = llama_export
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        kallm.export_onnx(model, tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["keep.txt"]
    checkpoint = tmp_path / "retrofit"
    kallm.retrofit(tiny_model("llama"), last_n=1).save_pretrained(checkpoint)
    make_tiny_tokenizer().save_pretrained(checkpoint)
    assert main(["export", "onnx", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["keep.txt", "retrofit"]


class _NumpyBasis(Basis):
    """A user basis computed through numpy: it runs in PyTorch, but torch.export cannot trace it."""

    def values(self, t, params):
        import numpy

        return [torch.from_numpy(numpy.sin(k * t.numpy())) for k in range(1, self.degree + 1)]


def test_a_basis_that_cannot_be_traced_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(bases, "_REGISTRY", dict(bases._REGISTRY))
    register_basis("numpy_sine", _NumpyBasis)
    model = kallm.retrofit(tiny_model("llama"), blocks=[0], basis="numpy_sine")  # fails at the first block
    with pytest.raises(ValueError, match="could not trace this llama model \\(KAN bases: numpy_sine\\); the user "
                       "bases numpy_sine .* kallm's bases all trace: cheby1, cheby2, "):
        kallm.export_onnx(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["family", "classifier", "quantized", "dtype"])
def test_unsupported_models_are_refused_before_writing(case, tmp_path):
    if case == "family":
        model, match = tiny_model("opt"), "does not support the 'opt' family yet; supported families: gpt2, llama"
    elif case == "classifier":
        import transformers

        config = tiny_model("llama").config
        config.num_labels = 2
        model = transformers.AutoModelForSequenceClassification.from_config(config)
        match = "exports causal LMs"
    elif case == "quantized":
        pytest.importorskip("torchao", reason="torchao is not installed (pip install 'kallm[quant]')")
        model = kallm.quantize(kallm.retrofit(tiny_model("llama"), last_n=1))
        match = "is quantized"
    else:
        model, match = kallm.retrofit(tiny_model("llama"), last_n=1).to(torch.bfloat16), "takes float32 models"
    with pytest.raises(ValueError, match=match):
        kallm.export_onnx(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_packages_are_named_with_the_extra(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxruntime" else real_find_spec(name, *args))
    with pytest.raises(ImportError, match=r"needs onnxruntime \(not installed\).*kallm\[onnx\]"):
        kallm.export_onnx(tiny_model("llama"), tmp_path / "out")
    assert main(["export", "onnx", "no-such-model", "--out", str(tmp_path / "out")]) == 2
    assert "kallm[onnx]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_folder_of_the_model_exported_is_refused_even_with_overwrite(tmp_path, capsys):
    checkpoint = tmp_path / "retrofit"
    kallm.retrofit(tiny_model("llama"), last_n=1).save_pretrained(checkpoint)
    make_tiny_tokenizer().save_pretrained(checkpoint)
    before = {path.name: path.read_bytes() for path in checkpoint.iterdir()}
    for out in (checkpoint, checkpoint / "onnx"):
        assert main(["export", "onnx", str(checkpoint), "--out", str(out), "--overwrite"]) == 2
        assert f"kallm export: error: cannot write to {out}: it " in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in checkpoint.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["retrofit"]


def test_a_model_holding_nan_is_not_exported(tmp_path):
    model = kallm.retrofit(tiny_model("llama"), last_n=1)
    with torch.no_grad():
        model.model.layers[2].mlp.layers[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="the model holds NaN or infinite values in model.layers.2.mlp.layers.0"):
        kallm.export_onnx(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
