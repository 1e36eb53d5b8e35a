"""``kallm.train.train`` on tiny models: learning, saving, resume, accumulation, distillation."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from transformers import TrainerCallback

import kallm
from kallm.testing.data import sums
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import chat_tokenizer
from kallm.train import TrainConfig, train


def retrofitted(seed=0):
    return kallm.retrofit(tiny_model("llama", seed=seed), last_n=1)


def quick(tmp_path, name="run", **overrides):
    settings = dict(output_dir=str(tmp_path / name), max_steps=4, batch_size=4, learning_rate=3e-3, warmup=0,
                    logging_steps=1, save_steps=100, progress_bar=False, seed=0)
    return TrainConfig(**{**settings, **overrides})


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def assert_same_weights(a, b, atol=0.0):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.allclose(state_a[key], state_b[key], atol=atol, rtol=0), key


def test_train_learns_saves_and_reloads(tmp_path):
    model, tokenizer = retrofitted(), chat_tokenizer()
    before = copy.deepcopy(model)
    result = train(model, tokenizer, sums(), quick(tmp_path, max_steps=24, logging_steps=4))

    losses = [entry["loss"] for entry in read_jsonl(result.metrics_file) if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0] and losses == sorted(losses, reverse=True)
    assert result.global_step == 24 and result.world_size == 1
    assert result.data["kept"] == 48 and result.data["skipped"] == {}
    assert result.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # tail+embeddings: the retrofitted last block, embeddings and final norm moved; earlier blocks did not.
    changed = {name for name, p in model.named_parameters()
               if not torch.equal(p, before.get_parameter(name))}
    assert any(name.startswith("model.layers.2.") for name in changed)
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= changed
    assert not any(name.startswith(("model.layers.0.", "model.layers.1.")) for name in changed)

    summary = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert summary["global_step"] == 24 and summary["config"]["trainable"] == "tail+embeddings"
    reloaded, reloaded_tokenizer = kallm.load_model(str(tmp_path / "run"))
    assert type(reloaded) is type(model)
    assert_same_weights(reloaded, model)
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_reproduces_an_uninterrupted_run(tmp_path, capsys):
    tokenizer, data = chat_tokenizer(), sums()
    settings = dict(max_steps=6, save_steps=3, save_total_limit=None)
    full_model = retrofitted()
    full = train(full_model, tokenizer, data, quick(tmp_path, "full", **settings))

    # Interrupted after step 4 (last checkpoint at step 3), then resumed in a fresh model object.
    train(retrofitted(), tokenizer, data, quick(tmp_path, "cut", **settings), callbacks=[StopAt(4)])
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-3"]
    # a later checkpoint cut off while saving: everything but trainer_state.json, which the Trainer writes last
    shutil.copytree(tmp_path / "cut" / "checkpoint-3", tmp_path / "cut" / "checkpoint-5",
                    ignore=shutil.ignore_patterns("trainer_state.json"))
    capsys.readouterr()
    resumed_model = retrofitted(seed=1)  # weights come from the checkpoint, not from here
    resumed = train(resumed_model, tokenizer, data, quick(tmp_path, "cut", resume=True, **settings))
    assert capsys.readouterr().out.startswith(f"resuming from {tmp_path / 'cut' / 'checkpoint-3'} (passed over the "
                                              f"incomplete checkpoint-5)")

    assert resumed.global_step == 6
    assert_same_weights(resumed_model, full_model)
    assert resumed.metrics["last_logged_loss"] == full.metrics["last_logged_loss"]
    steps = [entry["step"] for entry in read_jsonl(resumed.metrics_file) if "loss" in entry]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    tokenizer, data = chat_tokenizer(), sums(24)
    big, accumulated = retrofitted(), retrofitted()
    train(big, tokenizer, data, quick(tmp_path, "big", max_steps=3, batch_size=4))
    train(accumulated, tokenizer, data, quick(tmp_path, "acc", max_steps=3, batch_size=2, grad_accum=2))
    assert_same_weights(big, accumulated, atol=1e-5)


def test_packing_and_length_grouping_train(tmp_path):
    tokenizer, data = chat_tokenizer(), sums()
    packed = train(retrofitted(), tokenizer, data, quick(tmp_path, "packed", packing=True, max_length=128))
    assert 0 < packed.data["packed_rows"] < 48 and packed.global_step == 4
    grouped = train(retrofitted(), tokenizer, data, quick(tmp_path, "grouped", group_by_length=True))
    assert grouped.global_step == 4 and grouped.data["packed_rows"] is None


def test_bf16_flag_trains_on_cpu(tmp_path):
    result = train(retrofitted(), chat_tokenizer(), sums(8), quick(tmp_path, bf16=True, max_steps=2))
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.metrics["train_loss"]))


class ForwardSpy(TrainerCallback):
    """Records whether the model's forward is wrapped (by autocast) at each training step."""

    def __init__(self):
        self.wrapped = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.wrapped.append("forward" in vars(model))


