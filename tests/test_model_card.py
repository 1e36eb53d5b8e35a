"""kallm's model card: what a saved checkpoint's card says, metadata through huggingface_hub's ModelCardData, the
bundled model's origin, results as model-index, and merging into a README already there (a user's own card)."""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard

import kallm
from kallm.checkpoints.load import BUNDLED_MODELS
from kallm.core.layers import KANFeedForward
from kallm.core.model_card import BUNDLED_BASE_MODELS, merge_model_card, model_card
from kallm.testing.models import tiny_model


def retrofitted(base_model: str):
    model = kallm.retrofit(tiny_model("llama"), last_n=1)
    model.config.kan_config["base_model"] = base_model
    return model


def perplexity_result(value: float, split: str = "test") -> EvalResult:
    return EvalResult(task_type="text-generation", dataset_type="wikitext", dataset_name="WikiText-2",
                      dataset_split=split, metric_type="perplexity", metric_value=value)


def test_every_bundled_model_names_its_original():
    assert set(BUNDLED_MODELS) <= set(BUNDLED_BASE_MODELS)


def test_card_of_the_bundled_model_names_the_original_hub_model_its_license_and_the_gguf_origin():
    model = retrofitted("smollm2-135m-instruct")
    card = ModelCard(model_card(model))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["kallm", "kan", "kolmogorov-arnold"]
    assert card.data.kan_config == model.config.kan_config
    assert "`HuggingFaceTB/SmolLM2-135M-Instruct`, dequantized to float32 from its Q4_1 GGUF" in card.text
    assert card.data.eval_results is None and card.data.datasets is None  # neither trained nor evaluated


def test_a_local_base_is_no_hub_model_and_has_no_known_license():
    card = ModelCard(model_card(retrofitted("my-local-folder")))
    assert card.data.base_model is None and card.data.license is None
    assert ModelCard(model_card(retrofitted("someone/model"))).data.base_model == "someone/model"


def test_results_become_model_index_and_a_merge_keeps_the_users_other_results():
    model = retrofitted("someone/model")
    card = model_card(model, location="you/kan", datasets=["HuggingFaceTB/smol-smoltalk"],
                      eval_results=[perplexity_result(40.0)])
    parsed = ModelCard(card)
    assert parsed.data.datasets == ["HuggingFaceTB/smol-smoltalk"]
    assert parsed.data.model_name == "you/kan"
    assert [(r.metric_type, r.metric_value) for r in parsed.data.eval_results] == [("perplexity", 40.0)]
    assert "| WikiText-2 (test) | perplexity | 40 |" in parsed.text

    users = ModelCard(card)
    users.data.eval_results.append(EvalResult(task_type="text-generation", dataset_type="mine", dataset_name="Mine",
                                              metric_type="accuracy", metric_value=0.5))
    users.data.datasets = ["me/my-data"]
    users.data.license = "mit"
    newer = model_card(model, location="you/kan", datasets=["HuggingFaceTB/smol-smoltalk"],
                       eval_results=[perplexity_result(35.0)])
    merged = ModelCard(merge_model_card(str(users), newer))
    values = {(r.dataset_type, r.metric_type): r.metric_value for r in merged.data.eval_results}
    assert values == {("mine", "accuracy"): 0.5, ("wikitext", "perplexity"): 35.0}  # kallm's replaced, not added
    assert merged.data.datasets == ["me/my-data", "HuggingFaceTB/smol-smoltalk"]
    assert merged.data.license == "mit"  # the user's metadata stays


def test_model_card_describes_the_retrofit_and_both_load_paths(saved):
    folder, model, _ = saved["gpt2-rational"]
    card = (folder / "README.md").read_text()
    kan_config = model.config.kan_config
    total = sum(p.numel() for p in model.parameters())
    kan_total = sum(p.numel() for m in model.modules() if isinstance(m, KANFeedForward) for p in m.parameters())
    metadata = ModelCard(card).data
    assert metadata.library_name == "transformers" and "kallm" in metadata.tags
    assert metadata.base_model is None  # "gpt2" here is a local tiny model, no Hub repo
    assert metadata.kan_config == kan_config
    assert "| base model | `gpt2` (gpt2) |" in card
    assert "| retrofitted blocks | [0, 2] |" in card
    assert "| basis | `rational`, degree 2 |" in card
    assert f"| KAN feedforward sizes | 32 -> {kan_config['intermediate_size']} -> 32 |" in card
    assert "| basis options | denominator_degree=2 |" in card and "| input map, bias | affine, True |" in card
    assert f"| parameters | {total:,} in all, {kan_total:,} in KAN feedforwards |" in card
    assert "import kallm" in card and 'AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")' in card
    assert 'from_pretrained("PATH_OR_REPO", trust_remote_code=True)' in card


def test_model_card_names_a_hub_base_model():
    model = tiny_model("llama")
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    kallm.retrofit(model, last_n=1)
    card = kallm.core.model_card.model_card(model, tags=["chat"], location="me/kan-smol")
    metadata = ModelCard(card).data
    assert metadata.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata.tags == ["kallm", "kan", "kolmogorov-arnold", "chat"]
    assert 'from_pretrained("me/kan-smol", trust_remote_code=True)' in card


USER_CARD = """---
license: mit
tags:
- mine
---
# My tiny model

Trained by me, on my data.
"""


def _count(text, fragment):
    return text.count(fragment)


def test_save_keeps_a_users_card_and_merges_kallms_section_once(saved, tmp_path):
    from huggingface_hub import ModelCard

    _, model, _ = saved["gpt2"]
    folder = tmp_path / "with-card"
    folder.mkdir()
    (folder / "README.md").write_text(USER_CARD)
    model.save_pretrained(folder)
    first = (folder / "README.md").read_text()
    card = ModelCard(first)
    assert card.data.license == "mit"
    assert card.data.tags == ["mine", "kallm", "kan", "kolmogorov-arnold"]
    assert card.data.library_name == "transformers"
    assert card.text.startswith("# My tiny model\n\nTrained by me, on my data.\n")
    assert "| retrofitted blocks | [1, 2] |" in card.text
    model.save_pretrained(folder)  # re-saving replaces kallm's section, it does not add another
    second = (folder / "README.md").read_text()
    assert second == first
    assert _count(second, "| retrofitted blocks |") == 1 and _count(second, "# My tiny model") == 1


def test_save_replaces_its_own_section_when_the_model_changed(saved, tmp_path):
    folder = tmp_path / "changing"
    model = kallm.retrofit(tiny_model("llama"), layers=[2])
    model.save_pretrained(folder)
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\n## My notes\n\nkeep me\n")
    kallm.retrofit(model, layers=[0])
    model.save_pretrained(folder)
    text = (folder / "README.md").read_text()
    assert "| retrofitted blocks | [0, 2] |" in text and "| retrofitted blocks | [2] |" not in text
    assert text.rstrip().endswith("keep me") and _count(text, "# ") - _count(text, "## ") >= 1
    assert _count(text, kallm.core.model_card.CARD_BEGIN) == 1


def test_a_card_without_front_matter_gets_kallms(saved, tmp_path):
    _, model, _ = saved["gpt2"]
    folder = tmp_path / "plain-card"
    folder.mkdir()
    (folder / "README.md").write_text("# Notes\n\nJust text.\n")
    model.save_pretrained(folder)
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n") and "kallm" in text.split("---")[1]
    assert "# Notes\n\nJust text.\n" in text and "| retrofitted blocks |" in text
