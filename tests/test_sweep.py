"""kallm sweep: config and data checks, a tiny end-to-end sweep, resume, subsets and saved models."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kallm.cli import main
from kallm.cli.sweep import select
from kallm.recipes.runs import ARM_NAME
from kallm.recipes.sweep import arm_settings, expand_grid, load_sweep, pareto_front, run_sweep
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import make_tiny_tokenizer

WORDS = {0: ["ball", "goal", "team"], 1: ["bank", "stock", "price"]}


@pytest.fixture
def workspace(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    for split, count in (("train", 24), ("dev", 8)):
        rows = [{"text": f"the {WORDS[i % 2][i % 3]} news {i}", "label": i % 2} for i in range(count)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return tmp_path


def write_config(tmp_path, **overrides):
    config = {
        "name": "tiny-sweep", "model": str(tmp_path / "model"), "out": str(tmp_path / "out"), "seeds": [0, 1],
        "shrink": {"num_blocks": 2}, "retrofit": {"last_n": 1},
        "data": {"train": "${KALLM_TINY}/train.jsonl", "dev": "${KALLM_TINY}/dev.jsonl"},
        "train": {"steps": 2, "batch_size": 4, "max_length": 16},
        "grid": [{"basis": ["cheby2", "rbf"], "degree": [2]}],
        "arms": {"mix": {"basis": "cheby2+rbf>legendre"}, "linear-restart": {"kind": "linear"},
                 "mlp": {"kind": "mlp"}, "all-kan": {"basis": "legendre", "degree": 3, "last_n": 2}},
        **overrides,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_tiny_sweep_runs_every_arm_writes_the_report_and_resumes(workspace, monkeypatch, capsys):
    monkeypatch.setenv("KALLM_TINY", str(workspace))
    config = load_sweep(write_config(workspace))
    assert list(config.arms) == ["cheby2-d2", "rbf-d2", "mix", "linear-restart", "mlp", "all-kan"]
    result = run_sweep(config)
    out = workspace / "out"
    assert {"results.md", "results.json", "runs.json", "accuracy_vs_time.png", "mini-model"} <= {
        p.name for p in out.iterdir()}
    rows = {row["arm"]: row for row in result["rows"]}
    assert len(result["runs"]) == 12 and set(rows) == set(config.arms)
    for row in rows.values():
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0 and row["accuracy"]["n"] == 2
        assert row["seconds_per_step"] > 0 and row["peak_memory_bytes"] > 0
        assert row["trainable_parameters"] == row["total_parameters"]
    # the mini model: 2 blocks, the vocabulary of the training texts
    mini = json.loads((out / "mini-model" / "config.json").read_text())
    assert mini["num_hidden_layers"] == 2 and mini["vocab_size"] < 128
    # the MLP arm has no KAN layers; the fully KAN arm replaced both blocks' feedforwards
    assert rows["mlp"]["total_parameters"] != rows["cheby2-d2"]["total_parameters"]
    assert rows["all-kan"]["total_parameters"] != rows["cheby2-d2"]["total_parameters"]
    assert any(row["pareto"] for row in rows.values())
    report = (out / "results.md").read_text()
    assert "| mlp" in report and "s/step" in report
    capsys.readouterr()

    run_sweep(load_sweep(write_config(workspace)))
    log = capsys.readouterr().out
    assert log.count("already in runs.json with the same settings, skipped") == 12
    assert "shrinking" not in log  # the mini model is reused too


def test_cli_subset_and_saved_models_load_as_classifiers(workspace, monkeypatch):
    monkeypatch.setenv("KALLM_TINY", str(workspace))
    path = write_config(workspace)
    out = workspace / "subset"
    assert main(["sweep", str(path), "--arms", "rbf-d2,mlp", "--seeds", "1", "--out", str(out), "--save-models"]) == 0
    runs = json.loads((out / "runs.json").read_text())
    assert [(run["arm"], run["seed"]) for run in runs] == [("rbf-d2", 1), ("mlp", 1)]
    saved = out / "models" / "rbf-d2" / "seed1"
    recorded = json.loads((out / "models" / "rbf-d2" / "arm_settings.json").read_text())
    assert recorded["arm"] == "rbf-d2" and recorded["settings"] == {"basis": "rbf", "degree": 2}
    assert recorded["resolved"]["last_n"] == 1
    model = AutoModelForSequenceClassification.from_pretrained(saved).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved)
    assert type(model).__name__ == "KALlamaForSequenceClassification"
    ids = tokenizer(["the ball news"], return_tensors="pt")
    with torch.no_grad():
        assert model(**ids).logits.shape == (1, 2)
    assert runs[0]["accuracy"] == pytest.approx(
        sum(model(**tokenizer([row["text"]], return_tensors="pt")).logits.argmax(-1).item() == row["label"]
            for row in map(json.loads, (workspace / "dev.jsonl").read_text().splitlines())) / 8)


@pytest.mark.parametrize("change, message", [
    ({"arms": {"bad": {"basis": "chebyshev9"}}}, "arm 'bad': unknown basis 'chebyshev9'"),
    ({"arms": {"bad": {"kind": "lstm"}}}, "arm 'bad': unknown kind 'lstm'; valid choices: kan, linear, mlp"),
    ({"arms": {"bad": {"form": "glu"}}}, "arm 'bad': unknown form 'glu'; valid choices: kan, gated"),
    ({"train": {"eval_every": 0}}, "train.eval_every must be an integer >= 1, got 0"),
    ({"train": {"learning_rate_scales": {"weights": 0.1}}}, "unknown parameter roles ['weights'] in "
                                                            "train.learning_rate_scales; valid roles: coefficients"),
    ({"train": {"learning_rate_scales": 0.1}}, "train.learning_rate_scales must be a mapping of parameter roles"),
    ({"arms": {"bad": {"basis": "cheby2", "alpha": 2.0}}}, "arm 'bad'"),
    ({"arms": {"../x": {}}}, "arm name '../x' is not allowed"),
    ({"seeds": []}, "seeds must be a non-empty list of integers"),
    ({"seeds": [0, -1]}, "seeds must be a non-empty list of integers in [0, 4294967295]"),
    ({"train": {"epochs": 1}}, "unknown train settings ['epochs']"),
    ({"train": {"steps": 0}}, "train.steps must be an integer >= 1, got 0"),
    ({"train": {"warmup_steps": -1}}, "train.warmup_steps must be an integer >= 0, got -1"),
    ({"train": {"learning_rate": "fast"}}, "train.learning_rate must be a finite number > 0, got 'fast'"),
    ({"train": {"max_length": 1}}, "train.max_length must be an integer >= 2, got 1"),
    ({"data": {"train": "a.jsonl", "dev": "b.jsonl", "num_labels": 1}}, "data.num_labels must be an integer >= 2"),
    ({"shrink": {"num_blocks": 0}}, "shrink.num_blocks must be an integer >= 1, got 0"),
    ({"shrink": {"layers": 2}}, "unknown shrink settings ['layers']"),
    ({"surprise": 1}, "unknown sweep keys ['surprise']"),
])
def test_bad_configs_are_refused_when_loaded(workspace, monkeypatch, change, message):
    monkeypatch.setenv("KALLM_TINY", str(workspace))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):
        load_sweep(write_config(workspace, **change))


@pytest.mark.parametrize("rows, message", [
    ([{"sentence": "a", "label": 0}], "has no column ['text']; its columns are ['label', 'sentence']"),
    ([{"text": "a", "label": "sports"}], "row 1: label 'sports' is not an integer class index"),
    ([{"text": "a", "label": 7}], "labels [7] outside 0..1 (2 classes)"),
])
def test_bad_data_is_refused_before_anything_is_written(workspace, monkeypatch, rows, message):
    monkeypatch.setenv("KALLM_TINY", str(workspace))
    (workspace / "dev.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):
        run_sweep(load_sweep(write_config(workspace)))
    assert not (workspace / "out").exists()


def test_a_narrowed_sweep_keeps_the_runs_of_other_arms_and_seeds_in_runs_json(workspace, monkeypatch):
    monkeypatch.setenv("KALLM_TINY", str(workspace))
    path = write_config(workspace)
    out = workspace / "out"

    def recorded():
        return sorted((run["arm"], run["seed"]) for run in json.loads((out / "runs.json").read_text()))

    assert main(["sweep", str(path), "--arms", "rbf-d2", "--seeds", "0"]) == 0
    assert main(["sweep", str(path), "--arms", "mlp", "--seeds", "1"]) == 0
    assert recorded() == [("mlp", 1), ("rbf-d2", 0)]
    first = json.loads((out / "runs.json").read_text())
    assert main(["sweep", str(path), "--arms", "mlp", "--seeds", "1", "--restart"]) == 0  # replaces that run alone
    again = json.loads((out / "runs.json").read_text())
    assert recorded() == [("mlp", 1), ("rbf-d2", 0)]
    assert next(r for r in again if r["arm"] == "rbf-d2") == next(r for r in first if r["arm"] == "rbf-d2")
    assert main(["sweep", str(path), "--arms", "rbf-d2,mlp", "--seeds", "0,1"]) == 0
    assert recorded() == [("mlp", 0), ("mlp", 1), ("rbf-d2", 0), ("rbf-d2", 1)]
    report = (out / "results.md").read_text()  # the report covers the arms asked for, from every recorded run
    assert "| rbf-d2" in report and "| mlp" in report


def test_subset_selection_refuses_unknown_arms(workspace, monkeypatch):
    monkeypatch.setenv("KALLM_TINY", str(workspace))
    config = load_sweep(write_config(workspace))
    with pytest.raises(ValueError, match="--arms: \\['nope'\\] are not arms of tiny-sweep; its arms: cheby2-d2"):
        select(config, "nope,mlp", None)


@pytest.mark.parametrize("seeds, message", [
    ("zero", r"takes integers in \[0, 4294967295\] separated by commas, e.g. 0,1; got 'zero'"),
    ("0,0", r"seeds \[0\] given more than once"),
    ("1,-1", "takes integers in"),
])
def test_cli_seeds_are_distinct_integers(workspace, monkeypatch, capsys, seeds, message):
    monkeypatch.setenv("KALLM_TINY", str(workspace))
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(write_config(workspace)), "--seeds", seeds])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error
    assert error.strip().splitlines()[-1].startswith("kallm sweep: error: argument --seeds: ")
    assert re.search(message, error)
    assert not (workspace / "out").exists()


def test_a_seed_twice_in_the_config_is_refused(workspace, monkeypatch):
    """A repeated seed would count the same run twice in the mean and shrink its spread."""
    monkeypatch.setenv("KALLM_TINY", str(workspace))
    with pytest.raises(ValueError, match=r"seeds \[0\] given more than once"):
        load_sweep(write_config(workspace, seeds=[0, 1, 0]))


def test_resume_reruns_arms_whose_data_changed_under_the_same_path(workspace, monkeypatch, capsys):
    monkeypatch.setenv("KALLM_TINY", str(workspace))
    path = write_config(workspace, seeds=[0], grid=[], arms={"mlp": {"kind": "mlp"}})
    run_sweep(load_sweep(path))
    capsys.readouterr()
    run_sweep(load_sweep(path))
    assert "already in runs.json with the same settings, skipped" in capsys.readouterr().out
    dev = workspace / "dev.jsonl"
    dev.write_text(dev.read_text().replace('"label": 0', '"label": 2').replace('"label": 1', '"label": 0')
                   .replace('"label": 2', '"label": 1'))  # the same path, the labels swapped
    result = run_sweep(load_sweep(path))
    log = capsys.readouterr().out
    assert "skipped" not in log and "in runs.json with other settings, running it again" in log
    assert "shrinking" not in log  # the training rows did not change, so the mini model is kept
    (workspace / "train.jsonl").write_text((workspace / "train.jsonl").read_text().replace("news", "report"))
    run_sweep(load_sweep(path))
    log = capsys.readouterr().out
    assert "shrinking" in log and "skipped" not in log  # new training texts: a new vocabulary and runs
    assert result["runs"][0]["settings"]["data_rows"] != json.loads((workspace / "out" / "runs.json").read_text())[
        0]["settings"]["data_rows"]


def test_grid_names_and_pareto_front():
    assert list(expand_grid([{"basis": ["cheby2", "a+b", "a>b"], "degree": [2, 3]}])) == [
        "cheby2-d2", "cheby2-d3", "a_plus_b-d2", "a_plus_b-d3", "a_then_b-d2", "a_then_b-d3"]
    # option values with characters no folder name may hold on some systems; names stay distinct
    arms = expand_grid([{"basis": ["cheby2"], "input_map": ["a/b", "a:b", "a*b?", "x y", "..", "[1, 2]"]}])
    assert list(arms) == ["cheby2-input_map_a_b", "cheby2-input_map_a_b-2", "cheby2-input_map_a_b-3",
                          "cheby2-input_map_x_y", "cheby2-input_map", "cheby2-input_map_1_2"]
    assert [settings["input_map"] for settings in arms.values()] == ["a/b", "a:b", "a*b?", "x y", "..", "[1, 2]"]
    assert all(ARM_NAME.fullmatch(name) and ".." not in name for name in arms)
    rows = [{"arm": name, "accuracy": {"mean": accuracy}, "train_seconds": seconds}
            for name, accuracy, seconds in [("fast", 0.5, 1), ("best", 0.7, 5), ("worse", 0.6, 6), ("mid", 0.6, 2)]]
    assert pareto_front(rows) == {"fast", "best", "mid"}


def test_the_agnews_config_pairs_every_form_with_its_linear_partner_at_a_converged_budget(monkeypatch, tmp_path):
    from pathlib import Path

    monkeypatch.setenv("KALLM_DATA_DIR", str(tmp_path))
    config = load_sweep(Path(__file__).resolve().parent.parent / "configs" / "sweep-agnews.yaml")
    assert config.seeds == [0, 1, 2] and config.train["steps"] == 400 and config.train["eval_every"] == 50
    resolved = {name: arm_settings(config, name) for name in config.arms}
    assert resolved["linear-restart"] == {"kind": "linear", "last_n": 1}
    assert resolved["fully-linear-restart"] == {"kind": "linear", "last_n": 3}
    assert resolved["mlp-retrained"] == {"kind": "mlp"}
    forms = {name: (settings.get("form", "kan"), settings.get("base"), settings["last_n"])
             for name, settings in resolved.items() if settings["kind"] == "kan"}
    assert forms == {
        "cheby2-d2": ("kan", None, 1), "base-silu-cheby2-d2": ("kan", "silu", 1), "gated-cheby2-d2": ("gated", None, 1),
        "fully-kan-cheby2-d2": ("kan", None, 3), "fully-kan-base-silu-cheby2-d2": ("kan", "silu", 3),
        "fully-kan-gated-cheby2-d2": ("gated", None, 3), "fully-kan-cheby2-d2-slow-coefficients": ("kan", None, 3),
    }
    assert resolved["fully-kan-cheby2-d2-slow-coefficients"]["learning_rate_scales"] == {"coefficients": 0.05}
    assert not any("learning_rate_scales" in settings for name, settings in resolved.items() if "slow" not in name)
    assert all(("fully" in name) == (settings.get("last_n") == 3) for name, settings in resolved.items()
               if settings["kind"] != "mlp")
    assert 3 == config.shrink["num_blocks"]


def test_the_bases_config_holds_every_basis_at_the_same_budget(monkeypatch, tmp_path):
    from pathlib import Path

    monkeypatch.setenv("KALLM_DATA_DIR", str(tmp_path))
    root = Path(__file__).resolve().parent.parent / "configs"
    config, forms = load_sweep(root / "sweep-agnews-bases.yaml"), load_sweep(root / "sweep-agnews.yaml")
    assert len(config.arms) == 13 + 10 + 4 + 1 and config.train == forms.train and config.data == forms.data
    assert sum("+" in settings.get("basis", "") for settings in config.arms.values()) == 2
    assert sum(">" in settings.get("basis", "") for settings in config.arms.values()) == 2


def test_a_tokenizer_without_pad_or_eos_token_is_refused_before_anything_is_written(workspace, monkeypatch):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv("KALLM_TINY", str(workspace))
    vocab = {"<unk>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                   unk_token="<unk>")
    bare.save_pretrained(workspace / "model")
    (workspace / "model" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend",
                                                                          "unk_token": "<unk>"}))
    with pytest.raises(ValueError, match="has no pad token and no eos token to pad with"):
        run_sweep(load_sweep(write_config(workspace)))
    assert not (workspace / "out").exists()


def test_arms_are_copies_of_one_loaded_classifier_with_the_head_drawn_from_the_seed(workspace, monkeypatch):
    from kallm.core.layers import KANFeedForward
    from kallm.recipes.sweep import build_arm, load_data, prepare_inputs, prepare_mini_model

    monkeypatch.setenv("KALLM_TINY", str(workspace))
    config = load_sweep(write_config(workspace))
    data = load_data(config)
    inputs = prepare_inputs(config, prepare_mini_model(config, data[0]), data)
    assert inputs.head == ["score.weight"] and len(inputs.train) == 24 and len(inputs.dev) == 8
    loaded = {name: tensor.clone() for name, tensor in inputs.classifier.state_dict().items()}

    def head(model):
        return model.get_parameter("score.weight").detach()

    first, again, other = (build_arm(inputs, {"kind": "kan", "basis": "cheby2", "degree": 2, "last_n": 1}, seed)
                           for seed in (0, 0, 1))
    assert torch.equal(head(first), head(again)) and not torch.equal(head(first), head(other))
    std = inputs.classifier.config.initializer_range  # transformers' own initialization of a new head
    assert 0.5 * std < head(first).std() < 2 * std
    assert isinstance(first.model.layers[1].mlp, KANFeedForward)
    # retrofitting and training an arm leave the loaded classifier as it was for the next arm
    first(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([1])).loss.backward()
    torch.optim.SGD(first.parameters(), lr=1.0).step()
    assert not isinstance(inputs.classifier.model.layers[1].mlp, KANFeedForward)
    assert all(torch.equal(tensor, loaded[name]) for name, tensor in inputs.classifier.state_dict().items())


def test_eval_every_scores_the_dev_rows_along_the_way_and_plots_the_curves(workspace, monkeypatch):
    monkeypatch.setenv("KALLM_TINY", str(workspace))
    config = load_sweep(write_config(
        workspace, seeds=[0, 1], train={"steps": 5, "batch_size": 4, "max_length": 16, "eval_every": 2},
        grid=[], arms={"gated": {"form": "gated"}, "linear-restart": {"kind": "linear"}}))
    result = run_sweep(config)
    for run in result["runs"]:  # after steps 2 and 4, and after the last; the final accuracy is the last point
        assert [step for step, _ in run["curve"]] == [2, 4, 5] and run["accuracy"] == run["curve"][-1][1]
    rows = {row["arm"]: row for row in result["rows"]}
    gated = rows["gated"]["curve"]
    assert [point["step"] for point in gated] == [2, 4, 5]
    runs = [run for run in result["runs"] if run["arm"] == "gated"]
    assert gated[0]["mean"] == pytest.approx(sum(run["curve"][0][1] for run in runs) / 2)
    out = workspace / "out"
    assert (out / "accuracy_vs_steps.png").stat().st_size > 0
    report = (out / "results.md").read_text()
    assert "| arm | 2 | 4 | 5 |" in report and f"| gated | {100 * gated[0]['mean']:.1f} |" in report
    model = json.loads((out / "results.json").read_text())
    assert model["arms"][0]["curve"] == gated


def test_a_gated_arm_is_a_gated_kan_feedforward(workspace, monkeypatch):
    from kallm.recipes.sweep import build_arm, load_data, prepare_inputs, prepare_mini_model

    monkeypatch.setenv("KALLM_TINY", str(workspace))
    config = load_sweep(write_config(workspace, arms={"gated": {"form": "gated", "last_n": 2}}, grid=[]))
    data = load_data(config)
    inputs = prepare_inputs(config, prepare_mini_model(config, data[0]), data)
    model = build_arm(inputs, arm_settings(config, "gated"), 0)
    assert all(block.mlp.gate is not None for block in model.model.layers)
    assert model.config.kan_config["form"] == "gated"


def test_learning_rate_scales_reach_each_parameter_role(workspace, monkeypatch):
    from kallm.recipes.sweep import build_arm, load_data, prepare_inputs, prepare_mini_model
    from kallm.train.classifier import train_classifier

    monkeypatch.setenv("KALLM_TINY", str(workspace))
    config = load_sweep(write_config(workspace, grid=[], arms={"kan": {}},
                                     train={"steps": 2, "batch_size": 4, "max_length": 16,
                                            "learning_rate_scales": {"coefficients": 0.0}}))
    data = load_data(config)
    inputs = prepare_inputs(config, prepare_mini_model(config, data[0]), data)
    model = build_arm(inputs, arm_settings(config, "kan"), 0)
    layer = model.model.layers[1].mlp.layers[0]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_classifier(model, inputs.train, inputs.tokenizer.pad_token_id, config.train, 0)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert "model.layers.1.mlp.layers.0.weight" not in changed and torch.equal(layer.weight, before[
        "model.layers.1.mlp.layers.0.weight"])
    assert {"model.layers.1.mlp.layers.0.bias", "model.layers.1.mlp.layers.0.input_scale",
            "score.weight"} <= changed


def test_an_arms_learning_rate_scales_override_the_configs_for_that_arm_alone(workspace, monkeypatch):
    import kallm.recipes.sweep as sweep

    monkeypatch.setenv("KALLM_TINY", str(workspace))
    config = load_sweep(write_config(
        workspace, grid=[], seeds=[0], train={"steps": 1, "batch_size": 4, "max_length": 16,
                                              "learning_rate_scales": {"coefficients": 0.5}},
        arms={"slow": {"learning_rate_scales": {"coefficients": 0.1}}, "kan": {},
              "linear-restart": {"kind": "linear", "learning_rate_scales": {"other": 2.0}}}))
    assert arm_settings(config, "slow")["learning_rate_scales"] == {"coefficients": 0.1}
    assert arm_settings(config, "linear-restart") == {"kind": "linear", "last_n": 1,
                                                      "learning_rate_scales": {"other": 2.0}}
    seen = {}
    train = sweep.train_classifier

    def spy(model, rows, pad_id, settings, seed, score=None):
        seen[len(seen)] = settings["learning_rate_scales"]
        return train(model, rows, pad_id, settings, seed, score)

    monkeypatch.setattr(sweep, "train_classifier", spy)
    result = run_sweep(config)
    assert list(seen.values()) == [{"coefficients": 0.1}, {"coefficients": 0.5}, {"other": 2.0}]
    assert [run["arm"] for run in result["runs"]] == ["slow", "kan", "linear-restart"]
    with pytest.raises(ValueError, match="arm 'bad': learning_rate_scales must be finite numbers >= 0"):
        load_sweep(write_config(workspace, grid=[], arms={"bad": {"learning_rate_scales": {"base": -1}}}))


def test_warmup_steps_scale_the_first_updates():
    from types import SimpleNamespace

    from kallm.train.classifier import train_classifier

    class Scorer(torch.nn.Module):  # a classifier's interface over one weight
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4))

        def forward(self, input_ids, attention_mask, labels):
            return SimpleNamespace(loss=((self.weight - torch.arange(4.0)) ** 2).sum())

    def first_update(warmup_steps):
        model = Scorer()
        train_classifier(model, [([1, 2], 0)], 0, {"steps": 1, "batch_size": 1, "learning_rate": 1e-2,
                                                   "warmup_steps": warmup_steps}, seed=0)
        return model.weight.detach().abs().max().item()

    # Adam's first step moves each weight by about the learning rate: all of it without warmup, a quarter of it
    # on the first of 3 warmup steps
    assert first_update(0) == pytest.approx(1e-2, rel=1e-3)
    assert first_update(3) == pytest.approx(1e-2 / 4, rel=1e-3)