def test_bf16_training_hands_back_the_model_its_checkpoint_loads(tmp_path):
    model, tokenizer = retrofitted(), chat_tokenizer()
    first = ForwardSpy()
    train(model, tokenizer, sums(8), quick(tmp_path, bf16=True, max_steps=1), callbacks=[first])
    assert first.wrapped == [True] and "forward" not in vars(model)  # autocast while training only
    reloaded, _ = kallm.load_model(str(tmp_path / "run"))
    ids = torch.tensor([tokenizer("1+2=3, 4+5=9")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, reloaded(ids).logits)
    second = ForwardSpy()  # trained again, the model is wrapped again
    train(model, tokenizer, sums(8), quick(tmp_path, "again", bf16=True, max_steps=1), callbacks=[second])
    assert second.wrapped == [True] and "forward" not in vars(model)


# --- distillation ---------------------------------------------------------------------------------


def test_distillation_from_an_identical_teacher_starts_at_zero_kl(tmp_path):
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    result = train(student, chat_tokenizer(), sums(), quick(tmp_path, trainable="all", distill_alpha=1.0),
                   teacher=teacher)
    first = next(entry for entry in result.log_history if "distill_kl" in entry)
    assert first["step"] == 1 and abs(first["distill_kl"]) < 1e-6 and first["distill_ce"] > 1.0
    assert abs(first["loss"]) < 1e-6


def test_distillation_with_alpha_zero_is_plain_training(tmp_path):
    tokenizer, data = chat_tokenizer(), sums()
    plain, distilled = retrofitted(), retrofitted()
    train(plain, tokenizer, data, quick(tmp_path, "plain", grad_accum=2, batch_size=2))
    train(distilled, tokenizer, data, quick(tmp_path, "distilled", grad_accum=2, batch_size=2, distill_alpha=0.0),
          teacher=tiny_model("llama"))
    assert_same_weights(plain, distilled, atol=1e-5)


def test_distillation_heals_towards_the_teacher(tmp_path):
    teacher = tiny_model("llama")
    student = kallm.retrofit(copy.deepcopy(teacher), last_n=1)
    result = train(student, chat_tokenizer(), sums(), quick(tmp_path, max_steps=16, distill_alpha=1.0,
                                                            logging_steps=4), teacher=teacher)
    kl = [entry["distill_kl"] for entry in result.log_history if "distill_kl" in entry]
    assert len(kl) == 4 and kl[-1] < 0.5 * kl[0]
    assert all(not p.requires_grad for p in teacher.parameters())


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    (dict(bf16=True, fp16=True), "at most one of bf16 and fp16"),
    (dict(trainable="head"), "trainable must be one of retrofitted, functions, tail, tail\\+embeddings, all"),
    (dict(truncation="cut"), "truncation must be one of truncate, skip"),
    (dict(distill_alpha=1.5), r"distill_alpha must be a finite number in \[0, 1\], got 1.5"),
    (dict(distill_temperature=0), "distill_temperature must be a finite number > 0"),
    (dict(max_length=1), "max_length must be an integer >= 2"),
    (dict(max_steps=0), r"max_steps must be an integer >= 1 \(or -1\)"),
    (dict(max_grad_norm=float("inf")), "max_grad_norm must be a finite number >= 0, got inf"),
    (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0"),
    (dict(seed=-1), "seed must be an integer in"),
    (dict(batch_size=2.0), "batch_size must be an integer >= 1"),
    (dict(lr_scheduler="step"), "lr_scheduler must be one of"),
])
def test_config_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_training_errors(tmp_path):
    tokenizer, data = chat_tokenizer(), sums(8)
    with pytest.raises(ValueError, match="needs a retrofitted model"):
        train(tiny_model("llama"), tokenizer, data, quick(tmp_path))
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        train(retrofitted(), tokenizer, data, quick(tmp_path, resume=True))
    with pytest.raises(FileNotFoundError, match="checkpoint to resume from not found"):
        train(retrofitted(), tokenizer, data, quick(tmp_path, resume=str(tmp_path / "nope")))
    teacher = tiny_model("llama")
    teacher.resize_token_embeddings(256)
    with pytest.raises(ValueError, match="teacher's vocabulary \\(256 tokens\\) differs"):
        train(retrofitted(), tokenizer, data, quick(tmp_path), teacher=teacher)
    with pytest.raises(ValueError, match="do not separate packed sequences"):
        train(kallm.retrofit(tiny_model("opt"), last_n=1), tokenizer, data, quick(tmp_path, packing=True))
    with pytest.raises(ValueError, match="holds no valid conversation"):
        train(retrofitted(), tokenizer, [{"messages": []}], quick(tmp_path))


