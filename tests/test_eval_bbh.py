"""BBH loading, prompts, batched generation, log-likelihood scoring and per-task accounting."""

from __future__ import annotations

import json

import pytest
import torch

from kallm.eval import bbh
from kallm.testing.data import TOY, write_tasks
from kallm.testing.models import chat_model, tiny_model
from kallm.testing.tokenizers import make_tiny_tokenizer

# ----------------------------------------------------------------------------- loading


def test_load_local_folder_all_tasks_sorted(tmp_path):
    data = bbh.load_bbh(write_tasks(tmp_path, TOY))
    assert list(data) == sorted(TOY)
    assert data["hyperbaton"] == TOY["hyperbaton"]


def test_load_original_repository_layout_selection_and_limit(tmp_path):
    write_tasks(tmp_path / "bbh", TOY)
    data = bbh.load_bbh(tmp_path, tasks="object_counting, boolean_expressions", limit=2)
    assert list(data) == ["object_counting", "boolean_expressions"]
    assert data["boolean_expressions"] == TOY["boolean_expressions"][:2]
    assert bbh.load_bbh(tmp_path, tasks=["hyperbaton"])["hyperbaton"] == TOY["hyperbaton"]


def test_load_errors(tmp_path):
    write_tasks(tmp_path / "data", TOY)
    with pytest.raises(ValueError, match="unknown BBH task.*navigate.*available: boolean_expressions, hyperbaton"):
        bbh.load_bbh(tmp_path / "data", tasks="navigate")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no BBH task files"):
        bbh.load_bbh(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="BBH folder not found"):
        bbh.load_bbh(tmp_path / "missing")
    with pytest.raises(ValueError, match="not both"):
        bbh.load_bbh(tmp_path / "data", dataset="lukaemon/bbh")
    with pytest.raises(ValueError, match="limit must be a positive"):
        bbh.load_bbh(tmp_path / "data", limit=0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "navigate.json").write_text(json.dumps([{"input": "x", "target": "y"}]))
    with pytest.raises(ValueError, match="not a BBH task file"):
        bbh.load_bbh(tmp_path / "bad")
    (tmp_path / "bad" / "navigate.json").write_text(json.dumps({"examples": [{"question": "x"}]}))
    with pytest.raises(ValueError, match="lacks 'input' or 'target'"):
        bbh.load_bbh(tmp_path / "bad")
    (tmp_path / "bad" / "navigate.json").write_text(json.dumps({"examples": []}))
    with pytest.raises(ValueError, match="'navigate' .* has no examples"):
        bbh.load_bbh(tmp_path / "bad")


def test_load_shared_data(data_dir):
    data = bbh.load_bbh(data_dir / "bbh", limit=3)  # the original layout: bbh/<task>.json
    assert len(data) == 20 and set(data) <= set(bbh.TASKS)
    assert all(len(examples) == 3 for examples in data.values())
    assert bbh.load_bbh(data_dir / "bbh" / "bbh", tasks="dyck_languages")["dyck_languages"][0]["target"]


def test_load_hub_configs(monkeypatch):
    import datasets
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, repo_type: ["README.md", "data/x.parquet"])

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return [{"input": f"{config} question", "target": "True", "extra": 1}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = bbh.load_bbh(tasks="navigate,web_of_lies")
    assert calls == [(bbh.DEFAULT_HUB_DATASET, "navigate", "test"), (bbh.DEFAULT_HUB_DATASET, "web_of_lies", "test")]
    assert data["web_of_lies"] == [{"input": "web_of_lies question", "target": "True"}]
    with pytest.raises(ValueError, match="unknown BBH task.*nope.*word_sorting"):
        bbh.load_bbh(tasks="nope")


def test_a_missing_folder_named_like_a_hub_id_is_never_looked_up_on_the_hub(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *a, **k: pytest.fail("the hub was asked"))
    with pytest.raises(FileNotFoundError, match=r"BBH folder not found: missing/bbh \(a hub dataset is read with"):
        bbh.load_bbh("missing/bbh")


def test_load_hub_task_json_files(monkeypatch, tmp_path):
    import huggingface_hub

    write_tasks(tmp_path, TOY)
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo, repo_type: ["bbh/hyperbaton.json", "bbh/object_counting.json", "other.json"])
    downloads = []

    def download(repo, name, repo_type):
        downloads.append(name)
        return tmp_path / name.split("/")[-1]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    data = bbh.load_bbh(dataset="someone/bbh-json")
    assert list(data) == ["hyperbaton", "object_counting"] and downloads == ["bbh/hyperbaton.json",
                                                                          "bbh/object_counting.json"]
    assert data["hyperbaton"] == TOY["hyperbaton"]


