"""``kallm.retrofit(..., form="glu")``: MLPs keep their projections and gain learnable functions that start at zero,
so a retrofitted model starts exactly at the original."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import kallm
from kallm.core.function_layers import ChannelFunctions, check_zero_start, is_channel_functions
from kallm.surgery.architectures import EXACT_ACTIVATIONS
from kallm.testing.compare import assert_unchanged, logits_of, snapshot
from kallm.testing.data import conversation
from kallm.testing.models import TINY_CONFIGS, tiny_model
from kallm.testing.processes import run_fresh_processes
from kallm.testing.tokenizers import chat_tokenizer, make_tiny_tokenizer

FAMILIES = sorted(TINY_CONFIGS)
IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
CHANNELS = 64  # the intermediate size of the tiny Llama, Qwen2 and Phi-3


def glu(model, **options):
    return kallm.retrofit(model, **{"last_n": 2, "basis": "cheby2", "degree": 2, "form": "glu", **options})


def perturb_functions(model, seed=1):
    """Give every function non-zero coefficients, biases and input scales, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if is_channel_functions(module):
                for parameter in module.parameters():
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))


def function_parameter_names(model):
    return sorted(name for name, module in model.named_modules() if is_channel_functions(module)
                  for name in [f"{name}.{p}" for p, _ in module.named_parameters()])


# ------------------------------------------------------------------------------------ exact start


@pytest.mark.parametrize("family", FAMILIES)
def test_the_retrofit_starts_exactly_at_the_original_in_float32(family):
    model = tiny_model(family)
    before = logits_of(model, IDS)
    glu(model)
    after = logits_of(model, IDS)
    assert (after - before).abs().max().item() <= 1e-4
    assert torch.equal(after, before)  # the zero functions add exactly 0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_retrofit_starts_exactly_at_the_original_in_bfloat16(family):
    model = tiny_model(family).to(torch.bfloat16)
    before = logits_of(model, IDS)
    glu(model, function_groups=8)
    assert next(m for m in model.modules() if is_channel_functions(m)).coefficients.dtype == torch.bfloat16
    assert torch.equal(logits_of(model, IDS), before)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "opt"])
def test_the_projections_keep_their_parameter_names_and_tensors(family):
    model = tiny_model(family)
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    glu(model)
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in original.items())
    new = sorted(set(state) - set(original))
    assert new == function_parameter_names(model)
    gated = family in ("llama", "phi3")
    assert len(new) == 2 * 3 * (2 if gated else 1)  # 2 blocks x (coefficients, bias, scale) x functions per block


def test_the_default_form_is_todays_kan_feedforward_and_a_config_object_takes_the_new_one():
    model = kallm.retrofit(tiny_model("llama"), last_n=1, basis="cheby2", degree=2)
    assert model.config.kan_config["form"] == "kan"
    assert type(model.model.layers[2].mlp).__name__ == "KANFeedForward"
    model = tiny_model("llama")
    expected = logits_of(model, IDS)
    kallm.retrofit(model, kallm.RetrofitConfig(last_n=1, form="glu", function_groups=4))
    assert model.config.kan_config["form"] == "glu" and torch.equal(logits_of(model, IDS), expected)


def test_kan_config_records_the_form_and_the_mlp_layout():
    kan = glu(tiny_model("phi3"), function_groups=16).config.kan_config
    assert kan["form"] == "glu" and kan["function_groups"] == 16 and kan["intermediate_size"] == CHANNELS
    assert kan["mlp_layout"] == {"gate_up": "gate_up_proj", "down": "down_proj", "activation": "activation_fn"}
    opt = glu(tiny_model("opt")).config.kan_config  # OPT's MLP is spread over its block: only the activation changes
    assert (opt["mlp_attribute"], opt["bypassed_attributes"], opt["mlp_layout"]) == ("activation_fn", [], {})


# ------------------------------------------------------------------------------------ parameters


@pytest.mark.parametrize("groups, functions_per_block", [(None, 64), (8, 8), (1, 1)])
def test_parameter_counts_per_channel_and_per_group(groups, functions_per_block):
    model = glu(tiny_model("llama"), function_groups=groups)
    report = kallm.summary(model, print_table=False)
    # gated: two functions (gate and up) per channel or group, each K = 2 coefficients, a bias and an input scale
    assert report["functions"] == 2 * 2 * functions_per_block * (2 + 2)
    assert ChannelFunctions.count_parameters(CHANNELS, "cheby2", 2, groups) == functions_per_block * 4
    projections = 3 * 32 * CHANNELS
    assert report["function_overhead"] == pytest.approx(report["functions"] / (2 * projections))
    assert [row["feedforward"] for row in report["blocks"]] == ["original", "glu", "glu"]
    assert "in learnable functions" in kallm.surgery.trainable.format_summary(report)


