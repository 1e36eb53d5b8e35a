"""``kallm train --adapter-rank``: an adapter trained through transformers' Trainer, saved, reloaded and merged."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import kallm
from kallm.cli.train import add_arguments, config_from_args, run
from kallm.testing.compare import logits_of
from kallm.testing.data import sums
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import chat_tokenizer
from kallm.train import TrainConfig, train

peft = pytest.importorskip("peft")

TOKENS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved retrofitted tiny llama, a saved plain one (both with a tokenizer) and chat data."""
    root = tmp_path_factory.mktemp("train_lora")
    tokenizer = chat_tokenizer()
    for name, model in (("retrofitted", kallm.retrofit(tiny_model("llama"), last_n=1)), ("plain", tiny_model("llama"))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in sums(16)))
    return root


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def train_command(workspace, model, out, *options):
    return run(parse("--model", workspace / model, "--data", workspace / "chat.jsonl", "--out", out,
                     "--max-steps", 3, "--batch-size", 4, "--logging-steps", 1, "--lr", 1e-2, "--quiet", *options))


def test_train_lora_saves_an_adapter_and_a_merged_checkpoint_with_the_same_logits(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_command(workspace, "retrofitted", out, "--adapter-rank", 4, "--adapter-alpha", 8, "--merge") == 0
    printed = capsys.readouterr().out
    assert f"adapter and tokenizer saved to {out}" in printed and f"merged into it saved to {out / 'merged'}" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["task_type"] == "CAUSAL_LM"
    # the default targets on a retrofitted model: its KAN layers and the attention projections
    assert "model.layers.2.mlp.layers.0" in config["target_modules"]
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
    assert not (out / "model.safetensors").exists()
    summary = json.loads((out / "train_result.json").read_text())
    assert summary["config"]["trainable"] is None and summary["merged_dir"] == str(out / "merged")

    base, _ = kallm.load_model(str(workspace / "retrofitted"))
    reference = logits_of(base, TOKENS)
    adapted = kallm.load_adapter(base, out).eval()
    assert kallm.summary(adapted, print_table=False)["adapters"] == summary["trainable_parameters"]
    adapted_logits = logits_of(adapted, TOKENS)
    assert not torch.allclose(adapted_logits, reference)  # the adapter trained
    merged, _ = kallm.load_model(str(out / "merged"))
    assert type(merged).__name__ == "KALlamaForCausalLM"
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(logits_of(merged, TOKENS), adapted_logits)  # attention LoRA merges to float rounding


def test_train_kan_adapter_saves_an_adapter_that_reloads_logit_for_logit(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_command(workspace, "retrofitted", out, "--adapter-rank", 4, "--adapter", "kan") == 0
    assert f"adapter and tokenizer saved to {out}" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "KAN_ADAPTER" and config["r"] == 4 and config["task_type"] == "CAUSAL_LM"
    assert {"model.layers.2.mlp.layers.0", "model.layers.0.self_attn.q_proj"} <= set(config["target_modules"])
    summary = json.loads((out / "train_result.json").read_text())

    base, _ = kallm.load_model(str(workspace / "retrofitted"))
    reference = logits_of(base, TOKENS)
    adapted = kallm.load_adapter(base, out).eval()
    assert kallm.summary(adapted, print_table=False)["adapters"] == summary["trainable_parameters"]
    adapted_logits = logits_of(adapted, TOKENS)
    assert not torch.allclose(adapted_logits, reference)  # the adapter trained
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits_of(auto, TOKENS), adapted_logits, rtol=0, atol=0)


def test_train_lora_leaves_the_base_weights_alone_and_trains_only_the_adapter(workspace, tmp_path):
    model, tokenizer = kallm.load_model(str(workspace / "retrofitted"))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = TrainConfig(output_dir=str(tmp_path / "out"), max_steps=2, batch_size=4, learning_rate=1e-2,
                         progress_bar=False, adapter_rank=2, adapter_targets="kan")
    result = train(model, tokenizer, sums(8), config)
    assert isinstance(model, torch.nn.Module) and result.merged_dir is None
    wrapped = model.model.layers[2].mlp.layers[0]
    assert isinstance(wrapped, kallm.finetune.KANLoraLinear)  # the model was wrapped in place
    adapters = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert result.trainable_parameters == adapters
    for name, tensor in model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, before[name.replace("base_layer.", "")]), name