# ----------------------------------------------------------------------------- prompts and model calls


def test_build_prompt_uses_the_chat_template(tiny_tokenizer):
    prompt = bbh.build_prompt(tiny_tokenizer, "Is it?")
    assert prompt == "<|im_start|>user\nIs it?<|im_end|>\n<|im_start|>assistant\n"
    tiny_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        bbh.build_prompt(tiny_tokenizer, "Is it?")


QUESTIONS = ["Is 1+1 2?", "(A) one (B) two", "hello there, kenobi?", "x", "not ( True ) is"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_left_padded_generation_equals_one_by_one(family, tiny_tokenizer):
    model = chat_model(family)
    tiny_tokenizer.padding_side = "right"
    prompts = [bbh.build_prompt(tiny_tokenizer, q) for q in QUESTIONS]
    batched = bbh.generate_replies(model, tiny_tokenizer, prompts, batch_size=3, max_new_tokens=10)
    single = [bbh.generate_replies(model, tiny_tokenizer, [p], batch_size=1, max_new_tokens=10)[0] for p in prompts]
    assert batched == single
    assert any(batched)  # a random model says something
    assert tiny_tokenizer.padding_side == "right"  # restored


def test_generation_is_greedy_decoding(tiny_tokenizer):
    model = chat_model("llama")
    prompt = bbh.build_prompt(tiny_tokenizer, "hi")
    reply = bbh.generate_replies(model, tiny_tokenizer, [prompt], max_new_tokens=6)[0]
    ids = tiny_tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(6):
            next_id = model(ids).logits[0, -1].argmax()
            if next_id == tiny_tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    expected = tiny_tokenizer.decode(ids[0, len(tiny_tokenizer(prompt, add_special_tokens=False).input_ids):],
                                     skip_special_tokens=True)
    assert reply == expected.strip()


def naive_logprob(model, tokenizer, prompt, continuation):
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = prompt_ids + tokenizer(continuation, add_special_tokens=False).input_ids
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(float(logprobs[position - 1, ids[position]]) for position in range(len(prompt_ids), len(ids)))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_choice_logprobs_match_full_sequence_scoring(family, tiny_tokenizer):
    model = chat_model(family)
    prompts = [bbh.build_prompt(tiny_tokenizer, q) for q in QUESTIONS[:4]]
    choices = [["(A)", "(B)"], ["True", "False", "maybe so"], ["a", "bcd"], ["xyz"]]
    scores = bbh.choice_logprobs(model, tiny_tokenizer, prompts, choices, batch_size=3)
    expected = [[naive_logprob(model, tiny_tokenizer, p, c) for c in options] for p, options in zip(prompts, choices)]
    assert [len(row) for row in scores] == [2, 3, 2, 1]
    assert sum(scores, []) == pytest.approx(sum(expected, []), abs=1e-4)


def test_choice_logprobs_errors(tiny_tokenizer):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="2 prompts but 1 choice lists"):
        bbh.choice_logprobs(model, tiny_tokenizer, ["a", "b"], [["x"]])
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        bbh.choice_logprobs(model, tiny_tokenizer, ["a"], [["x", ""]])
    with pytest.raises(ValueError, match="batch_size"):
        bbh.generate_replies(model, tiny_tokenizer, ["a"], batch_size=0, max_new_tokens=1)


# ----------------------------------------------------------------------------- evaluation


