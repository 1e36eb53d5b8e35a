"""kallm.quantize: torchao weight-only int8 on KAN layers, save/load round trips and refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import kallm
from kallm.core.kan_function import _is_quantized
from kallm.core.layers import KANLinear
from kallm.testing.compare import logits_of
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import make_tiny_tokenizer

pytest.importorskip("torchao", reason="torchao is not installed (pip install 'kallm[quant]'; the dev extra has it)")


IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _retrofitted(basis="cheby2", **options):
    return kallm.retrofit(tiny_model("llama"), last_n=2, basis=basis, **options)


def _kan_layers(model):
    return [m for m in model.modules() if isinstance(m, KANLinear)]


@pytest.mark.parametrize("basis", ["cheby2", "bspline", "rational", "cheby2+rbf"])
def test_int8_quantizes_every_kan_layer_and_stays_close(basis):
    model = _retrofitted(basis)
    original = {id(layer): copy.deepcopy(layer) for layer in _kan_layers(model)}
    before = logits_of(model, IDS)
    assert kallm.quantize(model) is model
    layers = _kan_layers(model)
    assert len(layers) == 4 and all(_is_quantized(layer.weight) for layer in layers)
    assert all(not _is_quantized(layer.input_scale) for layer in layers)
    assert all(type(m.weight) is torch.nn.Parameter for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert not torch.equal(logits_of(model, IDS), before)
    x = torch.randn(16, layers[0].in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for layer in layers[:2]:
            y, y_float = layer(x), original[id(layer)](x)
            assert (y - y_float).norm() < 0.01 * y_float.norm()  # int8 in groups of 32: about 0.2% here
            # the layer computes exactly what its dequantized weights give
            dense = copy.deepcopy(original[id(layer)])
            dense.weight.copy_(layer.weight.dequantize())
            torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-5)
            x = y


def test_linear_and_all_modules_quantize_the_decoder_linears_but_not_the_head():
    original = tiny_model("llama")
    kallm.quantize(original, modules="linear")
    quantized = [name for name, p in original.named_parameters() if _is_quantized(p)]
    assert quantized and all(name.startswith("model.layers.") for name in quantized)
    model = kallm.quantize(_retrofitted(), modules="all")
    names = [name for name, p in model.named_parameters() if _is_quantized(p)]
    assert any(".mlp.layers." in n for n in names) and any(".self_attn." in n for n in names)
    assert not _is_quantized(model.lm_head.weight)


def test_save_and_load_round_trip(tmp_path):
    model = kallm.quantize(_retrofitted("rational", intermediate_size=256))  # weights large next to metadata
    expected = logits_of(model, IDS)
    kallm.save_quantized(model, tmp_path / "q")
    settings = json.loads((tmp_path / "q" / "kallm_quantization.json").read_text())
    assert settings["weights"] == "int8" and settings["modules"] == ["kan"]
    assert len(settings["quantized_tensors"]) == 4
    loaded = kallm.load_quantized(tmp_path / "q")
    assert all(_is_quantized(layer.weight) for layer in _kan_layers(loaded))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits_of(loaded, IDS), expected)
    kallm.save_quantized(loaded, tmp_path / "again")  # a loaded model saves again
    plain = _retrofitted("rational", intermediate_size=256)
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    kan_weight_bytes = sum(layer.weight.numel() * 4 for layer in _kan_layers(plain))
    saved = (tmp_path / "q" / "kallm_quantized.pt").stat().st_size
    assert saved < (tmp_path / "plain.pt").stat().st_size - 0.5 * kan_weight_bytes
    assert all(layer.weight.qdata.dtype == torch.int8 for layer in _kan_layers(loaded))


def test_generation_runs_on_the_quantized_model():
    model = kallm.quantize(_retrofitted())
    with torch.no_grad():
        out = model.generate(IDS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 14)


def test_a_model_without_kan_layers_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no KAN layers to quantize.*modules='linear'"):
        kallm.quantize(model)
    assert not any(_is_quantized(p) for p in model.parameters())


def test_scales_are_per_group_of_at_most_group_size_weights_of_a_row():
    model = kallm.quantize(_retrofitted(), group_size=16)  # the tiny layers' rows: 2 * 64 and 2 * 48 weights
    for layer in _kan_layers(model):
        row = layer.weight.shape[1]
        group = 16 if row % 16 == 0 else max(d for d in range(1, 17) if row % d == 0)
        assert list(layer.weight.block_size) == [1, group]
        assert tuple(layer.weight.scale.shape) == (layer.out_features, row // group)
    per_row = kallm.quantize(_retrofitted(), group_size=None)
    assert all(layer.weight.scale.numel() == layer.out_features for layer in _kan_layers(per_row))
    assert model._kallm_quantization["group_size"] == 16 and per_row._kallm_quantization["group_size"] is None


def test_groups_keep_a_large_column_from_swamping_its_rows():
    """A fitted KAN layer has a few columns (one hidden unit's features) many times larger than the rest in every
    row; one scale per row then leaves the other weights a few int8 levels, groups confine the damage."""
    def error_of_the_other_weights(group_size):
        model = _retrofitted()
        layer = _kan_layers(model)[1]
        with torch.no_grad():
            layer.weight[:, 5] *= 200.0
        weight = layer.weight.detach().clone()
        kallm.quantize(model, group_size=group_size)
        others = slice(32, None)  # the columns outside the large column's group
        return ((layer.weight.dequantize() - weight)[:, others].norm() / weight[:, others].norm()).item()

    assert error_of_the_other_weights(32) < 0.05 * error_of_the_other_weights(None)


@pytest.mark.parametrize("arguments,message", [
    ({"weights": "int3"}, "unknown weights 'int3'; valid choices: int8"),
    ({"modules": "heads"}, "unknown modules 'heads'; valid choices: kan, linear, all"),
    ({"group_size": 0}, "group_size must be a positive integer or None"),
    ({"group_size": 8.5}, "group_size must be a positive integer or None"),
])
def test_bad_arguments_are_refused_before_anything_changes(arguments, message):
    model = _retrofitted()
    with pytest.raises(ValueError, match=message):
        kallm.quantize(model, **arguments)
    assert not any(_is_quantized(p) for p in model.parameters())


def test_quantizing_twice_is_refused():
    model = kallm.quantize(_retrofitted())
    with pytest.raises(ValueError, match="already quantized"):
        kallm.quantize(model, modules="all")


def test_training_a_quantized_layer_is_refused_with_a_clear_error():
    model = kallm.quantize(_retrofitted())
    embeddings = model.get_input_embeddings()(IDS).detach().requires_grad_()
    with pytest.raises(RuntimeError, match="quantized .* inference only"):
        model(inputs_embeds=embeddings)


def test_saving_an_unquantized_model_and_loading_a_plain_folder_are_refused(tmp_path):
    model = _retrofitted()
    with pytest.raises(ValueError, match="not quantized by kallm.quantize"):
        kallm.save_quantized(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="lacks kallm_quantized.pt, kallm_quantization.json"):
        kallm.load_quantized(tmp_path / "plain")


def test_save_pretrained_of_a_quantized_model_is_refused_before_writing(tmp_path):
    for model in (kallm.quantize(_retrofitted()), kallm.quantize(tiny_model("llama"), modules="linear")):
        with pytest.raises(ValueError, match=r"quantized by kallm.quantize, and save_pretrained cannot write its int8 "
                                             r"weights; save it with kallm.save_quantized\(model, folder\)"):
            model.save_pretrained(tmp_path / "out")
        assert not (tmp_path / "out").exists()
        kallm.save_quantized(model, tmp_path / "q")
        with pytest.raises(ValueError, match="save it with kallm.save_quantized"):
            kallm.load_quantized(tmp_path / "q").save_pretrained(tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_saving_over_the_folder_the_model_was_loaded_from_is_refused(tmp_path):
    from kallm.checkpoints.save import save_checkpoint

    save_checkpoint(_retrofitted(), make_tiny_tokenizer(), tmp_path / "model")
    before = {path.name: path.read_bytes() for path in (tmp_path / "model").iterdir()}
    model = kallm.quantize(kallm.load_model(str(tmp_path / "model"))[0])
    with pytest.raises(ValueError, match="cannot write to .*model: it is the folder this reads a model from"):
        kallm.save_quantized(model, tmp_path / "model")
    assert {path.name: path.read_bytes() for path in (tmp_path / "model").iterdir()} == before


def test_a_damaged_quantized_checkpoint_is_refused_at_load(tmp_path):
    kallm.save_quantized(kallm.quantize(_retrofitted()), tmp_path / "q")
    weights = tmp_path / "q" / "kallm_quantized.pt"
    saved = torch.load(weights, weights_only=True)
    name = "model.layers.2.mlp.layers.0.weight"
    for damage, problem in (
        (lambda state: state.update({name: state[name].dequantize()}),
         f"{name} should hold int8 quantized weights .* but holds a Tensor of torch.float32"),
        (lambda state: state[name].scale.view(-1)[0].fill_(float("nan")), f"{name} hold NaN or infinite values"),
    ):
        state = {key: copy.deepcopy(value) for key, value in saved.items()}
        damage(state)
        torch.save(state, weights)
        with pytest.raises(ValueError, match=f"kallm_quantized.pt is damaged: {problem}"):
            kallm.load_quantized(tmp_path / "q")
