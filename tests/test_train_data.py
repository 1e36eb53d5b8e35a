"""Chat data for training: loading, bad rows, assistant-only masks, packing, batching."""

from __future__ import annotations

import json

import pytest
import torch

import kallm
from kallm.data.chat import (
    IGNORE_INDEX,
    ChatCollator,
    clean_messages,
    load_conversations,
    pack,
    prepare_chat_dataset,
    render_segments,
    tokenize_conversation,
)
from kallm.testing.data import conversation
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import chat_tokenizer
from kallm.train import check_packing_support


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def masked_text(tokenizer, ids, mask):
    return tokenizer.decode([i for i, m in zip(ids, mask) if m])


# --- assistant masks -------------------------------------------------------------------------


def test_mask_covers_exactly_the_assistant_replies():
    tokenizer = chat_tokenizer()
    messages = conversation("Hi", "Hello!", "Add 2 and 3.", "5")["messages"]
    ids, mask = tokenize_conversation(tokenizer, messages)
    assert ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
    assert masked_text(tokenizer, ids, mask) == "Hello!<|im_end|>\n5<|im_end|>\n"
    unmasked = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert "Add 2 and 3." in unmasked and "Be brief." in unmasked and "<|im_start|>assistant\n" in unmasked


def test_tokens_before_each_reply_are_the_generation_prompt():
    tokenizer = chat_tokenizer()
    messages = conversation("one", "two", "three", "four")["messages"]
    ids, mask = tokenize_conversation(tokenizer, messages)
    for k in (1, 3):
        prompt = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert ids[: len(prompt_ids)] == prompt_ids
        assert mask[len(prompt_ids) - 1] == 0 and mask[len(prompt_ids)] == 1


def test_system_turn_and_template_without_default_system():
    template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    tokenizer = chat_tokenizer(template)
    messages = [{"role": "system", "content": "S"}, *conversation("q", "a")["messages"]]
    segments = render_segments(tokenizer, messages)
    assert segments == [("[system]S</s>", False), ("[user]q</s>", False), ("[assistant]", False), ("a</s>", True)]


def test_template_that_rewrites_history_is_skipped_not_mislabelled():
    # Renders only the latest assistant turn in full, like templates that drop old reasoning.
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[a]...</s>"
                "{% else %}[{{ m['role'][0] }}]{{ m['content'] }}</s>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}[a]{% endif %}")
    tokenizer = chat_tokenizer(template)
    rows = [conversation("q", "long answer", "q2", "b"), conversation("q", "only one reply")]
    dataset, stats = prepare_chat_dataset(rows, tokenizer, max_length=200)
    assert stats.skipped == {"template_mismatch": 1} and stats.kept == 1


@pytest.mark.integration
@pytest.mark.all_threads  # the real model gains from every core
def test_smollm2_template_mask(smollm2, data_dir):
    _, tokenizer = smollm2
    rows = [json.loads(line) for line in (data_dir / "chat/oasst_en100/best_path.jsonl").read_text().splitlines()]
    multi_turn = next(row["messages"] for row in rows if len(row["messages"]) >= 4)
    ids, mask = tokenize_conversation(tokenizer, multi_turn)
    # Piecewise tokenization matches tokenizing the whole rendered conversation for this template.
    assert ids == tokenizer.apply_chat_template(multi_turn, tokenize=True, return_dict=True)["input_ids"]
    replies = [m["content"] + "<|im_end|>\n" for m in multi_turn if m["role"] == "assistant"]
    assert masked_text(tokenizer, ids, mask) == "".join(replies)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(m == 0 for i, m in zip(ids, mask) if i == im_start)


# --- loading and bad data ----------------------------------------------------------------------


