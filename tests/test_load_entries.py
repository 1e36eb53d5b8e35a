"""Every documented kind of saved folder through every documented entry point gives back the saved model's outputs
exactly: with kallm imported, and in a fresh process without kallm (``trust_remote_code=True``) where the docs
promise it.

transformers changes the keywords its Auto classes and pipelines pass along (``_from_auto``, ``_from_pipeline``,
``adapter_kwargs``...) from one release to the next; a break shows here first.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, pipeline

import kallm
from kallm.checkpoints.save import save_checkpoint
from kallm.testing.models import TINY_CONFIGS, tiny_model
from kallm.testing.processes import BLOCK_KALLM
from kallm.testing.tokenizers import make_tiny_tokenizer

IDS = torch.randint(5, 100, (1, 9), generator=torch.Generator().manual_seed(3))
NEW_TOKENS = 4


def outputs(model) -> torch.Tensor:
    """What a model computes on ``IDS``: logits, or a base model's last hidden states."""
    with torch.no_grad():
        result = model(IDS)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def greedy(model) -> list[int]:
    with torch.no_grad():
        return model.generate(IDS, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0].tolist()


def nudged(model, seed: int):
    """``model`` with every trainable tensor moved a little, as training would: nothing stays at its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind of folder -> (folder, the model as saved)."""
    root = tmp_path_factory.mktemp("entries")
    tokenizer = make_tiny_tokenizer()
    base = tiny_model("llama")
    save_checkpoint(base, tokenizer, root / "base")
    model = kallm.retrofit(copy.deepcopy(base), blocks=[1, 2]).eval()
    kallm.set_trainable(model, "retrofitted")
    nudged(model, seed=1)
    folders = {"full": (save_checkpoint(model, tokenizer, root / "full"), model)}

    kallm.save_delta(model, root / "delta", base=str(root / "base"), tokenizer=tokenizer)
    folders["delta"] = (root / "delta", model)

    quantized = kallm.quantize(copy.deepcopy(model))
    kallm.save_quantized(quantized, root / "quantized", tokenizer=tokenizer)
    folders["quantized"] = (root / "quantized", quantized)

    retrofit = AutoModelForCausalLM.from_pretrained(root / "full").eval()
    lora = nudged(get_peft_model(retrofit, kallm.lora_config(retrofit, which="attention", r=2)), seed=2).eval()
    lora.save_pretrained(root / "lora")
    tokenizer.save_pretrained(root / "lora")
    folders["lora"] = (root / "lora", lora)

    config = TINY_CONFIGS["llama"]()
    config.num_labels, config.pad_token_id = 3, 0
    torch.manual_seed(0)
    classifier = kallm.retrofit(AutoModelForSequenceClassification.from_config(config), last_n=1).eval()
    nudged(classifier, seed=3)
    classifier.save_pretrained(root / "classifier")
    folders["classifier"] = (root / "classifier", classifier)
    return folders


# kind of folder -> entry point -> how it loads a folder (with kallm imported)
ENTRIES = {
    "full": {
        "AutoModelForCausalLM": AutoModelForCausalLM.from_pretrained,
        "AutoModel": AutoModel.from_pretrained,
        "pipeline": lambda folder: pipeline("text-generation", model=str(folder)).model,
        "kallm.load_model": lambda folder: kallm.load_model(str(folder))[0],
    },
    "delta": {
        "AutoModelForCausalLM": AutoModelForCausalLM.from_pretrained,
        "pipeline": lambda folder: pipeline("text-generation", model=str(folder)).model,
        "kallm.load_model": lambda folder: kallm.load_model(str(folder))[0],
        "kallm.load_delta": lambda folder: kallm.load_delta(folder)[0],
    },
    "quantized": {"kallm.load_quantized": kallm.load_quantized},
    "lora": {
        "AutoPeftModelForCausalLM": AutoPeftModelForCausalLM.from_pretrained,
        "PeftModel": lambda folder: PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(folder.parent / "full"), folder),
        "kallm.load_adapter": lambda folder: kallm.load_adapter(kallm.load_model(str(folder.parent / "full"))[0],
                                                                folder),
        "AutoModelForCausalLM": AutoModelForCausalLM.from_pretrained,
    },
    "classifier": {
        "AutoModelForSequenceClassification": AutoModelForSequenceClassification.from_pretrained,
        "AutoModel": AutoModel.from_pretrained,
    },
}
CASES = [(kind, entry) for kind, entries in ENTRIES.items() for entry in entries]


def reference(model, entry: str) -> torch.Tensor:
    """What ``entry`` must compute for the saved ``model``: AutoModel gives its base model."""
    if entry == "AutoModel":
        return outputs(model.base_model)
    return outputs(model)


@pytest.mark.parametrize("kind, entry", CASES, ids=[f"{kind}-{entry}" for kind, entry in CASES])
def test_each_entry_point_loads_each_kind_of_folder_exactly(saved, kind, entry):
    folder, model = saved[kind]
    loaded = ENTRIES[kind][entry](folder).eval()
    torch.testing.assert_close(outputs(loaded), reference(model, entry), rtol=0, atol=0)
    if entry == "pipeline":
        assert greedy(loaded) == greedy(model)


# Runs in a fresh interpreter where importing kallm fails: only the code saved in each folder can be used.
WITHOUT_KALLM = BLOCK_KALLM + r"""
import json
import torch, transformers
from peft import AutoPeftModelForCausalLM
request = json.loads(sys.argv[1])
ids = torch.tensor(request["ids"])
results = {}
for key, (entry, folder) in request["loads"].items():
    if entry == "pipeline":
        model = transformers.pipeline("text-generation", model=folder, trust_remote_code=True).model
    elif entry == "AutoPeftModelForCausalLM":
        model = AutoPeftModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    else:
        model = getattr(transformers, entry).from_pretrained(folder, trust_remote_code=True)
    model.eval()
    with torch.no_grad():
        output = model(ids)
    output = output.logits if hasattr(output, "logits") else output.last_hidden_state
    torch.save(output, f"{key}.pt")
    results[key] = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__module__
print("RESULTS " + json.dumps(results))
"""

# what the docs promise without kallm: kind of folder -> entry points
WITHOUT_KALLM_ENTRIES = {
    "full": ("AutoModelForCausalLM", "AutoModel", "pipeline"),
    "delta": ("AutoModelForCausalLM", "pipeline"),
    "lora": ("AutoPeftModelForCausalLM",),  # LoRA on attention: PEFT alone rebuilds it
    "classifier": ("AutoModelForSequenceClassification", "AutoModel"),
}


def test_entry_points_without_kallm_load_each_kind_of_folder_exactly(saved, tmp_path):
    loads = {f"{kind}-{entry}": (entry, str(saved[kind][0]))
             for kind, entries in WITHOUT_KALLM_ENTRIES.items() for entry in entries}
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    process = subprocess.run([sys.executable, "-c", WITHOUT_KALLM, json.dumps({"ids": IDS.tolist(), "loads": loads})],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    modules = json.loads(next(line for line in process.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    for key, (entry, _) in loads.items():
        kind = key.split("-")[0]
        assert modules[key].startswith("transformers_modules."), key
        expected = reference(saved[kind][1], entry)
        torch.testing.assert_close(torch.load(tmp_path / f"{key}.pt"), expected, rtol=0, atol=0, msg=key)