def test_groups_that_do_not_divide_the_channels_are_refused_before_the_model_changes():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="function_groups=7 must divide the MLP's 64 channels"):
        glu(model, function_groups=7)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------ bases


@pytest.mark.parametrize("basis", [*kallm.list_bases(), "cheby2+rbf", "legendre+rational"])
def test_every_basis_gives_exactly_zero_functions_at_zero_coefficients(basis):
    functions = ChannelFunctions(CHANNELS, basis, 3, groups=16)
    z = torch.cat([torch.linspace(-80, 80, 64), torch.tensor([0.0, 1e-30, -1e30, 1e30])]).repeat(3, 1)[:, :CHANNELS]
    assert torch.equal(functions(z), torch.zeros_like(z))
    for dtype in (torch.float32, torch.bfloat16):
        check_zero_start(basis, 3, dtype)


def test_chained_bases_and_overflowing_ones_are_refused():
    with pytest.raises(ValueError, match="chains stages with '>', which only form='kan' has"):
        glu(tiny_model("llama"), basis="cheby2>rbf")
    model = tiny_model("llama").half()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"basis 'hermite' at degree 20 overflows in torch.float16 .* not start at "
                                         r"exactly zero"):
        kallm.retrofit(model, last_n=1, basis="hermite", degree=20, form="glu")
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------ bad input


def test_an_unknown_form_is_refused_naming_the_forms():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="unknown form 'swiglu'; valid choices: kan, glu, gated"):
        kallm.retrofit(model, last_n=1, form="swiglu")
    assert_unchanged(model, before)


def test_an_activation_kallm_cannot_express_exactly_is_refused_naming_the_supported_ones():
    model = tiny_model("llama")
    model.config.hidden_act = "prelu"  # learnable: adding to its output would not be what the checkpoint does
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        glu(model)
    message = str(info.value)
    assert "hidden_act is 'prelu'" in message and ", ".join(EXACT_ACTIVATIONS) in message
    assert "supported families: " + ", ".join(kallm.supported_model_types()) in message
    assert_unchanged(model, before)


def test_a_family_outside_the_architecture_table_is_refused_naming_the_supported_ones():
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match="kallm has no architecture description for model_type 'bloom'; supported: " +
                                         ", ".join(kallm.supported_model_types())):
        glu(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("options, message", [
    ({"intermediate_size": 32}, "takes no intermediate_size"),
    ({"bias": False}, r"settings \['bias'\] do not apply"),
    ({"kind": "linear"}, "form='glu' is a retrofit of kind='kan'"),
    ({"init": "fit", "tokenizer": make_tiny_tokenizer()}, "nothing to fit"),
])
def test_kan_only_settings_are_refused_with_form_glu(options, message):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        glu(model, **options)
    assert_unchanged(model, before)


def test_forms_do_not_mix_in_one_model():
    model = kallm.retrofit(tiny_model("llama"), blocks=[2], form="glu")
    with pytest.raises(ValueError, match="form: 'glu' -> 'kan'"):
        kallm.retrofit(model, blocks=[1])
    kallm.retrofit(model, blocks=[1], form="glu")  # more blocks of the same form are fine
    assert model.config.kan_config["blocks"] == [1, 2]


# ------------------------------------------------------------------------------------ training


def test_the_functions_policy_trains_only_the_functions():
    model = glu(tiny_model("qwen2"), function_groups=16)
    count = kallm.set_trainable(model, "functions")
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == function_parameter_names(model)
    assert count == kallm.summary(model, print_table=False)["functions"]
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    coefficients = [p.grad for n, p in model.named_parameters() if n.endswith("coefficients")]
    assert all(grad is not None and grad.abs().sum() > 0 for grad in coefficients)


def test_the_functions_policy_refuses_a_kan_form_model():
    model = kallm.retrofit(tiny_model("llama"), last_n=1)
    with pytest.raises(ValueError, match="this model was retrofitted with form='kan', which has none: train its "
                                         "blocks with 'retrofitted'"):
        kallm.set_trainable(model, "functions")


def test_heal_moves_only_the_functions(tmp_path):
    teacher = tiny_model("llama")
    student = glu(copy.deepcopy(teacher))
    before = {name: p.clone() for name, p in student.named_parameters()}
    kallm.heal(student, teacher, make_tiny_tokenizer(), data=["the quick brown fox jumps. " * 20], max_steps=2,
               trainable="functions", max_length=32, batch_size=2, progress_bar=False, learning_rate=1e-2,
               local_tokens=256, output_dir=str(tmp_path / "heal"))
    moved = sorted(name for name, p in student.named_parameters() if not torch.equal(p, before[name]))
    assert moved and set(moved) <= set(function_parameter_names(student))


# ------------------------------------------------------------------------------------ saving and loading


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "opt"])
def test_save_and_load_round_trip_is_bit_identical(family, tmp_path):
    model = glu(tiny_model(family), function_groups=16)
    perturb_functions(model)
    expected = logits_of(model, IDS)
    model.save_pretrained(tmp_path / family)
    card = (tmp_path / family / "README.md").read_text()
    assert "given learnable univariate functions" in card and "KAN feedforward sizes" not in card
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / family)
    assert type(loaded) is type(model)
    assert torch.equal(logits_of(loaded, IDS), expected)


