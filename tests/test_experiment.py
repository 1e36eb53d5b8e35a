"""kallm experiment: config loading and validation, a tiny end-to-end run with every arm."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import kallm.recipes.experiment
from kallm.cli import main
from kallm.recipes.experiment import load_experiment, run_experiment, summarize, to_markdown
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import make_tiny_tokenizer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def workspace(tmp_path):
    """A tiny model + tokenizer folder, chat data, a two-task BBH folder and a text file."""
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    chat = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i} it is."}]}
            for i in range(16)]
    chat.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    bbh = tmp_path / "bbh"
    bbh.mkdir()
    (bbh / "boolean_expressions.json").write_text(json.dumps({"examples": [
        {"input": "True and False is", "target": "False"}, {"input": "not False is", "target": "True"}]}))
    (bbh / "navigate.json").write_text(json.dumps({"examples": [
        {"input": "Take 1 step. Options:\n- Yes\n- No", "target": "No"}]}))
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    return tmp_path, model_dir, chat, bbh, text


def write_config(tmp_path, **overrides):
    config = {"name": "tiny", "arms": {"base": {"kind": "baseline"}}, **overrides}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_tiny_experiment_runs_every_arm_and_writes_the_report(workspace, monkeypatch):
    tmp_path, model_dir, chat, bbh, text = workspace
    monkeypatch.setenv("KALLM_TINY_DATA", str(tmp_path))
    path = write_config(
        tmp_path,
        model=str(model_dir), out=str(tmp_path / "out"), seeds=[0, 1], data="${KALLM_TINY_DATA}/chat.jsonl",
        retrofit={"last_n": 1, "basis": "cheby2", "degree": 3},  # KAN settings: the linear arm takes only last_n
        arms={"base": {"kind": "baseline"}, "linear": {"kind": "linear"},
              "kan": {"kind": "kan", "init": "fit", "distill": True}},
        train={"max_steps": 2, "batch_size": 4, "max_length": 64, "logging_steps": 1, "progress_bar": False},
        eval={"tasks": ["bbh", "perplexity", "chat_loss"], "bbh_source": str(bbh), "mode": "loglik",
              "text": str(text), "max_length": 32, "chat_data": str(chat), "chat_limit": 4},
    )
    config = load_experiment(path)
    assert config.data == str(chat)
    result = run_experiment(config)

    runs = result["runs"]
    assert [(r["arm"], r["seed"]) for r in runs] == [
        ("base", 0), ("linear", 0), ("linear", 1), ("kan", 0), ("kan", 1)]
    rows = {row["arm"]: row for row in result["rows"]}
    assert rows["base"]["trainable_parameters"] == 0
    assert rows["kan"]["trainable_parameters"] > 0 and rows["linear"]["trainable_parameters"] > 0
    assert rows["kan"]["bbh_accuracy"]["n"] == 2 and 0.0 <= rows["kan"]["bbh_accuracy"]["mean"] <= 1.0
    assert all(len(run["losses"]) == 2 for run in runs if run["arm"] != "base")
    assert all(run["init"] == "fit" and set(run["fit_report"]["relative_error"]) == {2}
               for run in runs if run["arm"] == "kan")
    assert all("fit_report" not in run for run in runs if run["arm"] != "kan")

    out = tmp_path / "out"
    report = (out / "results.md").read_text()
    for arm in rows:
        assert f"| {arm} |" in report
    assert json.loads((out / "results.json").read_text())["arms"][0]["arm"] == "base"
    for png in ("loss_curves.png", "accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_summarize_reports_mean_and_sample_std_over_seeds():
    def run(arm, seed, accuracy):
        return {"arm": arm, "seed": seed, "trainable_parameters": 7, "train_seconds": 1.0, "peak_memory_bytes": None,
                "eval": {"bbh": {"average": accuracy}}}

    (row,) = summarize([run("a", 0, 0.4), run("a", 1, 0.6)])
    assert row["bbh_accuracy"]["mean"] == pytest.approx(0.5)
    assert row["bbh_accuracy"]["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert row["perplexity"] is None and row["peak_memory_bytes"] is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"colour": "blue"}, "unknown experiment keys"),
        ({"arms": {"x": {"kind": "mlp"}}}, "unknown kind 'mlp'"),
        ({"arms": {"x": {"kind": "baseline", "distill": True}}}, "cannot distill"),
        ({"arms": {"x": {"kind": "kan"}}}, "trained arms need 'data'"),
        ({"data": "${KALLM_SURELY_UNSET_VARIABLE}/x.jsonl"}, "KALLM_SURELY_UNSET_VARIABLE is not set"),
        ({"data": "d.jsonl", "arms": {"x": {"kind": "kan"}}, "train": {"seed": 3}}, "set per run"),
        ({"data": "d.jsonl", "arms": {"x": {"kind": "kan"}}, "train": {"trainable": "most"}}, "trainable must be"),
        ({"seeds": []}, "at least one seed"),
        ({"arms": {"x": {"kind": "kan", "init": "warm"}}}, "unknown init 'warm'; valid choices: random, fit"),
        ({"arms": {"x": {"kind": "linear", "init": "fit"}}}, "use it with kind 'kan'"),
        ({"data": "d.jsonl", "arms": {"x": {"kind": "kan"}}, "retrofit": {"last_n": 2, "init": "fit"}},
         "set per arm"),
        ({"arms": {"../../../tmp/escaped": {"kind": "baseline"}}}, r"arm name '\.\./\.\./\.\./tmp/escaped' is not allowed.*"
                                                                   r"a letter or digit, then letters, digits"),
        ({"arms": {"a..b": {"kind": "baseline"}}}, r"arm name 'a\.\.b' is not allowed"),
        ({"arms": {".hidden": {"kind": "baseline"}}}, r"arm name '\.hidden' is not allowed"),
        ({"arms": {"a/b": {"kind": "baseline"}}}, r"arm name 'a/b' is not allowed"),
        ({"arms": {7: {"kind": "baseline"}}}, r"arm name 7 is not allowed"),
        ({"arms": {"x": {"kind": "kan", "colour": "red"}}}, r"arm 'x': unknown settings \['colour'\]; valid: distill"),
        ({"arms": {"x": "kan"}}, r"arm 'x': settings must be a mapping"),
        ({"seeds": ["/../../../tmp"]}, "seeds must be a list of integers"),
        ({"data": "d.jsonl", "arms": {"x": {"kind": "kan"}}, "train": {"max_steps": "ten"}},
         r"max_steps must be an integer >= 1 \(or -1\), got 'ten'"),
        ({"data": "d.jsonl", "arms": {"x": {"kind": "kan"}}, "train": {"learning_rate": float("nan")}},
         "learning_rate must be a finite number > 0, got nan"),
        ({"retrofit": 5}, "a setting has the wrong type"),
        ({"seeds": [1, 2, 1]}, r"seeds \[1\] given more than once"),
        ({"data": "${HOME}/x.jsonl"}, r"uses \$\{HOME\}, but only environment variables whose names start with KALLM_"),
        ({"out": "${PATH}"}, r"uses \$\{PATH\}, but only"),
    ],
)
def test_bad_configs_are_refused_with_a_clear_message(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_experiment(write_config(tmp_path, **overrides))


@pytest.mark.parametrize("text, message", [
    ("name: [unclosed", r"is no valid YAML \(line 1, column 16\): expected ',' or '\]'"),
    ("- a\n- b\n", "a config is a mapping of settings, got list"),
    ("arms: {x: {kind: baseline}}\ncolour: red\n", r"unknown experiment keys \['colour'\]"),
    ("arms: {x: {kind: baseline}}\nretrofit: 5\n", "a setting has the wrong type"),
])
@pytest.mark.parametrize("command", ["experiment", "sweep"])
def test_config_errors_are_one_line_with_exit_status_2(tmp_path, capsys, monkeypatch, text, message, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(text.replace("experiment keys", f"{command} keys"))
    assert main([command, "bad.yaml"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"kallm {command}: error: ")
    expected = message.replace("experiment", command)
    if command == "sweep" and "retrofit" in text:
        expected = "'retrofit' must be a mapping"
    assert re.search(expected, error), error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_the_report_names_data_as_the_config_does_not_by_this_machines_folders(tmp_path, monkeypatch):
    data = tmp_path / "private" / "data"
    data.mkdir(parents=True)
    monkeypatch.setenv("KALLM_DATA_DIR", str(data))
    monkeypatch.setenv("KALLM_STEPS", "3")  # not a folder: left alone
    config = load_experiment(write_config(
        tmp_path, data="${KALLM_DATA_DIR}/chat/train.jsonl", arms={"x": {"kind": "kan"}},
        train={"max_steps": 3}, eval={"tasks": ["perplexity"], "text": "${KALLM_DATA_DIR}/wiki.raw"}))
    assert config.data == f"{data}/chat/train.jsonl"
    report = to_markdown(config, [])
    assert "data `${KALLM_DATA_DIR}/chat/train.jsonl`" in report and "'${KALLM_DATA_DIR}/wiki.raw'" in report
    assert str(tmp_path) not in report and "'max_steps': 3" in report


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="experiment config not found"):
        load_experiment(tmp_path / "nope.yaml")


def test_shipped_recipes_load(monkeypatch):
    monkeypatch.setenv("KALLM_DATA_DIR", "/data")
    small = load_experiment(CONFIGS / "cpu-small.yaml")
    research = load_experiment(CONFIGS / "research.yaml")
    assert small.data == "/data/chat/oasst_en100/all_paths.jsonl"
    assert [arm.name for arm in research.arms][:2] == ["baseline", "linear-restart"] and research.seeds == [0, 1, 2]
    assert research.retrofit == {"last_n": 5, "basis": "cheby2", "degree": 2, "form": "kan"}  # the research's form
    for recipe in (small, research):
        assert {(arm.kind, arm.init) for arm in recipe.arms} >= {("kan", "random"), ("kan", "fit")}


class StopRun(Exception):
    pass


def test_each_run_is_seeded_with_transformers_set_seed(workspace, monkeypatch):
    tmp_path, model_dir, *_ = workspace
    config = load_experiment(write_config(tmp_path, model=str(model_dir)))
    seeds = []
    monkeypatch.setattr(kallm.recipes.experiment, "set_seed", seeds.append)

    def load_model(name):
        raise StopRun  # seeding comes before anything else, so the run can stop here

    monkeypatch.setattr(kallm.recipes.experiment, "load_model", load_model)
    with pytest.raises(StopRun):
        kallm.recipes.experiment.run_arm(config, config.arms[0], 7)
    assert seeds == [7]


@pytest.fixture
def fake_runs(monkeypatch):
    """run_arm replaced by a stand-in that records which (arm, seed) pairs ran."""
    ran = []

    def run_arm(config, arm, seed):
        ran.append((arm.name, seed))
        return {"arm": arm.name, "seed": seed, "trainable_parameters": 1, "train_seconds": 0.0,
                "peak_memory_bytes": None, "losses": [], "eval": {"bbh": {"average": 0.5}}}

    monkeypatch.setattr(kallm.recipes.experiment, "run_arm", run_arm)
    monkeypatch.setattr(kallm.recipes.experiment, "plot_results", lambda records, rows, out: [])
    return ran


def test_experiment_resumes_from_runs_json_unless_restarted(tmp_path, fake_runs, capsys):
    def config(train_steps):
        return load_experiment(write_config(
            tmp_path, out=str(tmp_path / "out"), seeds=[0, 1], data="chat.jsonl", train={"max_steps": train_steps},
            arms={"base": {"kind": "baseline"}, "kan": {"kind": "kan"}}))

    first = run_experiment(config(2))
    assert fake_runs == [("base", 0), ("kan", 0), ("kan", 1)]

    fake_runs.clear()
    del first["runs"][2]  # as if the first invocation stopped before its last run
    (tmp_path / "out" / "runs.json").write_text(json.dumps(first["runs"]))
    resumed = run_experiment(config(2))
    assert fake_runs == [("kan", 1)]
    assert [(run["arm"], run["seed"]) for run in resumed["runs"]] == [("base", 0), ("kan", 0), ("kan", 1)]
    log = capsys.readouterr().out
    assert "arm kan, seed 0: already in runs.json with the same settings, skipped (--restart runs it again)" in log

    fake_runs.clear()  # other training settings: only the trained arm runs again
    run_experiment(config(3))
    assert fake_runs == [("kan", 0), ("kan", 1)]
    assert "arm kan, seed 0: in runs.json with other settings, running it again" in capsys.readouterr().out

    fake_runs.clear()
    assert main(["experiment", str(tmp_path / "experiment.yaml"), "--restart"]) == 0
    assert fake_runs == [("base", 0), ("kan", 0), ("kan", 1)]


@pytest.mark.parametrize("content, problem", [("{not json", "not valid JSON"), ('{"arm": "base"}', "not a list")])
def test_a_damaged_runs_json_is_refused_before_anything_runs(tmp_path, fake_runs, content, problem):
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs.json").write_text(content)
    config = load_experiment(write_config(tmp_path, out=str(out)))
    with pytest.raises(ValueError, match=f"runs.json is {problem}.*--restart"):
        run_experiment(config)
    assert fake_runs == [] and (out / "runs.json").read_text() == content
    run_experiment(config, restart=True)
    assert fake_runs == [("base", 0)]
