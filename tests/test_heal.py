"""``kallm.heal`` on tiny models: the shared prefix is exact, refusals change nothing, healing moves
towards the teacher, budgets, resume, progressive replacement, prefix cache and the data forms."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import kallm
from kallm.data.chat import tokenize_conversation
from kallm.healing import HealConfig, distillation_loss, healing_sequences, shared_prefix_logits
from kallm.surgery.architectures import architecture_for
from kallm.testing.data import TEXTS, conversation
from kallm.testing.models import TINY_CONFIGS, tiny_model
from kallm.testing.tokenizers import make_tiny_tokenizer

QUICK = dict(max_length=32, batch_size=2, progress_bar=False, learning_rate=3e-3, local_tokens=512)


def pair(family="llama", last_n=1, **options):
    teacher = tiny_model(family)
    return kallm.retrofit(copy.deepcopy(teacher), last_n=last_n, **options), teacher


def inputs_for(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in
                                                                    model.named_parameters()}


def assert_unchanged(model, saved):
    state, flags = saved
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_shared_prefix_gives_the_loss_and_gradients_of_full_forwards(family):
    student, teacher = pair(family)
    kallm.set_trainable(student, "retrofitted")
    architecture = architecture_for(family)
    blocks = student.get_submodule(architecture.blocks_path)
    inputs = inputs_for(student)

    with torch.no_grad():
        teacher_logits = teacher(**inputs, use_cache=False).logits
    full, *_ = distillation_loss(student(**inputs, use_cache=False).logits, teacher_logits, inputs["input_ids"],
                                 inputs["attention_mask"], temperature=2.0, ce_weight=0.5)
    full.backward()
    expected = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
    student.zero_grad(set_to_none=True)

    prefix_calls = []
    hooks = [m.register_forward_hook(lambda *a: prefix_calls.append(1)) for m in blocks[:2].modules()
             if m not in (blocks[0], blocks[1])]
    student_logits, shared_teacher_logits, hidden = shared_prefix_logits(student, teacher, architecture.blocks_path, 2,
                                                                         inputs)
    for hook in hooks:
        hook.remove()
    shared, *_ = distillation_loss(student_logits, shared_teacher_logits, inputs["input_ids"],
                                   inputs["attention_mask"], temperature=2.0, ce_weight=0.5)
    shared.backward()

    assert not prefix_calls, "the student's prefix blocks must not run"
    assert not hidden.requires_grad
    assert torch.allclose(shared, full, atol=1e-6, rtol=1e-5)
    assert expected
    for name, grad in expected.items():
        assert torch.allclose(student.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-4), name
    assert all("forward" not in block.__dict__ for block in blocks)  # the stand-ins are gone


@pytest.mark.parametrize("temperature, ce_weight", [(1.0, 0.0), (2.0, 0.0), (1.0, 0.3), (2.0, 0.5)])
def test_distillation_loss_equals_the_textbook_formula_on_real_tokens(temperature, ce_weight):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 7, 11, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 7, 11, generator=generator)
    ids = torch.randint(11, (2, 7), generator=generator)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    real, targets = mask.bool(), (mask[:, 1:] * mask[:, :-1]).bool()
    t = temperature
    kl = torch.nn.functional.kl_div(torch.log_softmax(student[real] / t, -1), torch.log_softmax(teacher[real] / t, -1),
                                    log_target=True, reduction="batchmean") * t * t
    ce = torch.nn.functional.cross_entropy(student[:, :-1][targets], ids[:, 1:][targets])
    (expected_grad,) = torch.autograd.grad(kl + ce_weight * ce, student)

    loss, logged_kl, logged_ce = distillation_loss(student, teacher, ids, mask, t, ce_weight)
    (grad,) = torch.autograd.grad(loss, student)

    assert logged_kl == pytest.approx(float(kl), rel=1e-5)
    assert logged_ce == pytest.approx(float(ce), rel=1e-5)
    assert torch.allclose(loss, kl + ce_weight * ce, rtol=1e-5)
    assert torch.allclose(grad, expected_grad, atol=1e-7, rtol=1e-4)
    assert not grad[1, 4:].any(), "padded positions must get no gradient"


def test_heal_moves_the_student_towards_the_teacher_and_writes_its_outputs(tmp_path):
    student, teacher = pair(init="random")
    before = snapshot(student)
    report = kallm.heal(student, teacher, make_tiny_tokenizer(), data=TEXTS, max_steps=30,
                        output_dir=str(tmp_path / "heal"), **QUICK)
    kls = [p["kl"] for p in report.curve if p["stage"] == "end_to_end"]
    assert report.steps == 30 and len(kls) == 30
    assert sum(kls[-5:]) < 0.5 * sum(kls[:5])
    assert report.shared_prefix and report.world_size == 1
    assert all(e["after"] <= e["before"] for e in report.local.values())
    assert 0 < report.tokens <= 30 * 2 * 32
    assert report.tokens_per_second > 0
    # only the retrofitted feedforward moved (default policy)
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[0][k])}
    assert changed and all(k.startswith("model.layers.2.mlp.") for k in changed)

    out = tmp_path / "heal"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(report.curve)
    assert (out / "heal_curve.png").stat().st_size > 1000
    assert json.loads((out / "heal_report.json").read_text())["steps"] == 30
    reloaded, _ = kallm.load_model(str(out))
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in reloaded.state_dict().items())


def test_heal_with_a_time_budget_stops_on_time():
    student, teacher = pair()
    report = kallm.heal(student, teacher, make_tiny_tokenizer(), data=TEXTS, minutes=0.03, **QUICK)
    assert 1.8 - 0.5 < report.seconds < 1.8 + 1.0
    assert report.steps > 1
    assert report.local_seconds <= 0.25 * 1.8 + 0.5


@pytest.mark.parametrize("settings, message", [
    (dict(), "needs a budget"),
    (dict(minutes=0), r"minutes must be a finite number > 0, got 0"),
    (dict(max_steps=0), "max_steps must be an integer >= 1"),
    (dict(max_steps=2.5), "max_steps must be an integer >= 1"),
    (dict(max_steps=1, max_grad_norm=-1), r"max_grad_norm must be a finite number >= 0, got -1"),
    (dict(max_steps=1, temperature=float("inf")), "temperature must be a finite number > 0, got inf"),
    (dict(max_steps=1, learning_rate=float("nan")), "learning_rate must be a finite number > 0, got nan"),
    (dict(max_steps=1, warmup=1.0), r"warmup must be a finite number in \[0, 1\)"),
    (dict(max_steps=1, seed=-1), "seed must be an integer in"),
    (dict(max_steps=1, local_tokens=0), "local_tokens must be an integer >= 1"),
    (dict(max_steps=1, trainable="head"), "trainable must be one of"),
    (dict(max_steps=1, bf16=True, fp16=True), "at most one of bf16 and fp16"),
    (dict(max_steps=1, save_steps=2), "need output_dir"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        HealConfig(**settings)


def test_refused_calls_leave_the_model_untouched(tmp_path):
    tokenizer = make_tiny_tokenizer()
    student, teacher = pair()
    saved = snapshot(student)
    other = tiny_model("llama", seed=1)
    calls = [
        (dict(model=tiny_model("llama"), teacher=teacher, data=TEXTS), ValueError, "no retrofitted block"),
        (dict(model=student, teacher=other, data=TEXTS), ValueError, "does not match the student"),
        (dict(model=student, teacher=student, data=TEXTS), ValueError, "separate model"),
        (dict(model=student, teacher=copy.deepcopy(student), data=TEXTS), ValueError, "itself retrofitted"),
        (dict(model=student, teacher=tiny_model("gpt2"), data=TEXTS), ValueError, "gpt2 model"),
        (dict(model=student, teacher=teacher, data=[]), ValueError, "data is empty"),
        (dict(model=student, teacher=teacher, data=["  ", "\n"]), ValueError, "tokenizes to nothing"),
        (dict(model=student, teacher=teacher, data=[1, 2]), TypeError, "only texts"),
        (dict(model=student, teacher=teacher, data=str(tmp_path / "missing.txt")), FileNotFoundError, "not found"),
        (dict(model=student, teacher=teacher, data=[{"messages": []}]), ValueError, "holds no valid conversation"),
        (dict(model=student, teacher=teacher, data=TEXTS, minutes=0), ValueError, "minutes must be a finite number > 0"),
        (dict(model=student, teacher=teacher, data=TEXTS, max_steps=1, max_grad_norm=-1), ValueError,
         "max_grad_norm must be a finite number >= 0"),
        (dict(model=student, teacher=teacher, data=TEXTS, resume=True, output_dir=str(tmp_path)),
         FileNotFoundError, "no checkpoint-N"),
    ]
    for call, error, message in calls:
        call.setdefault("max_steps", 2)
        with pytest.raises(error, match=message):
            kallm.heal(tokenizer=tokenizer, progress_bar=False, **call)
        assert_unchanged(student, saved)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_old_module_path_still_gives_every_name_it_gave():
    import importlib
    import sys

    sys.modules.pop("kallm.train.heal", None)
    with pytest.warns(FutureWarning, match="kallm.train.heal is now kallm.healing"):
        old = importlib.import_module("kallm.train.heal")
    for name in ("heal", "HealConfig", "HealReport", "distillation_loss", "healing_sequences", "shared_prefix_logits",
                 "prefix_replaced", "plot_curve", "CURVE_FILE", "METRICS_FILE", "REPORT_FILE"):
        assert getattr(old, name) is getattr(importlib.import_module("kallm.healing"), name), name


def test_kallm_heal_stays_callable_once_its_package_is_imported():
    import kallm.healing.loop  # noqa: F401  (the package's name is not the function's, so kallm.heal stays it)

    student, _ = pair()
    with pytest.raises(ValueError, match="separate model"):  # the call reached heal's own checks
        kallm.heal(student, student, make_tiny_tokenizer(), data=TEXTS, max_steps=1, progress_bar=False)


def test_a_teacher_of_another_vocabulary_is_refused_even_where_the_policy_trains_the_embeddings():
    student, teacher = pair()
    teacher.resize_token_embeddings(256)
    saved = snapshot(student)
    with pytest.raises(ValueError, match=r"teacher's vocabulary \(256 tokens\) differs"):
        kallm.heal(student, teacher, make_tiny_tokenizer(), data=TEXTS, max_steps=1, trainable="all", **QUICK)
    assert_unchanged(student, saved)


def test_a_teacher_may_differ_where_the_policy_trains():
    student, teacher = pair()
    with torch.no_grad():
        student.model.norm.weight.add_(0.1)  # as after an earlier tail+embeddings run
    tokenizer = make_tiny_tokenizer()
    with pytest.raises(ValueError, match="model.norm.weight differs"):
        kallm.heal(student, teacher, tokenizer, data=TEXTS, max_steps=1, progress_bar=False)
    report = kallm.heal(student, teacher, tokenizer, data=TEXTS, max_steps=1, trainable="tail+embeddings",
                        local_passes=0, **{k: v for k, v in QUICK.items() if k != "local_tokens"})
    assert not report.shared_prefix  # the tied embeddings train, so the prefix is not shared
    assert report.steps == 1


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    tokenizer = make_tiny_tokenizer()
    settings = dict(data=TEXTS, max_steps=6, save_steps=3, **QUICK)
    whole, teacher = pair()
    expected = kallm.heal(whole, teacher, tokenizer, output_dir=str(tmp_path / "whole"), **settings)

    class Interrupt(Exception):
        pass

    def interrupt(model, point):
        if point.get("step") == 4 and point["stage"] == "end_to_end":
            raise Interrupt

    first, _ = pair()
    with pytest.raises(Interrupt):
        kallm.heal(first, teacher, tokenizer, output_dir=str(tmp_path / "cut"), callbacks=[interrupt], **settings)
    assert (tmp_path / "cut" / "checkpoint-3").is_dir()
    again, _ = pair()
    resumed = kallm.heal(again, teacher, tokenizer, output_dir=str(tmp_path / "cut"), resume=True, **settings)
    assert resumed.steps == 6
    kls = [p["kl"] for p in resumed.curve if p["stage"] == "end_to_end"]
    assert kls == pytest.approx([p["kl"] for p in expected.curve if p["stage"] == "end_to_end"], rel=1e-5)
    for name, value in whole.state_dict().items():
        assert torch.allclose(again.state_dict()[name], value, atol=1e-6), name
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [p["step"] for p in expected.curve]


def test_progressive_replacement_starts_at_the_original_and_ends_with_the_new_feedforward():
    student, teacher = pair(init="random")
    report = kallm.heal(student, teacher, make_tiny_tokenizer(), data=TEXTS, max_steps=8, progressive=True,
                        local_passes=0, **QUICK)
    points = [p for p in report.curve if p["stage"] == "end_to_end"]
    assert points[0]["alpha"] == 0.0 and points[0]["kl"] < 1e-6  # the blend starts as the original itself
    assert points[-1]["alpha"] == 1.0
    mlp = student.model.layers[2].mlp
    assert not mlp._forward_hooks  # the blend is gone once healing ends
    inputs = inputs_for(student)
    with torch.no_grad():
        assert not torch.allclose(student(**inputs).logits, teacher(**inputs).logits, atol=1e-3)


def test_prefix_cache_gives_the_same_healing_and_says_what_it_holds(tmp_path):
    tokenizer = make_tiny_tokenizer()
    settings = dict(data=TEXTS[:1], max_steps=12, local_passes=0, **QUICK)  # 9 sequences: 2.7 epochs
    plain, teacher = pair()
    expected = kallm.heal(plain, teacher, tokenizer, **settings)
    cached, _ = pair()
    report = kallm.heal(cached, teacher, tokenizer, cache_dir=str(tmp_path / "cache"), **settings)
    files = sorted((tmp_path / "cache").glob("row-*.safetensors"))
    assert len(files) == report.data["sequences"]
    for name, value in plain.state_dict().items():
        assert torch.allclose(cached.state_dict()[name], value, atol=1e-5), name
    assert [p["kl"] for p in report.curve] == pytest.approx([p["kl"] for p in expected.curve], rel=1e-4)
    with pytest.raises(ValueError, match="other data or another model"):
        kallm.heal(pair()[0], teacher, tokenizer, cache_dir=str(tmp_path / "cache"),
                   **{**settings, "data": TEXTS[1:2]})


def test_prefix_cache_is_keyed_on_the_teachers_prefix_weights_not_its_name(tmp_path):
    tokenizer = make_tiny_tokenizer()
    settings = dict(data=TEXTS[:1], max_steps=2, local_passes=0, cache_dir=str(tmp_path / "cache"), **QUICK)
    student, teacher = pair()
    kallm.heal(student, teacher, tokenizer, **settings)
    kallm.heal(pair()[0], copy.deepcopy(teacher), tokenizer, **settings)  # the same weights: the states are reused
    other_teacher = tiny_model("llama", seed=1)  # the same name and shapes, other weights
    assert other_teacher.config._name_or_path == teacher.config._name_or_path
    other_student = kallm.retrofit(copy.deepcopy(other_teacher), last_n=1)
    with pytest.raises(ValueError, match="other data or another model"):
        kallm.heal(other_student, other_teacher, tokenizer, **settings)


def test_healing_data_forms(tmp_path):
    from datasets import Dataset

    tokenizer = make_tiny_tokenizer()
    config = HealConfig(max_steps=1, max_length=16, generate_tokens=40, progress_bar=False)
    sequences, stats = healing_sequences(TEXTS, tokenizer, config)
    assert stats["source"] == "texts" and all(s.numel() <= 16 for s in sequences)
    assert stats["tokens"] == sum(len(tokenizer(t)["input_ids"]) + 1 for t in TEXTS)
    (tmp_path / "book.txt").write_text(TEXTS[0])
    assert healing_sequences(str(tmp_path / "book.txt"), tokenizer, config)[1]["source"] == "text file"
    rows = [conversation("2+2=", "4"), conversation("hi", "hello there")]
    chat, stats = healing_sequences(rows, tokenizer, config)
    # long conversations are cut into pieces, not truncated: every token is kept
    assert stats["source"] == "chat" and all(s.numel() <= 16 for s in chat)
    assert stats["tokens"] == sum(len(tokenize_conversation(tokenizer, r["messages"])[0]) for r in rows)
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert healing_sequences(str(tmp_path / "chat.jsonl"), tokenizer, config)[1] == stats
    assert healing_sequences(Dataset.from_list(rows), tokenizer, config)[1]["source"] == "chat"
    assert healing_sequences(Dataset.from_dict({"text": TEXTS}), tokenizer, config)[1]["source"] == "dataset text"
    with pytest.raises(ValueError, match="neither a 'text' nor a 'messages' column"):
        healing_sequences(Dataset.from_dict({"body": TEXTS}), tokenizer, config)
    generated, stats = healing_sequences(None, tokenizer, config, teacher=tiny_model("llama"))
    assert stats["source"] == "generated" and stats["tokens"] >= 40


def test_bf16_heals_on_cpu():
    student, teacher = pair()
    report = kallm.heal(student, teacher, make_tiny_tokenizer(), data=TEXTS, max_steps=2, bf16=True, **QUICK)
    assert report.steps == 2 and all(p["kl"] >= 0 for p in report.curve if p["stage"] == "end_to_end")
    assert student.model.layers[2].mlp.layers[0].weight.dtype == torch.float32  # autocast, weights stay float32


def test_resume_passes_over_a_checkpoint_cut_off_while_saving(tmp_path, capsys):
    tokenizer = make_tiny_tokenizer()
    settings = dict(data=TEXTS, save_steps=2, local_passes=0, output_dir=str(tmp_path), **QUICK)
    student, teacher = pair()
    kallm.heal(student, teacher, tokenizer, max_steps=4, **settings)
    (tmp_path / "checkpoint-4" / "heal_state.json").unlink()  # as when the run is killed while saving it
    capsys.readouterr()
    report = kallm.heal(pair()[0], teacher, tokenizer, max_steps=6, resume=True, **settings)
    assert capsys.readouterr().out.startswith(f"resuming from {tmp_path / 'checkpoint-2'} (passed over the "
                                              f"incomplete checkpoint-4)\n")
    assert report.steps == 6 and [p["step"] for p in report.curve] == [1, 2, 3, 4, 5, 6]
    (tmp_path / "checkpoint-4" / "heal_state.json").write_text('{"step": 4, "tok')  # cut off while writing
    with pytest.raises(FileNotFoundError, match="checkpoint-4 is no complete checkpoint to resume from"):
        kallm.heal(pair()[0], teacher, tokenizer, max_steps=6, **{**settings, "resume": str(tmp_path / "checkpoint-4")})


def test_a_run_that_diverges_keeps_its_last_good_checkpoint(tmp_path):
    def diverge(model, point):
        if point["step"] == 2:
            with torch.no_grad():
                model.model.layers[2].mlp.layers[0].weight[0, 0] = float("nan")

    student, teacher = pair()
    with pytest.raises(ValueError, match=r"refusing to save to .*checkpoint-2: the model holds NaN or infinite values "
                                         r"in model.layers.2.mlp.layers.0.weight"):
        kallm.heal(student, teacher, make_tiny_tokenizer(), data=TEXTS, max_steps=3, save_steps=1, local_passes=0,
                   output_dir=str(tmp_path), callbacks=[diverge], **QUICK)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((tmp_path / "checkpoint-1" / "heal_state.json").read_text())["step"] == 1
    assert not (tmp_path / "config.json").exists()


def test_a_failed_save_of_the_healed_model_leaves_no_model_in_the_folder(tmp_path, monkeypatch):
    import transformers.modeling_utils

    def fail(state_dict, filename, metadata=None):
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fail)
    student, teacher = pair()
    with pytest.raises(OSError, match="No space left"):
        kallm.heal(student, teacher, make_tiny_tokenizer(), data=TEXTS, max_steps=1, local_passes=0,
                   output_dir=str(tmp_path / "heal"), **QUICK)
    assert sorted(p.name for p in (tmp_path / "heal").iterdir()) == ["heal_curve.png", "heal_report.json",
                                                                    "metrics.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["heal"]  # no staging folder left behind


def test_an_output_folder_overlapping_the_model_or_teacher_is_refused(tmp_path):
    tokenizer = make_tiny_tokenizer()
    student, teacher = pair()
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    before = {p.name: p.read_bytes() for p in (tmp_path / "student").iterdir()}
    loaded, _ = kallm.load_model(str(tmp_path / "student"))
    for out in (tmp_path / "student", tmp_path / "student" / "healed", tmp_path):
        with pytest.raises(ValueError, match="cannot write to .*: it (is|lies inside|holds)"):
            kallm.heal(loaded, teacher, tokenizer, data=TEXTS, max_steps=1, output_dir=str(out), **QUICK)
    assert {p.name: p.read_bytes() for p in (tmp_path / "student").iterdir()} == before
