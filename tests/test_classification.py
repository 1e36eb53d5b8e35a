"""Retrofitted sequence classifiers and base models: AutoModelForSequenceClassification and AutoModel for every
family, auto_map, and the shrink -> retrofit -> save -> fresh-process load through trust_remote_code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModel, AutoModelForSequenceClassification

import kallm
from kallm.core.layers import KANFeedForward
from kallm.testing.models import TINY_CONFIGS, tiny_model
from kallm.testing.processes import BLOCK_KALLM
from kallm.testing.tokenizers import make_tiny_tokenizer

AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModel")


def tiny_classifier(family, num_labels=3):
    torch.manual_seed(0)
    config = TINY_CONFIGS[family]()
    config.num_labels = num_labels
    if config.pad_token_id is None:  # a classifier finds each row's last token through the pad id
        config.pad_token_id = 0
    return AutoModelForSequenceClassification.from_config(config).eval()


def token_ids():
    return torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_classifier_retrofits_saves_and_loads_with_every_auto_class(family, tmp_path):
    model = kallm.retrofit(tiny_classifier(family), last_n=2)
    prefix = {"gpt2": "KAGPT2", "gpt_neox": "KAGPTNeoX", "opt": "KAOPT"}.get(family)
    assert type(model).__name__.endswith("ForSequenceClassification") and type(model).__name__.startswith("KA")
    assert prefix is None or type(model).__name__.startswith(prefix)
    assert sum(isinstance(m, KANFeedForward) for m in model.modules()) == 2
    with torch.no_grad():
        logits = model(token_ids()).logits
    assert logits.shape == (2, 3)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(AUTO_CLASSES) <= set(config["auto_map"])
    assert config["auto_map"]["AutoModelForSequenceClassification"] == f"modeling_kallm.{type(model).__name__}"

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids()).logits, logits)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base).__name__.startswith("KA") and type(base).__name__.endswith("Model")
    assert sum(isinstance(m, KANFeedForward) for m in base.modules()) == 2
    with torch.no_grad():
        assert torch.equal(base(token_ids()).last_hidden_state, loaded.base_model(token_ids()).last_hidden_state)


def test_a_saved_causal_lm_names_every_auto_class_and_loads_as_a_classifier(tmp_path):
    causal = kallm.retrofit(tiny_model("llama"), last_n=2)
    causal.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert {key: auto_map[key] for key in AUTO_CLASSES} == {
        "AutoModelForCausalLM": "modeling_kallm.KALlamaForCausalLM",
        "AutoModelForSequenceClassification": "modeling_kallm.KALlamaForSequenceClassification",
        "AutoModel": "modeling_kallm.KALlamaModel",
    }
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4)
    state = classifier.state_dict()
    for name, tensor in causal.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(state[name], tensor), name
    assert "README.md" in os.listdir(tmp_path)
    classifier.save_pretrained(tmp_path / "classifier")
    assert "AutoModelForSequenceClassification.from_pretrained" in (tmp_path / "classifier" / "README.md").read_text()


def test_a_classifier_extends_and_refuses_like_a_causal_lm():
    model = kallm.retrofit(tiny_classifier("llama"), last_n=1)
    kallm.retrofit(model, blocks=[0])
    assert model.config.kan_config["blocks"] == [0, 2]
    with pytest.raises(ValueError, match="already KAN feedforwards"):
        kallm.retrofit(model, blocks=[0])
    restarted = kallm.retrofit(tiny_classifier("gpt2"), last_n=1, kind="linear")
    assert type(restarted) is transformers.GPT2ForSequenceClassification
    recorded = kallm.core.read_retrofit_config(restarted.config)
    assert (recorded.kind, recorded.blocks) == ("linear", [2])


FRESH_PROCESS = BLOCK_KALLM + r"""
import json
import torch
import transformers
request = json.loads(sys.argv[1])
reference = torch.load(request["reference"])
results = {}
for auto_class, folder in request["models"].items():
    model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        output = model(reference["ids"])
    value = output.last_hidden_state if auto_class == "AutoModel" else output.logits
    results[auto_class] = {"class": type(model).__name__, "module": type(model).__module__,
                           "max_abs_diff": (value - reference[auto_class]).abs().max().item()}
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    results[auto_class]["tokens"] = [tokenizer(text)["input_ids"] for text in request["texts"]]
print("\nRESULTS " + json.dumps(results))
"""


def test_shrink_retrofit_save_and_load_without_kallm_through_trust_remote_code(tmp_path):
    texts = ["the cat sat", "a dog ran far", "unseen: QXZ!"]
    small, tokenizer = kallm.shrink(tiny_model("llama"), make_tiny_tokenizer(), num_blocks=2, vocab_from=texts[:2])
    causal_folder, classifier_folder = tmp_path / "causal", tmp_path / "classifier"
    small.save_pretrained(tmp_path / "mini")
    tokenizer.save_pretrained(tmp_path / "mini")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "mini", num_labels=4).eval()
    kallm.retrofit(classifier, last_n=2, basis="legendre", degree=3)
    kallm.retrofit(small, last_n=1)
    for model, folder in ((small, causal_folder), (classifier, classifier_folder)):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    ids = torch.tensor([tokenizer(texts[0])["input_ids"]])
    with torch.no_grad():
        reference = {"ids": ids, "AutoModelForCausalLM": small(ids).logits,
                     "AutoModelForSequenceClassification": classifier(ids).logits,
                     "AutoModel": classifier.base_model(ids).last_hidden_state}
    torch.save(reference, tmp_path / "reference.pt")
    request = {"reference": str(tmp_path / "reference.pt"), "texts": texts,
               "models": {"AutoModelForCausalLM": str(causal_folder),
                          "AutoModelForSequenceClassification": str(classifier_folder),
                          "AutoModel": str(classifier_folder)}}
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    process = subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(request)], cwd=tmp_path, env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    line = next(line for line in process.stdout.splitlines() if line.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    expected_tokens = [tokenizer(text)["input_ids"] for text in texts]
    for auto_class, expected_class in [("AutoModelForCausalLM", "KALlamaForCausalLM"),
                                       ("AutoModelForSequenceClassification", "KALlamaForSequenceClassification"),
                                       ("AutoModel", "KALlamaModel")]:
        result = results[auto_class]
        assert result["class"] == expected_class
        assert result["module"].startswith("transformers_modules.")
        assert result["max_abs_diff"] == 0.0
        assert result["tokens"] == expected_tokens
