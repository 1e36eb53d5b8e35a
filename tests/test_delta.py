"""Delta checkpoints: ``kallm.save_delta`` keeps only what changed, ``kallm.load_delta`` rebuilds the model
exactly on the base it was made from and refuses any other."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import kallm
from kallm.checkpoints.save import save_checkpoint
from kallm.core.delta_checkpoint import DELTA_MANIFEST, DELTA_WEIGHTS, base_weights_hash
from kallm.testing.compare import logits_of
from kallm.testing.models import tiny_model
from kallm.testing.processes import load_script, run_fresh_processes
from kallm.testing.tokenizers import chat_tokenizer

TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def retrofitted_and_trained(base):
    """A copy of ``base`` retrofitted in blocks 1 and 2, its final norm changed as training would."""
    model = kallm.retrofit(copy.deepcopy(base), blocks=[1, 2])
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    return model


def test_a_delta_holds_only_what_changed_and_rebuilds_the_model_exactly(tmp_path):
    base = tiny_model("llama")
    model = retrofitted_and_trained(base)
    manifest = kallm.save_delta(model, tmp_path / "delta", base=base)

    kan = [name for name in model.state_dict() if ".mlp.layers." in name]
    assert manifest["changed_tensors"] == sorted([*kan, "model.norm.weight"])
    assert manifest["dropped_tensors"] == sorted(f"model.layers.{b}.mlp.{p}_proj.weight"
                                                 for b in (1, 2) for p in ("gate", "up", "down"))
    assert manifest["base_sha256"] == base_weights_hash(base)
    save_checkpoint(model, None, tmp_path / "full")
    delta_size = (tmp_path / "delta" / DELTA_WEIGHTS).stat().st_size
    assert delta_size < 0.3 * (tmp_path / "full" / "model.safetensors").stat().st_size

    loaded, tokenizer = kallm.load_delta(tmp_path / "delta", base=base)
    assert type(loaded) is type(model) and tokenizer is None
    torch.testing.assert_close(logits_of(loaded, TOKENS), logits_of(model, TOKENS), rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.config.kan_config == model.config.kan_config
    # the base is untouched
    torch.testing.assert_close(logits_of(base, TOKENS),
                               logits_of(tiny_model("llama"), TOKENS), rtol=0, atol=0)


def test_the_recorded_base_loads_by_name_with_the_tokenizer(tmp_path, monkeypatch):
    base, tokenizer = tiny_model("gpt2"), chat_tokenizer()
    save_checkpoint(base, tokenizer, tmp_path / "base")
    model = kallm.retrofit(copy.deepcopy(base), last_n=1)
    monkeypatch.chdir(tmp_path)
    manifest = kallm.save_delta(model, "delta", base="base", tokenizer=tokenizer)
    assert manifest["base_model"] == str(tmp_path / "base")  # a local base by its absolute path
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded, loaded_tokenizer = kallm.load_delta(tmp_path / "delta")
    torch.testing.assert_close(logits_of(loaded, TOKENS), logits_of(model, TOKENS), rtol=0, atol=0)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()


def test_load_model_and_from_pretrained_rebuild_a_delta_in_one_call(tmp_path):
    base, tokenizer = tiny_model("llama"), chat_tokenizer()
    save_checkpoint(base, tokenizer, tmp_path / "base")
    model = retrofitted_and_trained(base)
    kallm.save_delta(model, tmp_path / "delta", base=str(tmp_path / "base"), tokenizer=tokenizer)
    delta = str(tmp_path / "delta")

    loaded, loaded_tokenizer = kallm.load_model(delta)
    torch.testing.assert_close(logits_of(loaded, TOKENS), logits_of(model, TOKENS), rtol=0, atol=0)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert kallm.load_model(delta, dtype=torch.bfloat16)[0].dtype == torch.bfloat16
    # transformers' own entry point, on the recorded base or on one given loaded
    for options in ({}, {"base_model": base}, {"base_model": str(tmp_path / "base")}):
        auto = AutoModelForCausalLM.from_pretrained(delta, **options)
        assert type(auto) is type(model)
        torch.testing.assert_close(logits_of(auto, TOKENS), logits_of(model, TOKENS), rtol=0, atol=0)

    with pytest.raises(ValueError, match=r"from_pretrained options \(device_map\) do not apply"):
        kallm.load_model(delta, device_map="cpu")
    # what transformers' Auto classes and pipelines pass along (private keywords included) reaches the rebuild
    routed = AutoModelForCausalLM.from_pretrained(delta, device_map="cpu", attn_implementation="eager",
                                                  trust_remote_code=True, _from_pipeline="x")
    assert routed.config._attn_implementation == "eager"  # eager attention sums in another order than sdpa
    torch.testing.assert_close(logits_of(routed, TOKENS), logits_of(model, TOKENS), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"is a delta checkpoint, rebuilt on its base; from_pretrained got "
                                         r"max_memory, which it cannot honour there \(it takes config, base_model"):
        AutoModelForCausalLM.from_pretrained(delta, max_memory={"cpu": "1GB"})
    with pytest.raises(ValueError, match="does not match the delta"):
        AutoModelForCausalLM.from_pretrained(delta, base_model=tiny_model("llama", seed=1))
    save_checkpoint(model, tokenizer, tmp_path / "full")
    with pytest.raises(ValueError, match="base_model= is for delta checkpoints"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "full", base_model=base)


@pytest.mark.integration  # slow: two fresh processes
def test_a_fresh_process_rebuilds_a_delta_with_or_without_kallm(tmp_path):
    base, tokenizer = tiny_model("llama"), chat_tokenizer()
    save_checkpoint(base, tokenizer, tmp_path / "base")
    model = retrofitted_and_trained(base)
    kallm.save_delta(model, tmp_path / "delta", base=str(tmp_path / "base"))
    save_checkpoint(base, tokenizer, tmp_path / "base-later-changed")
    kallm.save_delta(model, tmp_path / "delta-on-changed-base", base=str(tmp_path / "base-later-changed"))
    save_checkpoint(tiny_model("llama", seed=1), tokenizer, tmp_path / "base-later-changed")
    reference = tmp_path / "reference.pt"
    torch.save({"ids": TOKENS, "logits": logits_of(model, TOKENS),
                "kan_state": {k: v for k, v in model.state_dict().items() if ".mlp.layers." in k}}, reference)
    request = {"models": {"delta": [str(tmp_path / "delta"), str(reference)]},
               "refused": {"changed-base": str(tmp_path / "delta-on-changed-base")}}
    results = run_fresh_processes({"without_kallm": {**request, "block_kallm": True},
                                   "with_kallm": {**request, "block_kallm": False}}, tmp_path / "fresh")
    for key, importable in (("without_kallm", False), ("with_kallm", True)):
        result = results[key]
        assert result["kallm_importable"] is importable
        assert result["models"]["delta"]["max_abs_diff"] == 0.0 and result["models"]["delta"]["kan_tensors_equal"]
        assert result["models"]["delta"]["module"].endswith("modeling_kallm")
        assert "does not match the delta" in result["refused"]["changed-base"]
    assert results["without_kallm"]["models"]["delta"]["module"].startswith("transformers_modules.")


def test_another_base_is_refused_with_both_hashes(tmp_path):
    base = tiny_model("llama")
    kallm.save_delta(retrofitted_and_trained(base), tmp_path / "delta", base=base)
    other = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match=r"does not match the delta in .*hash to [0-9a-f]{16}\.\.\., the delta was "
                                         r"made from weights hashing to [0-9a-f]{16}"):
        kallm.load_delta(tmp_path / "delta", base=other)
    with torch.no_grad():
        changed = copy.deepcopy(base)
        changed.model.layers[0].self_attn.q_proj.weight[0, 0] += 1e-6  # one weight of a block the delta never saw
    with pytest.raises(ValueError, match="does not match the delta"):
        kallm.load_delta(tmp_path / "delta", base=changed)


def test_a_missing_base_or_manifest_is_a_clear_error(tmp_path):
    base, tokenizer = tiny_model("llama"), chat_tokenizer()
    save_checkpoint(base, tokenizer, tmp_path / "base")
    kallm.save_delta(retrofitted_and_trained(base), tmp_path / "delta", base=str(tmp_path / "base"))
    (tmp_path / "base" / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match="base model of the delta in .* cannot be loaded .*pass base="):
        kallm.load_delta(tmp_path / "delta")
    with pytest.raises(FileNotFoundError, match="is no delta checkpoint: it has no kallm_delta.json"):
        kallm.load_delta(tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="base model of the delta in .* cannot be loaded .*pass base="):
        kallm.load_model(str(tmp_path / "delta"))


def test_bad_input_is_refused_before_the_folder_changes(tmp_path):
    base = tiny_model("llama")
    model = retrofitted_and_trained(base)
    kallm.save_delta(model, tmp_path / "delta", base=base)
    before = {path.name: path.read_bytes() for path in (tmp_path / "delta").iterdir()}
    with pytest.raises(ValueError, match="none of the model's weight matrices equals the base's"):
        kallm.save_delta(model, tmp_path / "delta", base=tiny_model("llama", seed=1))
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, kallm.lora_config(model, "kan", r=2))
    with pytest.raises(TypeError, match=r"without PEFT adapters: merge them first"):
        kallm.save_delta(wrapped, tmp_path / "delta", base=base)
    with pytest.raises(TypeError, match="base must be a model or a name"):
        kallm.save_delta(model, tmp_path / "delta", base=3)
    assert {path.name: path.read_bytes() for path in (tmp_path / "delta").iterdir()} == before


def test_a_delta_and_a_full_checkpoint_replace_each_other_in_a_folder(tmp_path):
    base = tiny_model("llama")
    model = retrofitted_and_trained(base)
    save_checkpoint(model, None, tmp_path / "out")
    kallm.save_delta(model, tmp_path / "out", base=base)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert json.loads((tmp_path / "out" / DELTA_MANIFEST).read_text())["format"] == 1
    save_checkpoint(model, chat_tokenizer(), tmp_path / "out")
    assert not (tmp_path / "out" / DELTA_MANIFEST).exists() and not (tmp_path / "out" / DELTA_WEIGHTS).exists()
    torch.testing.assert_close(logits_of(kallm.load_model(str(tmp_path / "out"))[0], TOKENS),
                               logits_of(model, TOKENS), rtol=0, atol=0)


def test_tied_embeddings_that_trained_are_stored_once_and_stay_tied(tmp_path):
    base = tiny_model("llama")  # tie_word_embeddings=True
    model = retrofitted_and_trained(base)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.01)
    manifest = kallm.save_delta(model, tmp_path / "delta", base=base)
    assert manifest["tied_tensors"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in manifest["changed_tensors"]
    loaded, _ = kallm.load_delta(tmp_path / "delta", base=base)
    torch.testing.assert_close(logits_of(loaded, TOKENS), logits_of(model, TOKENS), rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_the_size_benchmark_runs_on_a_tiny_model(tmp_path, capsys):
    bench = load_script("bench_delta")
    save_checkpoint(tiny_model("llama"), chat_tokenizer(), tmp_path / "base")
    assert bench.main(["--model", str(tmp_path / "base"), "--last-n", "1"]) == 0
    table = capsys.readouterr().out
    assert "| retrofitted |" in table and "| trained (tail+embeddings) |" in table and table.count("| 0 |") == 2


def folder_bytes(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_a_delta_over_the_folder_of_its_base_or_model_is_refused_before_anything_changes(tmp_path):
    base, tokenizer = tiny_model("llama"), chat_tokenizer()
    save_checkpoint(base, tokenizer, tmp_path / "base")
    before = folder_bytes(tmp_path / "base")
    model, _ = kallm.load_model(str(tmp_path / "base"))
    kallm.retrofit(model, blocks=[2])  # in place: the model still names the base's folder as its source
    for folder in (tmp_path / "base", tmp_path / "base" / "delta", tmp_path):
        with pytest.raises(ValueError, match=f"cannot write to {re.escape(str(folder))}: it (is|lies inside|holds)"):
            kallm.save_delta(model, folder, base=str(tmp_path / "base"))
    assert folder_bytes(tmp_path / "base") == before and sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    torch.testing.assert_close(logits_of(kallm.load_model(str(tmp_path / "base"))[0], TOKENS),
                               logits_of(base, TOKENS), rtol=0, atol=0)


def test_a_base_that_is_the_model_shares_its_tensors_or_is_retrofitted_alike_is_refused(tmp_path):
    original = tiny_model("llama")
    model = retrofitted_and_trained(original)
    in_place = kallm.retrofit(tiny_model("llama"), blocks=[1, 2])
    sharing = tiny_model("llama")
    sharing.model.layers[0] = model.model.layers[0]
    for base, problem in ((in_place, "the base is the model itself"),
                          (sharing, r"the base shares tensors with the model \(model.layers.0."),
                          (kallm.retrofit(copy.deepcopy(original), blocks=[2]),
                           r"the base is itself retrofitted in blocks \[2\], like the model")):
        with pytest.raises(ValueError, match=problem):
            kallm.save_delta(in_place if base is in_place else model, tmp_path / "delta", base=base)
    assert not (tmp_path / "delta").exists()


def test_without_base_the_recorded_one_is_used_and_must_still_be_there(tmp_path):
    base, tokenizer = tiny_model("gpt2"), chat_tokenizer()
    save_checkpoint(base, tokenizer, tmp_path / "base")
    model = kallm.retrofit(copy.deepcopy(base), last_n=1)
    model.config.kan_config["base_model"] = str(tmp_path / "base")  # as retrofit records a hub or bundled base
    manifest = kallm.save_delta(model, tmp_path / "delta")
    assert manifest["base_model"] == str(tmp_path / "base")
    torch.testing.assert_close(logits_of(kallm.load_delta(tmp_path / "delta")[0], TOKENS),
                               logits_of(model, TOKENS), rtol=0, atol=0)

    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=r"save_delta needs base=: the model this one was retrofitted from is "
                                                r"no longer where it records it \(.*base\)"):
        kallm.save_delta(model, tmp_path / "delta-2")
    model.config.kan_config["base_model"] = ""
    with pytest.raises(ValueError, match="save_delta needs base=: this model does not record the model it was "
                                         "retrofitted from"):
        kallm.save_delta(model, tmp_path / "delta-2")
    assert not (tmp_path / "delta-2").exists()


def test_a_base_folder_without_a_tokenizer_serves_as_a_base(tmp_path):
    base = tiny_model("llama")
    save_checkpoint(base, None, tmp_path / "base")
    model = retrofitted_and_trained(base)
    kallm.save_delta(model, tmp_path / "delta", base=str(tmp_path / "base"))
    loaded, tokenizer = kallm.load_delta(tmp_path / "delta")
    assert tokenizer is None
    torch.testing.assert_close(logits_of(loaded, TOKENS), logits_of(model, TOKENS), rtol=0, atol=0)


def test_a_delta_holding_nan_or_recording_itself_as_base_is_refused_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny_model("llama")
    save_checkpoint(base, chat_tokenizer(), tmp_path / "base")
    model = retrofitted_and_trained(base)
    kallm.save_delta(model, tmp_path / "delta", base=str(tmp_path / "base"))
    weights = tmp_path / "delta" / DELTA_WEIGHTS
    tensors = load_file(weights)
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    for load in (lambda: kallm.load_delta(tmp_path / "delta"), lambda: kallm.load_model(str(tmp_path / "delta")),
                 lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "delta")):
        with pytest.raises(ValueError, match=r"the delta in .*delta is damaged: model.norm.weight hold NaN or "
                                             r"infinite values"):
            load()

    manifest_file = tmp_path / "delta" / DELTA_MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "base_model": str(tmp_path / "delta")}))
    with pytest.raises(ValueError, match="records itself as its base model"):
        kallm.load_delta(tmp_path / "delta")

    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match=r"the model holds NaN or infinite values in model.norm.weight"):
        kallm.save_delta(model, tmp_path / "delta-2", base=base)
    assert not (tmp_path / "delta-2").exists()