def test_clean_messages_reasons():
    assert clean_messages(None) == (None, "no_messages")
    assert clean_messages("hi") == (None, "no_messages")
    assert clean_messages([]) == (None, "empty")
    assert clean_messages([{"role": "user"}]) == (None, "bad_message")
    assert clean_messages([{"role": "human", "content": "x"}]) == (None, "unknown_role")
    assert clean_messages([{"role": "user", "content": "x"}]) == (None, "no_assistant")
    messages = [{"role": "user", "content": "x", "name": "u"}, {"role": "assistant", "content": "y"}]
    kept, reason = clean_messages(messages)
    assert reason is None and kept == [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


def test_bad_rows_are_counted_and_skipped(tmp_path):
    tokenizer = chat_tokenizer()
    good = [conversation("What is 2+2?", "4"), conversation("Hi", "Hello", "Bye", "Bye!")]
    bad = [
        {"id": 1},                                                          # no_messages
        {"messages": "hello"},                                              # no_messages
        {"messages": []},                                                   # empty
        {"messages": [{"role": "human", "content": "x"}, {"role": "gpt", "content": "y"}]},  # unknown_role
        {"messages": [{"role": "user", "content": "only a question"}]},     # no_assistant
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},  # bad_message
        "{not json",                                                        # invalid_json
        conversation("q" * 200, "never reached"),                           # too_long: no reply token left
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", good[:1] + bad + good[1:])
    dataset, stats = prepare_chat_dataset(str(path), tokenizer, max_length=120)
    assert stats.rows == 10 and stats.kept == 2
    assert stats.skipped == {"no_messages": 2, "empty": 1, "unknown_role": 1, "no_assistant": 1, "bad_message": 1,
                             "invalid_json": 1, "too_long": 1}
    assert len(dataset) == 2 and set(dataset.column_names) == {"input_ids", "labels", "length"}
    assert stats.tokens == sum(dataset["length"])
    assert stats.assistant_tokens == sum(sum(label != IGNORE_INDEX for label in labels) for labels in dataset["labels"])


def test_long_conversations_truncated_or_skipped(tmp_path):
    tokenizer = chat_tokenizer()
    rows = [conversation("short", "a" * 100), conversation("ok", "fine")]
    dataset, stats = prepare_chat_dataset(rows, tokenizer, max_length=60, truncation="truncate")
    assert stats.kept == 2 and stats.truncated == 1 and max(dataset["length"]) == 60
    dataset, stats = prepare_chat_dataset(rows, tokenizer, max_length=60, truncation="skip")
    assert stats.kept == 1 and stats.skipped == {"too_long": 1} and stats.truncated == 0
    with pytest.raises(ValueError, match="valid choices: truncate, skip"):
        prepare_chat_dataset(rows, tokenizer, max_length=60, truncation="cut")


def test_empty_dataset_is_a_clear_error(tmp_path):
    tokenizer = chat_tokenizer()
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}, {"text": "plain"}])
    with pytest.raises(ValueError, match=r"bad.jsonl\) holds no valid conversation \(2 rows\): 1 empty \(.*; "
                                         r"first at .*bad.jsonl line 1\), 1 no_messages \(.*first at .*bad.jsonl line 2"):
        prepare_chat_dataset(str(path), tokenizer)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"holds no valid conversation \(0 rows\): it has no rows"):
        prepare_chat_dataset(str(tmp_path / "empty.jsonl"), tokenizer)


def test_a_file_of_invalid_lines_is_reported_like_some_invalid_lines(tmp_path):
    tokenizer = chat_tokenizer()
    path = tmp_path / "broken.jsonl"
    path.write_text("\n{not json\n[1, 2\n")  # every line invalid, the first at line 2
    with pytest.raises(ValueError, match=r"holds no valid conversation \(2 rows\): 2 invalid_json \(a line of a "
                                         r"JSONL file is not valid JSON; first at .*broken.jsonl line 2\)$"):
        prepare_chat_dataset(str(path), tokenizer)
    path.write_text(path.read_text() + json.dumps(conversation("a", "b")) + "\n")
    _, stats = prepare_chat_dataset(str(path), tokenizer)
    assert stats.kept == 1 and stats.skipped == {"invalid_json": 2}
    assert stats.first_skipped == {"invalid_json": f"{path} line 2"}
    assert f"2 invalid_json (first at {path} line 2)" in stats.describe()


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    rows = [conversation("a", "b"), conversation("c", "d")]
    jsonl, json_list = tmp_path / "bom.jsonl", tmp_path / "bom.json"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8-sig")
    json_list.write_text(json.dumps(rows), encoding="utf-8-sig")
    for path in (jsonl, json_list):
        assert load_conversations(str(path))["skip"] == ["", ""], path


def test_local_formats_folders_and_globs(tmp_path):
    from datasets import Dataset

    rows = [conversation("a", "b"), conversation("c", "d"), conversation("e", "f")]
    (tmp_path / "one.json").write_text(json.dumps(rows[:2]))
    write_jsonl(tmp_path / "two.jsonl", rows[2:])
    assert len(load_conversations(str(tmp_path))) == 3
    assert len(load_conversations(str(tmp_path / "*.jsonl"))) == 1
    assert len(load_conversations(str(tmp_path), limit=2)) == 2
    parquet = tmp_path / "pq"
    parquet.mkdir()
    Dataset.from_list(rows).to_parquet(str(parquet / "rows.parquet"))
    loaded = load_conversations(str(parquet / "rows.parquet"))
    assert loaded["messages"] == [r["messages"] for r in rows] and loaded["skip"] == ["", "", ""]
    assert len(load_conversations(Dataset.from_list(rows), limit=1)) == 1


