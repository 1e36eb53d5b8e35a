"""kallm's model card: metadata through huggingface_hub's ModelCardData, the bundled model's origin, results as
model-index, and merging into a README already there."""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard

import kallm
from kallm.checkpoints.load import BUNDLED_MODELS
from kallm.core.modeling_kallm import BUNDLED_BASE_MODELS, merge_model_card, model_card
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