def test_a_failed_final_save_keeps_the_previous_model_of_the_output_folder(tmp_path, monkeypatch):
    import transformers.modeling_utils

    tokenizer = chat_tokenizer()
    first = retrofitted()
    train(first, tokenizer, sums(8), quick(tmp_path, max_steps=1))
    ids = torch.tensor([tokenizer("1+2=3")["input_ids"]])
    with torch.no_grad():
        expected = first.eval()(ids).logits

    write_weights = transformers.modeling_utils.safe_save_file

    def fail_on_the_final_model(state_dict, filename, **kwargs):
        if "checkpoint-" in filename:  # the trainer's own checkpoints save fine
            return write_weights(state_dict, filename, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fail_on_the_final_model)
    with pytest.raises(OSError, match="No space left"):
        train(kallm.retrofit(tiny_model("llama", seed=1), last_n=2), tokenizer, sums(8), quick(tmp_path, max_steps=1))
    monkeypatch.undo()
    reloaded, _ = kallm.load_model(str(tmp_path / "run"))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


def test_the_model_read_and_a_model_that_diverged_are_never_saved_over(tmp_path):
    from kallm.checkpoints.save import save_checkpoint

    tokenizer, data = chat_tokenizer(), sums(8)
    save_checkpoint(retrofitted(), tokenizer, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    loaded, _ = kallm.load_model(str(tmp_path / "model"))
    for out in (tmp_path / "model", tmp_path / "model" / "trained"):
        with pytest.raises(ValueError, match="cannot write to .*: it (is|lies inside)"):
            train(loaded, tokenizer, data, quick(tmp_path, output_dir=str(out)))
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before

    diverged = retrofitted()
    with torch.no_grad():
        diverged.model.layers[2].mlp.layers[0].weight[0, 0] = float("nan")
    # the Trainer saves a checkpoint at the last step, before train() saves the model: both are refused
    with pytest.raises(ValueError, match=r"refusing to save checkpoint-1: the model holds NaN or infinite values in "
                                         r"model\.embed_tokens\.weight, .* and \d+ more"):  # it spread
        train(diverged, tokenizer, data, quick(tmp_path, max_steps=1))
    assert not list((tmp_path / "run").glob("checkpoint-*")) and not (tmp_path / "run" / "model.safetensors").exists()