def test_a_fresh_process_without_kallm_loads_the_glu_form_with_trust_remote_code(tmp_path):
    models = {}
    for family in ("llama", "opt"):
        model = glu(tiny_model(family))
        perturb_functions(model)
        folder = tmp_path / f"saved-{family}"
        model.save_pretrained(folder)
        state = model.state_dict()
        torch.save({"ids": IDS, "logits": logits_of(model, IDS),
                    "kan_state": {name: state[name] for name in function_parameter_names(model)}},
                   tmp_path / f"{family}.pt")
        models[family] = [str(folder), str(tmp_path / f"{family}.pt")]
    results = run_fresh_processes({"without_kallm": {"block_kallm": True, "models": models}}, tmp_path / "fresh")
    result = results["without_kallm"]
    assert result["kallm_importable"] is False
    for family, loaded in result["models"].items():
        assert loaded["module"].startswith("transformers_modules.") and loaded["max_abs_diff"] == 0.0, family
        assert loaded["kan_tensors_equal"], family


def test_an_older_kan_config_of_schema_version_2_is_read_as_form_kan():
    kan = kallm.retrofit(tiny_model("llama"), last_n=1).config.kan_config
    version_2 = {key: value for key, value in kan.items() if key not in ("form", "function_groups", "mlp_layout", "base")}
    version_2["schema_version"] = 2
    assert kallm.RetrofitConfig.from_dict(version_2).to_dict() == kan


# ------------------------------------------------------------------------------------ what takes a retrofit


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "opt"])
def test_lora_on_the_mlp_projections_starts_at_the_model_and_trains_beside_the_functions(family):
    from peft import LoraConfig, get_peft_model

    model = glu(tiny_model(family))
    perturb_functions(model)
    expected = logits_of(model, IDS)
    targets = kallm.lora_targets(model, "mlp")
    assert len(targets) == 3 * (3 if family == "llama" else 2)  # three blocks; Phi-3 fuses gate and up
    peft_model = get_peft_model(model, LoraConfig(target_modules=targets, r=2))
    assert torch.equal(logits_of(peft_model, IDS), expected)  # LoRA's B starts at zero too
    count = kallm.set_trainable(peft_model, "functions")
    report = kallm.summary(peft_model, print_table=False)
    assert count == report["functions"] + report["adapters"]


def test_lora_mlp_targets_skip_blocks_whose_mlp_a_kan_feedforward_replaced():
    model = kallm.retrofit(tiny_model("llama"), last_n=1)
    assert kallm.lora_targets(model, "mlp") == [f"model.layers.{i}.mlp.{name}" for i in (0, 1)
                                                for name in ("gate_proj", "up_proj", "down_proj")]


def test_convert_changes_the_functions_basis_exactly_and_records_it():
    model = glu(tiny_model("llama"), function_groups=16)
    perturb_functions(model)
    expected = logits_of(model, IDS)
    kallm.convert(model, "legendre", 3)
    assert model.kallm_conversion_report.exact
    assert (logits_of(model, IDS) - expected).abs().max().item() < 1e-5
    assert (model.config.kan_config["basis"], model.config.kan_config["degree"]) == ("legendre", 3)
    functions = [m for m in model.modules() if is_channel_functions(m)]
    assert all(m.basis.describe() == {"basis": "legendre", "degree": 3} and m.groups == 16 for m in functions)