def test_generate_mode_accounting(monkeypatch, tiny_tokenizer):
    replies = {
        "True and False is": "The answer is False.", "not False is": "False", "True or False is": "True",
        "Which?\nOptions:\n(A) red big\n(B) big red": "(B)", "Which?\nOptions:\n(A) old car\n(B) car old": "car old",
        "I have a cat and a dog. How many?": "You have 2 animals.",
    }
    seen = {}

    def scripted(model, tokenizer, prompts, *, batch_size, max_new_tokens, progress, desc):
        seen.update(batch_size=batch_size, max_new_tokens=max_new_tokens)
        return [next(reply for question, reply in replies.items() if f"user\n{question}<" in p) for p in prompts]

    monkeypatch.setattr(bbh, "generate_replies", scripted)
    result = bbh.evaluate_bbh(None, tiny_tokenizer, TOY, batch_size=5, max_new_tokens=7, progress=False)
    assert seen == {"batch_size": 5, "max_new_tokens": 7}
    assert result["tasks"]["boolean_expressions"] == {"accuracy": 2 / 3, "correct": 2, "total": 3, "skipped": 0}
    assert result["tasks"]["hyperbaton"]["correct"] == 1  # "car old" names option (B)'s text, not (A)'s
    assert result["tasks"]["object_counting"]["accuracy"] == 1.0
    assert result["average"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert result["skipped_tasks"] == {}
    record = result["examples"][0]
    assert record == {"task": "boolean_expressions", "index": 0, "target": "False", "response": "The answer is False.",
                      "predicted": "false", "correct": True}


def test_loglik_mode_picks_the_most_likely_choice_and_skips_free_form(tiny_tokenizer):
    model = chat_model("llama")
    data = {**TOY, "hyperbaton": TOY["hyperbaton"] + [{"input": "Which?\nOptions:\n(A) x\n(B) y", "target": "odd"}]}
    result = bbh.evaluate_bbh(model, tiny_tokenizer, data, mode="loglik", batch_size=2, progress=False)
    assert result["mode"] == "loglik"
    assert set(result["tasks"]) == {"boolean_expressions", "hyperbaton"}
    assert "object_counting" in result["skipped_tasks"] and "free-form" in result["skipped_tasks"]["object_counting"]
    assert result["tasks"]["hyperbaton"]["total"] == 2 and result["tasks"]["hyperbaton"]["skipped"] == 1
    for record in result["examples"]:
        example = data[record["task"]][record["index"]]
        prompt = bbh.build_prompt(tiny_tokenizer, example["input"])
        expected = [naive_logprob(model, tiny_tokenizer, prompt, choice) for choice in record["choices"]]
        assert record["logprobs"] == pytest.approx(expected, abs=1e-4)
        assert record["predicted"] == record["choices"][max(range(len(expected)), key=expected.__getitem__)]
        assert record["correct"] == (record["predicted"] == example["target"])
    accuracies = [entry["accuracy"] for entry in result["tasks"].values()]
    assert result["average"] == pytest.approx(sum(accuracies) / 2)


def test_loglik_mode_all_free_form(tiny_tokenizer):
    result = bbh.evaluate_bbh(tiny_model("llama"), tiny_tokenizer, {"object_counting": TOY["object_counting"]},
                              mode="loglik", progress=False)
    assert result["tasks"] == {} and result["average"] is None and list(result["skipped_tasks"]) == ["object_counting"]


def test_evaluate_bbh_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="unknown BBH mode 'beam'; choose one of: generate, loglik"):
        bbh.evaluate_bbh(None, tiny_tokenizer, TOY, mode="beam")
    with pytest.raises(ValueError, match="no BBH tasks"):
        bbh.evaluate_bbh(None, tiny_tokenizer, {})


def test_generate_mode_end_to_end_on_a_tiny_model():
    tokenizer = make_tiny_tokenizer()
    model = chat_model("llama")
    result = bbh.evaluate_bbh(model, tokenizer, TOY, batch_size=4, max_new_tokens=5, progress=False)
    prompts = [bbh.build_prompt(tokenizer, e["input"]) for examples in TOY.values() for e in examples]
    replies = [bbh.generate_replies(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert [record["response"] for record in result["examples"]] == replies
    assert [record["correct"] for record in result["examples"]] == [
        bbh.is_correct(reply, e["target"], e["input"])
        for reply, e in zip(replies, [e for examples in TOY.values() for e in examples])
    ]
    assert sum(entry["total"] for entry in result["tasks"].values()) == 6
    assert any(replies)
