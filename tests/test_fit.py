"""Function-preserving initialisation: ``retrofit(..., init="fit")`` fits each new KAN
feedforward to the MLP it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kallm
from kallm.core.layers import KANFeedForward
from kallm.surgery import calibration, fit
from kallm.surgery.architectures import architecture_for
from kallm.testing.compare import assert_unchanged, block_errors, snapshot
from kallm.testing.data import token_ids
from kallm.testing.models import tiny_model

TEXTS = [
    "The river flows through the old town and past the mill.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "A lighthouse keeper watched the storm roll in from the sea.",
    "def is_prime(n): return n > 1 and all(n % d for d in range(2, n))",
] * 3


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "phi3"])
def test_fit_beats_random_init_by_far_on_unseen_tokens(family):
    original = tiny_model(family)
    fitted = kallm.retrofit(copy.deepcopy(original), last_n=2, init="fit", calibration=token_ids(0))
    random = kallm.retrofit(copy.deepcopy(original), last_n=2)
    held_out = token_ids(1, rows=8)
    fit_errors, random_errors = block_errors(fitted, original, held_out), block_errors(random, original, held_out)
    assert set(fit_errors) == {1, 2}
    for index in fit_errors:
        assert fit_errors[index] < 0.9, fit_errors
        assert random_errors[index] > 20 * fit_errors[index], (fit_errors, random_errors)
    # the whole model moves far less away from the original than a random-init retrofit
    with torch.no_grad():
        reference = original(held_out).logits
        fit_gap = (fitted(held_out).logits - reference).norm()
        random_gap = (random(held_out).logits - reference).norm()
    assert fit_gap < 0.5 * random_gap


def test_report_holds_the_relative_error_of_every_block(caplog):
    original = tiny_model("llama")
    ids = token_ids(0)
    with caplog.at_level("INFO", logger="kallm"):
        model = kallm.retrofit(copy.deepcopy(original), layers=[0, 2], init="fit", calibration=ids)
    report = model.kallm_fit_report
    assert report["calibration_tokens"] == ids.numel()
    assert set(report["relative_error"]) == {0, 2}
    assert "relative error per block" in caplog.text
    # the reported numbers are the errors on the calibration tokens themselves
    recomputed = block_errors(model, original, ids)
    for index, error in report["relative_error"].items():
        assert 0 < error < 1
        assert error == pytest.approx(recomputed[index], rel=1e-3, abs=1e-4)
        # a tiny random model has no massive activations, so no token is left out
        assert report["ordinary_token_error"][index] == pytest.approx(error, rel=1e-4)


def test_calibration_as_texts_needs_a_tokenizer(tiny_tokenizer):
    original = tiny_model("llama")
    model = kallm.retrofit(copy.deepcopy(original), last_n=1, init="fit", calibration=TEXTS, tokenizer=tiny_tokenizer)
    expected = sum(len(tiny_tokenizer(text).input_ids) for text in TEXTS)
    assert model.kallm_fit_report["calibration_tokens"] == expected
    assert model.kallm_fit_report["relative_error"][2] < 0.9
    with pytest.raises(ValueError, match="tokenizer"):
        kallm.retrofit(copy.deepcopy(original), init="fit", calibration=TEXTS)


def test_calibration_as_one_long_row_of_token_ids():
    ids = token_ids(0, rows=1, length=3 * calibration.MAX_SEQUENCE_LENGTH // 4)[0]
    pieces = calibration.calibration_sequences(tiny_model("llama"), ids, None, max_length=100)
    assert [len(p) for p in pieces] == [100] * 3 + [84]
    assert torch.equal(torch.cat(pieces), ids)
    model = kallm.retrofit(tiny_model("llama"), last_n=1, init="fit", calibration=ids)
    assert model.kallm_fit_report["calibration_tokens"] == ids.numel()


def test_default_calibration_is_the_models_own_deterministic_replies(tiny_tokenizer, monkeypatch):
    original = tiny_model("llama")
    monkeypatch.setattr(calibration, "DEFAULT_PROMPTS", ("Hi.", "Tell me a story.", "Why?"))
    monkeypatch.setattr(calibration, "DEFAULT_NEW_TOKENS", 12)
    first = calibration.default_calibration(original, tiny_tokenizer)
    second = calibration.default_calibration(original, tiny_tokenizer)
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, second))
    for prompt, sequence in zip(calibration.DEFAULT_PROMPTS, first):
        chat = tiny_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_ids = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
        assert sequence[: len(prompt_ids)].tolist() == list(prompt_ids)  # no padding leaked in
        assert 0 < len(sequence) - len(prompt_ids) <= 12
    model = kallm.retrofit(copy.deepcopy(original), last_n=1, init="fit", tokenizer=tiny_tokenizer)
    assert model.kallm_fit_report["calibration_tokens"] == sum(len(s) for s in first)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        kallm.retrofit(copy.deepcopy(original), last_n=1, init="fit", tokenizer=tokenizer)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"init": "fitted"}, ValueError, "unknown init 'fitted'; valid choices: random, fit"),
        ({"init": "fit"}, ValueError, "needs tokenizer"),
        ({"init": "fit", "calibration": []}, ValueError, "calibration is empty"),
        ({"init": "fit", "calibration": ["", "  "]}, ValueError, "calibration is empty"),
        ({"init": "fit", "calibration": torch.zeros(0, dtype=torch.long)}, ValueError, "calibration is empty"),
        ({"init": "fit", "calibration": torch.ones(4, 8)}, ValueError, "LongTensor"),
        ({"init": "fit", "calibration": "one text"}, TypeError, "list of texts"),
        ({"init": "fit", "calibration": [1, 2, 3]}, TypeError, "strings"),
        ({"init": "fit", "calibration": torch.full((2, 8), 500)}, ValueError, r"\[0, 128\)"),
        ({"init": "random", "calibration": ["some text"]}, ValueError, "only used by init='fit'"),
        ({"init": "fit", "calibration": token_ids(), "kind": "linear"}, ValueError, "kind='kan'"),
        ({"init": "fit", "calibration": torch.full((1, 600), 7)}, ValueError,
         r"give the feedforward of block \d the same input \(no spread across tokens"),
    ],
)
def test_bad_fit_arguments_fail_before_the_model_changes(arguments, error, message):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        kallm.retrofit(model, last_n=2, **arguments)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _minimum_tokens(**options):
    """The fewest calibration tokens a last_n=2 retrofit of the tiny Llama accepts."""
    model = kallm.retrofit(tiny_model("llama"), last_n=1, **options)
    return fit.minimum_calibration_tokens(model.model.layers[2].mlp)


def test_minimum_calibration_comes_from_the_least_squares_sizes():
    # default tiny Llama KAN feedforward: 32 -> 22 -> 32, cheby2 degree 2: 2 * 32 = 64 features in the first layer
    assert _minimum_tokens() == -(-(64 + 1) // (1 + fit.AUGMENT)) == 13
    assert _minimum_tokens(intermediate_size=60) == -(-(2 * 60 + 1) // (1 + fit.AUGMENT))
    assert _minimum_tokens(basis="rbf", degree=4) == -(-(4 * 32 + 1) // (1 + fit.AUGMENT))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("calibration", [torch.tensor([5]), ["A"], torch.arange(5, 17)])
def test_too_small_a_calibration_is_refused_before_anything_changes(calibration, dtype, tiny_tokenizer):
    model = tiny_model("llama").to(dtype)
    before = snapshot(model)
    tokens = calibration.numel() if isinstance(calibration, torch.Tensor) else 1
    with pytest.raises(ValueError, match=f"init='fit' needs at least 13 calibration tokens for these KAN "
                                         f"feedforwards, got {tokens}: its largest least-squares problem has 65 "
                                         f"unknowns per output"):
        kallm.retrofit(model, last_n=2, init="fit", calibration=calibration, tokenizer=tiny_tokenizer)
    assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_smallest_accepted_calibration_fits_finite_weights(dtype):
    model = tiny_model("llama").to(dtype)
    kallm.retrofit(model, last_n=2, init="fit", calibration=torch.arange(5, 5 + _minimum_tokens()))
    assert all(0 < error < 1 for error in model.kallm_fit_report["relative_error"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model(token_ids(rows=2)).logits).all()


def _non_finite_error(feedforward, inputs, outputs, original):
    return float("inf")


def _non_finite_weights(feedforward, inputs, outputs, original):
    feedforward.layers[-1].weight.data[0, 0] = float("nan")
    return 0.5


@pytest.mark.parametrize("broken_fit", [_non_finite_error, _non_finite_weights])
@pytest.mark.parametrize("extending", [False, True])
def test_a_fit_gone_non_finite_restores_the_model(broken_fit, extending, monkeypatch):
    model = tiny_model("llama")
    if extending:
        kallm.retrofit(model, layers=[2])
    before = snapshot(model)
    monkeypatch.setattr(fit, "fit_feedforward", broken_fit)
    with pytest.raises(FloatingPointError, match="init='fit' left non-finite values in block 0's KAN feedforward") \
            as info:
        kallm.retrofit(model, layers=[0, 1], init="fit", calibration=token_ids(0))
    assert "the model is restored as it was before retrofit" in str(info.value)
    assert_unchanged(model, before)
    assert not hasattr(model, "kallm_fit_report")
    assert torch.isfinite(model(token_ids(rows=2)).logits).all()


def test_input_scale_and_shift_are_set_from_the_data():
    original = tiny_model("llama")
    ids = token_ids(0)
    model = kallm.retrofit(copy.deepcopy(original), last_n=1, init="fit", calibration=ids)
    first = model.model.layers[2].mlp.layers[0]
    inputs, _ = calibration.record_feedforwards(original, architecture_for("llama"), [2], list(ids), progress=False)[2]
    z = inputs * first.input_scale.detach() + first.input_shift.detach()
    assert not torch.allclose(first.input_scale, torch.ones_like(first.input_scale))
    # each channel centred on its median and spread to about one unit, never past the cap
    assert z.median(0).values.abs().max() < 0.35
    half_range = (z.quantile(0.8413, dim=0) - z.quantile(0.1587, dim=0)) / 2
    assert half_range.min() > 0.3 and half_range.max() < 1.3
    assert z.abs().max() <= fit.ZCAP + 1e-4
    # the second layer reads the first layer's outputs standardised the same way
    second = model.model.layers[2].mlp.layers[1]
    hidden = first(inputs) * second.input_scale + second.input_shift
    assert hidden[:, 1:].abs().max() <= fit.ZCAP + 1e-3  # unit 0 may be the sink step


def test_rare_huge_targets_are_matched_without_bending_the_rest():
    torch.manual_seed(0)
    hidden = 16
    mlp = nn.Sequential(nn.Linear(hidden, 48), nn.SiLU(), nn.Linear(48, hidden))
    x = torch.randn(2000, hidden)
    sink = torch.zeros(1, hidden)
    sink[0, 3] = 12.0  # one far-away point, like the attention-sink token's hidden state
    with torch.no_grad():
        y = mlp(x)
        y_sink = mlp(sink) + 500.0  # its output is huge, as massive activations are
    rows = torch.cat([x, sink.repeat(20, 1)])
    targets = torch.cat([y, y_sink.repeat(20, 1)])

    def errors(feedforward):
        with torch.no_grad():
            ordinary = (feedforward(x) - y).norm() / y.norm()
            huge = (feedforward(sink) - y_sink).norm() / y_sink.norm()
        return float(ordinary), float(huge)

    with_sink = KANFeedForward(hidden, 24)
    fit.fit_feedforward(with_sink, rows, targets, mlp, augment=0)
    without_sink = KANFeedForward(hidden, 24)
    fit.fit_feedforward(without_sink, x, y, mlp, augment=0)
    ordinary, huge = errors(with_sink)
    assert huge < 0.01
    assert ordinary < 1.1 * errors(without_sink)[0]
    # the report's ordinary-token error is this error on the ordinary rows, however small the huge rows make
    # the error over all rows look
    assert fit.ordinary_token_error(with_sink, rows, targets) == pytest.approx(ordinary, rel=1e-4)
    with torch.no_grad():
        overall = float((with_sink(rows) - targets).norm() / targets.norm())
    assert overall < 0.5 * ordinary
    report = {"relative_error": {7: overall}, "ordinary_token_error": {7: ordinary}}
    assert fit.format_errors(report) == f"7: {overall:.3f} (ordinary tokens {ordinary:.3f})"


def test_outlier_rows_flags_only_rare_huge_rows():
    torch.manual_seed(0)
    y = torch.randn(100, 8)
    y[[3, 40]] *= 1000.0
    assert fit.outlier_rows(y).nonzero().flatten().tolist() == [3, 40]
    # huge in more than a tenth of the rows is a heavy tail, not sink tokens: nothing is set apart
    y[:20] *= 1000.0
    assert not fit.outlier_rows(y).any()
    for bad in (torch.randn(8), torch.empty(0, 8)):
        with pytest.raises(ValueError, match="non-empty \\(rows, features\\) tensor"):
            fit.outlier_rows(bad)


@pytest.mark.parametrize("options", [{"basis": "cheby2>legendre>cheby2"}, {"input_map": "tanh"},
                                     {"basis": "rbf", "degree": 4}])
def test_other_layouts_fit_too(options):
    original = tiny_model("llama")
    fitted = kallm.retrofit(copy.deepcopy(original), last_n=1, init="fit", calibration=token_ids(0), **options)
    random = kallm.retrofit(copy.deepcopy(original), last_n=1, **options)
    held_out = token_ids(1, rows=8)
    assert block_errors(fitted, original, held_out)[2] < 0.2 * block_errors(random, original, held_out)[2]


def test_extending_a_retrofitted_model_with_fit_init():
    original = tiny_model("llama")
    ids = token_ids(0)
    model = kallm.retrofit(copy.deepcopy(original), layers=[2], init="fit", calibration=ids)
    model = kallm.retrofit(model, layers=[1], init="fit", calibration=ids)
    assert model.config.kan_config["blocks"] == [1, 2]
    assert set(model.kallm_fit_report["relative_error"]) == {1}
    assert model.kallm_fit_report["relative_error"][1] < 0.9


@pytest.mark.integration
@pytest.mark.all_threads  # the real model gains from every core
def test_real_smollm2_fit_init_still_answers(smollm2):
    base, tokenizer = smollm2
    model = kallm.retrofit(copy.deepcopy(base), last_n=5, init="fit", tokenizer=tokenizer).eval()
    report = model.kallm_fit_report
    assert sorted(report["relative_error"]) == [25, 26, 27, 28, 29]
    assert all(error < 0.7 for error in report["relative_error"].values()), report
    assert report["calibration_tokens"] > 1000
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reply = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :]
    assert "Paris" in tokenizer.decode(reply, skip_special_tokens=True)