def test_loading_errors(tmp_path):
    from datasets import Dataset

    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_conversations(str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="valid formats: .jsonl, .json, .parquet"):
        load_conversations(str(tmp_path / "data.csv"))
    (tmp_path / "obj.json").write_text('{"messages": []}')
    with pytest.raises(ValueError, match="JSON list of rows"):
        load_conversations(str(tmp_path / "obj.json"))
    with pytest.raises(ValueError, match="no 'messages' column"):
        load_conversations(Dataset.from_dict({"text": ["x"]}))
    with pytest.raises(TypeError, match="data must be"):
        load_conversations(42)
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer = chat_tokenizer()
        tokenizer.chat_template = None
        prepare_chat_dataset([conversation("a", "b")], tokenizer)


def test_hub_id_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([conversation("hi", "hello")])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_conversations("HuggingFaceTB/smol-smoltalk")) == 1
    load_conversations("someone/chat:subset", split="test")
    assert calls == [("HuggingFaceTB/smol-smoltalk", None, "train"), ("someone/chat", "subset", "test")]


def test_real_local_chat_data(data_dir):
    tokenizer = chat_tokenizer()
    dataset, stats = prepare_chat_dataset(str(data_dir / "chat/hh_rlhf_helpful"), tokenizer, max_length=256,
                                          limit=200)
    assert stats.rows == 200 and stats.kept + sum(stats.skipped.values()) == 200 and stats.kept > 150
    assert max(dataset["length"]) <= 256 and stats.assistant_tokens > 0


# --- packing and batching -------------------------------------------------------------------------


def test_packing_keeps_every_conversation_whole():
    tokenizer = chat_tokenizer()
    rows = [conversation("q" * n, "a" * (n % 7 + 1)) for n in range(1, 30)]
    plain, _ = prepare_chat_dataset(rows, tokenizer, max_length=160)
    packed, stats = prepare_chat_dataset(rows, tokenizer, max_length=160, packing=True)
    assert stats.packed_rows == len(packed) < len(plain)
    assert max(packed["length"]) <= 160
    pieces = []
    for ids, labels, positions in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            assert positions[a:b] == list(range(b - a))
            assert labels[a] == IGNORE_INDEX
            pieces.append((tuple(ids[a:b]), tuple(labels[a + 1:b])))
    expected = [(tuple(ids), tuple(labels[1:])) for ids, labels in zip(plain["input_ids"], plain["labels"])]
    assert sorted(pieces) == sorted(expected)
    # Best fit: total length fills the rows well.
    assert sum(packed["length"]) / (160 * len(packed)) > 0.8


def test_pack_rejects_rows_longer_than_max_length():
    from datasets import Dataset

    with pytest.raises(ValueError, match="more than max_length=4"):
        pack(Dataset.from_dict({"input_ids": [[1] * 5], "labels": [[1] * 5], "length": [5]}), 4)


def test_collator_pads_and_masks():
    collate = ChatCollator(pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    packed = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
                      {"input_ids": [8], "labels": [-100], "position_ids": [0]}])
    assert "attention_mask" not in packed
    assert packed["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]


def test_packed_batch_scores_like_separate_sequences():
    tokenizer = chat_tokenizer()
    model = kallm.retrofit(tiny_model("llama"), last_n=1)
    rows = [conversation("hello", "hi"), conversation("two plus two", "four"), conversation("x", "y")]
    packed, _ = prepare_chat_dataset(rows, tokenizer, max_length=64, packing=True)
    plain, _ = prepare_chat_dataset(rows, tokenizer, max_length=64)
    batch = ChatCollator(tokenizer.pad_token_id)([packed[i] for i in range(len(packed))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        for ids in plain["input_ids"]:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            row = next(r for r, row_ids in enumerate(batch["input_ids"].tolist())
                       if any(row_ids[s:s + len(ids)] == ids for s in range(len(row_ids))))
            row_ids = batch["input_ids"][row].tolist()
            start = next(s for s in range(len(row_ids)) if row_ids[s:s + len(ids)] == ids)
            assert torch.allclose(logits[row, start:start + len(ids)], alone, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "phi3", "gpt2", "gpt_neox"])
def test_packing_supported_by_position_id_families(kind):
    check_packing_support(tiny_model(kind))


def test_packing_refused_where_positions_come_from_the_mask():
    # OPT derives positions from the attention mask, so packed conversations would see each other.
    with pytest.raises(ValueError, match="opt models do not separate packed sequences"):
        check_packing_support(tiny_model("opt"))