def test_train_lora_on_a_plain_model_targets_the_attention(workspace, tmp_path):
    out = tmp_path / "out"
    assert train_command(workspace, "plain", out, "--adapter-rank", 2) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted({name.rsplit(".", 1)[1] for name in config["target_modules"]}) == ["k_proj", "o_proj", "q_proj",
                                                                                      "v_proj"]


def test_a_user_peft_model_trains_its_adapter_with_a_policy_for_the_base(workspace, tmp_path):
    model, tokenizer = kallm.load_model(str(workspace / "retrofitted"))
    wrapped = peft.get_peft_model(model, kallm.lora_config(model, "kan", r=2))
    config = TrainConfig(output_dir=str(tmp_path / "out"), max_steps=1, batch_size=4, progress_bar=False,
                         trainable="retrofitted")
    result = train(wrapped, tokenizer, sums(8), config)
    feedforward = sum(p.numel() for p in model.model.layers[2].mlp.parameters())
    assert result.trainable_parameters == feedforward  # the adapter lives inside the KAN feedforward
    with pytest.raises(ValueError, match="already carries PEFT adapters"):
        train(wrapped, tokenizer, sums(8), TrainConfig(output_dir=str(tmp_path / "again"), adapter_rank=2))


@pytest.mark.parametrize("settings, message", [
    (dict(merge=True), "merge needs an adapter to merge: set adapter_rank"),
    (dict(adapter_rank=0), "adapter_rank must be an integer >= 1, got 0"),
    (dict(adapter_rank=2, adapter_dropout=1.0), r"adapter_dropout must be a finite number in \[0, 1\), got 1.0"),
    (dict(adapter_rank=2, adapter_alpha=0), "adapter_alpha must be a finite number > 0, got 0"),
    (dict(adapter_rank=2, adapter_targets="ffn"), "adapter_targets must be one of kan, attention, mlp, all, got 'ffn'"),
    (dict(adapter_rank=2, adapter="dora"), "adapter must be one of lora, kan, got 'dora'"),
    (dict(adapter="kan"), "adapter='kan' needs adapter_rank, the adapter's rank"),
    (dict(adapter_rank=2, adapter="kan", merge=True), "merge: a KAN adapter cannot be merged into the model's weights"),
])
def test_lora_settings_are_checked_when_the_config_is_made(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_bad_lora_targets_fail_before_anything_is_written(workspace, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="has no KAN layers to target"):
        train_command(workspace, "plain", out, "--adapter-rank", 2, "--adapter-targets", "kan")
    with pytest.raises(ValueError, match=r"LoRA rank r=40 is too large .* allows at most"):
        train_command(workspace, "retrofitted", out, "--adapter-rank", 40)
    with pytest.raises(SystemExit):
        parse("--model", "m", "--data", "d", "--adapter-rank", 2, "--adapter-targets", "ffn")
    with pytest.raises(ValueError, match="merge: a KAN adapter cannot be merged"):
        train_command(workspace, "retrofitted", out, "--adapter-rank", 2, "--adapter", "kan", "--merge")
    with pytest.raises(ValueError, match=r"KAN adapter rank r=40 is too large .* allows at most"):
        train_command(workspace, "retrofitted", out, "--adapter-rank", 40, "--adapter", "kan")
    assert not out.exists()


def test_the_old_adapter_flags_and_fields_still_work_for_one_release_with_a_warning(workspace, tmp_path):
    with pytest.warns(FutureWarning, match="kallm train --lora is now --adapter-rank"):
        config = config_from_args(parse("--model", "m", "--data", "d", "--out", tmp_path, "--lora", 4,
                                        "--lora-alpha", 8))
    assert (config.adapter_rank, config.adapter_alpha) == (4, 8)
    with pytest.warns(FutureWarning, match="TrainConfig.lora_targets is now adapter_targets"):
        config = TrainConfig(output_dir=str(tmp_path), lora_rank=2, lora_targets="kan")
    assert (config.adapter_rank, config.adapter_targets) == (2, "kan")
    with pytest.warns(FutureWarning, match="TrainConfig.lora_rank is now adapter_rank"):
        assert config.lora_rank == 2
    with pytest.raises(TypeError, match="give adapter_rank or its old name lora_rank, not both"):
        TrainConfig(lora_rank=2, adapter_rank=2)