def test_a_lossy_conversion_of_the_functions_is_refused_unless_allowed():
    model = glu(tiny_model("llama"))
    perturb_functions(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="this conversion is lossy"):
        kallm.convert(model, "cheby2", 1)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())


def test_a_delta_holds_only_the_functions_and_rebuilds_the_model(tmp_path):
    base = tiny_model("llama")
    model = glu(copy.deepcopy(base))
    perturb_functions(model)
    manifest = kallm.save_delta(model, tmp_path / "delta", base)
    assert manifest["changed_tensors"] == function_parameter_names(model)
    assert len(manifest["changed_tensors"]) == 2 * 2 * 3  # blocks x functions x (coefficients, bias, input scale)
    loaded, _ = kallm.load_delta(tmp_path / "delta", base=base)
    assert torch.equal(logits_of(loaded, IDS), logits_of(model, IDS))


def test_quantize_takes_the_projections_and_refuses_kan_layers_the_form_has_not():
    model = glu(tiny_model("llama"))
    with pytest.raises(ValueError, match="retrofitted with form='glu', which keeps the MLPs' nn.Linear projections "
                                         "and has no KAN layers: pass modules='linear'"):
        kallm.quantize(model)
    expected = logits_of(model, IDS)
    kallm.quantize(model, modules="linear")
    assert type(model.model.layers[2].mlp.gate_proj.weight).__name__ != "Parameter"
    assert next(m for m in model.modules() if is_channel_functions(m)).coefficients.dtype == torch.float32
    assert (logits_of(model, IDS) - expected).abs().max().item() < 0.05


def test_onnx_export_of_the_glu_form_matches_pytorch(tmp_path):
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package, reason=f"{package} is not installed (pip install 'kallm[onnx]')")
    from kallm.export.onnx import check_onnx

    model = glu(tiny_model("llama"))
    perturb_functions(model)
    folder = kallm.export_onnx(model, tmp_path / "onnx")
    check = check_onnx(model, folder, IDS[:1], new_tokens=2)
    assert check.tokens_match and check.max_logit_diff < 1e-4


def test_heal_refuses_the_progressive_blend_which_the_form_does_not_need():
    teacher = tiny_model("llama")
    student = glu(copy.deepcopy(teacher))
    with pytest.raises(ValueError, match="form='glu' starts exactly at the original already"):
        kallm.heal(student, teacher, make_tiny_tokenizer(), data=["some text. " * 20], max_steps=1,
                   progressive=True, progress_bar=False)


def test_the_cli_retrofits_with_form_glu_and_plot_refuses_it(tmp_path, capsys):
    from kallm.cli import main

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    make_tiny_tokenizer().save_pretrained(base)
    out = tmp_path / "glu"
    assert main(["retrofit", "--model", str(base), "--out", str(out), "--last-n", "2", "--form", "glu",
                 "--function-groups", "8", "--trainable", "functions"]) == 0
    printed = capsys.readouterr().out
    assert "in learnable functions" in printed
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert (loaded.config.kan_config["form"], loaded.config.kan_config["function_groups"]) == ("glu", 8)
    assert torch.equal(logits_of(loaded, IDS), logits_of(tiny_model("llama"), IDS))
    assert main(["plot", str(out), "--block", "2"]) == 2
    assert "form='glu', whose blocks keep their MLPs" in capsys.readouterr().err


def test_kallm_train_with_the_functions_policy_moves_only_the_functions_and_saves_them(tmp_path):
    from kallm.train import TrainConfig, train

    model = glu(tiny_model("llama"))
    before = {name: p.clone() for name, p in model.named_parameters()}
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, learning_rate=1e-2, warmup=0,
                         logging_steps=1, save_steps=100, progress_bar=False, seed=0, trainable="functions")
    result = train(model, chat_tokenizer(), [conversation(f"{a}+1=", str(a + 1)) for a in range(8)], config)
    assert result.trainable_parameters == kallm.summary(model, print_table=False)["functions"]
    moved = sorted(name for name, p in model.named_parameters() if not torch.equal(p, before[name]))
    assert moved and set(moved) <= set(function_parameter_names(model))
    reloaded, _ = kallm.load_model(str(tmp_path / "run"))
    assert torch.equal(logits_of(reloaded, IDS), logits_of(model, IDS))
