"""Saved checkpoints loaded in fresh processes, without kallm (trust_remote_code=True and the code saved beside
the weights) and with it: the same logits, tensors and tokenizer, and the same refusals."""

from __future__ import annotations

import pytest

from kallm.testing.checkpoints import CASES, TOKENIZER_CASE
from kallm.testing.processes import run_fresh_processes

# saved folders every load path must refuse -> what the error says
REFUSED_IN_FRESH_PROCESSES = {
    "llama-newer-schema": "schema_version is 99, but the installed kallm code only understands versions up to 4; "
                          "upgrade kallm",
    "llama-kan-weight-dropped": "1 tensors the config describes are missing from the weights: "
                                "model.layers.2.mlp.layers.0.weight.",
    "llama-bogus-blocks-path": "kan_config.blocks_path 'model.blocks' names no submodule of KALlamaForCausalLM",
    "llama-basis-edited": "gives its KAN blocks other settings than its weights were made for: block 1's basis is "
                          "'cheby2' in the weights but 'legendre' in kan_config; block 2's basis is 'cheby2' in the "
                          "weights but 'legendre' in kan_config.",
}


def _request(saved, block_kallm):
    return {
        "block_kallm": block_kallm,
        "models": {name: [str(saved[name][0]), str(saved[name][2])] for name in CASES},
        "tokenizer_folder": str(saved[TOKENIZER_CASE][0]),
        "refused": {name: str(saved[name][0]) for name in REFUSED_IN_FRESH_PROCESSES},
    }


@pytest.fixture(scope="module")
def fresh(saved, tmp_path_factory):
    requests = {"without_kallm": _request(saved, block_kallm=True), "with_kallm": _request(saved, block_kallm=False)}
    return run_fresh_processes(requests, tmp_path_factory.mktemp("fresh"))


@pytest.fixture(scope="module")
def without_kallm(fresh):
    return fresh["without_kallm"]


@pytest.fixture(scope="module")
def with_kallm(fresh):
    return fresh["with_kallm"]


@pytest.mark.parametrize("name", CASES)
def test_fresh_process_without_kallm_loads_with_trust_remote_code(saved, without_kallm, name):
    assert without_kallm["kallm_importable"] is False
    result = without_kallm["models"][name]
    assert result["module"].startswith("transformers_modules.")
    assert result["module"].endswith(".modeling_kallm")
    assert result["class"] == type(saved[name][1]).__name__
    assert result["max_abs_diff"] == 0.0
    assert result["kan_tensors_equal"]
    assert result["tied"] == saved[name][1].config.tie_word_embeddings


@pytest.mark.parametrize("name", CASES)
def test_fresh_process_with_kallm_loads_natively(saved, with_kallm, name):
    assert with_kallm["kallm_importable"] is True
    result = with_kallm["models"][name]
    assert result["module"] == "kallm.core.modeling_kallm"
    assert result["class"] == type(saved[name][1]).__name__
    assert result["max_abs_diff"] == 0.0
    assert result["kan_tensors_equal"]
    assert result["tied"] == saved[name][1].config.tie_word_embeddings


@pytest.mark.parametrize("process", ["without_kallm", "with_kallm"])
def test_fresh_process_tokenizer_and_refused_checkpoints(process, request):
    results = request.getfixturevalue(process)
    assert results["tokenizer_ids"] == [4, 8]
    for name, message in REFUSED_IN_FRESH_PROCESSES.items():
        assert message in (results["refused"][name] or "nothing raised"), name
