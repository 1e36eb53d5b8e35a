"""``kallm sweep CONFIG.yaml``: many KAN variants of a mini model on a classification task, over seeds.

The model is shrunk once (``kallm.shrink``: a few blocks, the vocabulary of the training texts) and saved in
``OUT/mini-model``; every arm starts from it as a sequence classifier, changes its feedforwards (a KAN basis, the
linear restart, or none: the original MLP retrained), trains on the training rows and is scored on the dev rows.
``results.md``, ``results.json`` and ``accuracy_vs_time.png`` (with the Pareto front) are written at the end.

It shares what ``kallm experiment`` uses too (``runs``): ``${KALLM_*}`` variables in the config, arm names, and
``runs.json`` (an interrupted sweep resumes from the runs it recorded; ``--restart`` runs everything again). It
trains through ``kallm.train.classifier`` and scores through ``kallm.eval.classification``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import re
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..checkpoints.load import DEFAULT_MODEL
from ..core.layers import KANFeedForward
from ..data.classification import encode, read_rows
from ..eval.classification import accuracy
from ..train.classifier import train_classifier
from ..values import Number, non_negative_float, non_negative_int, positive_float, positive_int
from ..values import seed as seed_range
from .runs import (
    ARM_NAME,
    ARM_NAME_RULE,
    PeakMemory,
    check_unique_seeds,
    portable_paths,
    read_config,
    run_recorded,
)

#: what an arm does to the mini model's feedforwards: KAN ones, the linear restart, or nothing (MLP retrained)
SWEEP_KINDS = ("kan", "linear", "mlp")
#: the KAN feedforward forms an arm may take (``form="glu"`` keeps the MLP, which a sweep retrains as kind mlp)
SWEEP_FORMS = ("kan", "gated")
#: arm settings that are not KAN layer options
ARM_KEYS = ("kind", "form", "basis", "degree", "last_n", "blocks", "intermediate_size", "learning_rate_scales")
#: arm settings that change how the arm trains rather than what it is (over the config's ``train`` section)
ARM_TRAIN_KEYS = ("learning_rate_scales",)
DATA_KEYS = ("train", "dev", "train_split", "dev_split", "text_column", "label_column", "train_limit", "dev_limit",
             "num_labels")
#: the numeric settings of data and train, with their valid values
DATA_RANGES = {"train_limit": positive_int, "dev_limit": positive_int, "num_labels": Number(int, 2)}
TRAIN_RANGES = {"steps": positive_int, "batch_size": positive_int, "warmup_steps": non_negative_int,
                "max_length": Number(int, 2), "learning_rate": positive_float, "weight_decay": non_negative_float,
                "eval_batch_size": positive_int, "eval_every": positive_int}
SHRINK_RANGES = {"num_blocks": positive_int, "max_tokens": positive_int}
#: in ``OUT/models/ARM``: the arm's settings as the config wrote them and as they were run
ARM_SETTINGS_FILE = "arm_settings.json"
TRAIN_KEYS = ("steps", "batch_size", "max_length", "learning_rate", "warmup_steps", "weight_decay", "eval_batch_size",
              "eval_every", "learning_rate_scales")


@dataclass
class SweepConfig:
    name: str
    data: dict
    arms: dict
    model: str = DEFAULT_MODEL
    out: str = "runs/sweep"
    seeds: list[int] = field(default_factory=lambda: [0])
    #: kallm.shrink keyword arguments besides vocab_from (num_blocks, blocks, max_tokens); the vocabulary comes from
    #: the training texts unless ``trim_vocabulary`` is false
    shrink: dict = field(default_factory=lambda: {"num_blocks": 3})
    trim_vocabulary: bool = True
    #: defaults of every arm (kallm.retrofit keyword arguments: last_n, basis, degree, layer options)
    retrofit: dict = field(default_factory=lambda: {"last_n": 1, "basis": "cheby2", "degree": 2})
    train: dict = field(default_factory=dict)
    #: each entry maps arm settings to lists of values; every combination becomes an arm named after its values
    grid: list[dict] = field(default_factory=list)


def load_sweep(path: str | os.PathLike) -> SweepConfig:
    """Read a YAML sweep config, expand its grid into arms and check every setting, before anything runs."""
    path = Path(path)
    raw = read_config(path, "sweep")
    known = {f.name for f in fields(SweepConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown sweep keys {unknown}; valid keys: {', '.join(sorted(known))}")
    raw.setdefault("name", path.stem)
    for key in ("data", "arms", "shrink", "retrofit", "train"):
        if key in raw and not isinstance(raw[key] or {}, dict):
            raise ValueError(f"'{key}' must be a mapping, got {raw[key]!r}")
    raw["arms"] = raw.get("arms") or {}
    if "data" not in raw:
        raise ValueError("a sweep needs 'data': {train: FILE_OR_HUB_ID, dev: FILE_OR_HUB_ID}")
    config = SweepConfig(**raw)
    config.arms = {**expand_grid(config.grid), **config.arms}
    check_sweep(config)
    return config


def expand_grid(grid) -> dict:
    """Arms from grid entries such as ``{basis: [cheby2, legendre], degree: [2, 3]}``: every combination, named
    after its values (``cheby2-d2``, ``legendre-d3``; other settings as ``key_value``). The names become folder
    names, so they hold only letters, digits, ``.``, ``_`` and ``-``; two combinations that would read alike get
    ``-2``, ``-3``, ... Each arm's settings are stored with its results, so no value is lost to the name."""
    if not isinstance(grid, list) or not all(isinstance(entry, dict) for entry in grid):
        raise ValueError(f"'grid' must be a list of mappings from arm settings to lists of values, got {grid!r}")
    arms = {}
    for entry in grid:
        keys = list(entry)
        values = [value if isinstance(value, list) else [value] for value in entry.values()]
        for combination in itertools.product(*values):
            settings = dict(zip(keys, combination))
            parts = [str(settings.get("basis", settings.get("kind", "kan")))]
            parts += [f"d{settings['degree']}"] if "degree" in settings else []
            parts += [f"{key}_{value}" for key, value in settings.items() if key not in ("basis", "degree", "kind")]
            name = safe_arm_name("-".join(parts))
            unique, number = name, 1
            while unique in arms:
                number += 1
                unique = f"{name}-{number}"
            arms[unique] = settings
    return arms


def safe_arm_name(text: str) -> str:
    """``text`` as a folder name that is valid everywhere (``ARM_NAME``): composed bases read ``a_plus_b`` and
    ``a_then_b``, any other character but letters, digits, ``.``, ``_`` and ``-`` becomes ``_``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace(">", "_then_").replace("+", "_plus_"))
    return re.sub(r"_{2,}", "_", re.sub(r"\.{2,}", ".", name)).strip("._-") or "arm"


def check_sweep(config: SweepConfig) -> None:
    """Refuse a sweep that would fail later, naming the setting and the valid choices."""
    if not config.arms:
        raise ValueError("a sweep needs at least one arm ('arms' or 'grid')")
    if not isinstance(config.seeds, list) or not config.seeds or not all(seed_range.accepts(s) for s in config.seeds):
        raise ValueError(f"seeds must be a non-empty list of integers in [0, {seed_range.high}], got {config.seeds!r}")
    check_unique_seeds(config.seeds, "seeds")
    for section, valid in (("data", DATA_KEYS), ("train", TRAIN_KEYS)):
        unknown = sorted(set(getattr(config, section)) - set(valid))
        if unknown:
            raise ValueError(f"unknown {section} settings {unknown}; valid: {', '.join(valid)}")
    for key in ("train", "dev"):
        if not isinstance(config.data.get(key), str):
            raise ValueError(f"data.{key} must name a local .jsonl/.csv file or a hub dataset, got "
                             f"{config.data.get(key)!r}")
    for section, ranges in (("data", DATA_RANGES), ("train", TRAIN_RANGES), ("shrink", SHRINK_RANGES)):
        for key, valid in ranges.items():
            valid.check(f"{section}.{key}", getattr(config, section).get(key))
    for key in ("text_column", "label_column", "train_split", "dev_split"):
        if not isinstance(config.data.get(key, ""), str):
            raise ValueError(f"data.{key} must be a name, got {config.data[key]!r}")
    if "learning_rate_scales" in config.train:
        from ..train.parameter_groups import check_role_scales

        check_role_scales(config.train["learning_rate_scales"], "train.learning_rate_scales")
    unknown = sorted(set(config.shrink) - {"num_blocks", "blocks", "max_tokens"})
    if unknown:
        raise ValueError(f"unknown shrink settings {unknown}; valid: num_blocks, blocks, max_tokens")
    for name in config.arms:
        arm_settings(config, name)


def arm_settings(config: SweepConfig, name: str) -> dict:
    """The arm's settings merged over the config's retrofit defaults, checked (basis, options, kind). An arm's
    ``learning_rate_scales`` (``{role: scale}``, see ``kallm.parameter_groups``) is kept with them and overrides the
    config's ``train.learning_rate_scales`` for that arm alone."""
    if not isinstance(name, str) or not ARM_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"arm name {name!r} is not allowed: arm names become folder names, so they must be "
                         f"{ARM_NAME_RULE}")
    own = config.arms[name] or {}
    if not isinstance(own, dict):
        raise ValueError(f"arm {name!r}: settings must be a mapping such as {{basis: cheby2, degree: 2}}, got {own!r}")
    kind = own.get("kind", "kan")
    if kind not in SWEEP_KINDS:
        raise ValueError(f"arm {name!r}: unknown kind {kind!r}; valid choices: {', '.join(SWEEP_KINDS)}")
    settings = {**config.retrofit, **own, "kind": kind}
    if "learning_rate_scales" in own:
        from ..train.parameter_groups import check_role_scales

        check_role_scales(own["learning_rate_scales"], f"arm {name!r}: learning_rate_scales")
    training = {key: own[key] for key in ARM_TRAIN_KEYS if key in own}
    if kind == "mlp":
        return {"kind": "mlp", **training}
    if kind == "linear":
        return {**{key: settings[key] for key in ("kind", "last_n", "blocks") if key in settings}, **training}
    options = {key: value for key, value in settings.items() if key not in ARM_KEYS}
    form = settings.get("form", "kan")
    if form not in SWEEP_FORMS:
        raise ValueError(f"arm {name!r}: unknown form {form!r}; valid choices: {', '.join(SWEEP_FORMS)}")
    try:  # builds the basis with its options without allocating anything; unknown bases name the valid ones
        KANFeedForward.count_parameters(8, 8, settings.get("basis", "cheby2"), settings.get("degree", 2),
                                        gated=form == "gated", **options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"arm {name!r}: {error}") from error
    return settings


def load_data(config: SweepConfig) -> tuple[list[dict], list[dict], int]:
    """Training rows, dev rows and the number of labels, checked: every label in ``0 .. num_labels - 1``."""
    data = config.data
    columns = data.get("text_column", "text"), data.get("label_column", "label")
    train = read_rows(data["train"], data.get("train_split", "train"), *columns, data.get("train_limit"))
    dev = read_rows(data["dev"], data.get("dev_split", "test"), *columns, data.get("dev_limit"))
    num_labels = data.get("num_labels") or max(row["label"] for row in train) + 1
    for source, rows in ((data["train"], train), (data["dev"], dev)):
        bad = sorted({row["label"] for row in rows if not 0 <= row["label"] < num_labels})
        if bad:
            raise ValueError(f"{source} has labels {bad[:5]} outside 0..{num_labels - 1} ({num_labels} classes); "
                             f"labels must be class indices (set data.num_labels if the training rows lack a class)")
    return train, dev, num_labels


def rows_digest(*row_lists: list[dict]) -> str:
    """A hash of the rows' texts and labels: a run recorded on other data (an edited file under the same path)
    is not taken for a finished one."""
    return hashlib.sha256(json.dumps(row_lists, ensure_ascii=False).encode("utf-8")).hexdigest()


def prepare_mini_model(config: SweepConfig, train_rows: list[dict]) -> Path:
    """``OUT/mini-model``: the shrunk model and its tokenizer, made once (kept while the settings match)."""
    from ..checkpoints.load import load_model
    from ..checkpoints.save import save_checkpoint
    from ..surgery.shrink import shrink

    folder = Path(config.out) / "mini-model"
    settings = {"model": config.model, "shrink": config.shrink, "trim_vocabulary": config.trim_vocabulary,
                "train": config.data["train"], "train_limit": config.data.get("train_limit"),
                "train_rows": rows_digest(train_rows)}
    record = folder / "kallm_sweep_mini_model.json"
    if record.is_file() and json.loads(record.read_text(encoding="utf-8")) == settings:
        return folder
    print(f"=== shrinking {config.model}: {config.shrink}, vocabulary of the {len(train_rows)} training texts",
          flush=True)
    model, tokenizer = load_model(config.model)
    texts = [row["text"] for row in train_rows] if config.trim_vocabulary else None
    small, small_tokenizer = shrink(model, tokenizer, vocab_from=texts, **config.shrink)
    if small_tokenizer.pad_token is None:
        raise ValueError(f"the tokenizer of {config.model} has no pad token and no eos token to pad with; a "
                         f"classifier needs one to batch texts")
    save_checkpoint(small, small_tokenizer, folder)
    record.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return folder


@dataclass
class SweepInputs:
    """What every run of a sweep starts from, prepared once: the mini model loaded as a classifier (its new head
    still to be drawn per seed), its tokenizer, and the training and dev rows tokenized."""

    classifier: torch.nn.Module
    head: list[str]
    tokenizer: object
    train: list
    dev: list


def prepare_inputs(config: SweepConfig, mini_model: Path, data) -> SweepInputs:
    """Load the mini model as a classifier and tokenize the rows, once for the whole sweep."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train_rows, dev_rows, num_labels = data
    tokenizer = AutoTokenizer.from_pretrained(mini_model)
    classifier, loading = AutoModelForSequenceClassification.from_pretrained(
        mini_model, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id, dtype=torch.float32,
        output_loading_info=True,
    )
    max_length = config.train.get("max_length", 64)
    return SweepInputs(classifier, sorted(loading["missing_keys"]), tokenizer,
                       encode(tokenizer, train_rows, max_length), encode(tokenizer, dev_rows, max_length))


def build_arm(inputs: SweepInputs, settings: dict, seed: int):
    """A copy of the mini classifier with its head drawn from ``seed``, its feedforwards changed as the arm says."""
    from transformers import set_seed

    from ..surgery.retrofit import retrofit

    set_seed(seed)
    model = copy.deepcopy(inputs.classifier)
    for name in inputs.head:  # the head is new (not in the mini model): drawn for each seed as transformers does
        model._init_weights(model.get_submodule(name.rpartition(".")[0]))
    if settings["kind"] != "mlp":
        retrofit(model, **{key: value for key, value in settings.items() if key not in ARM_TRAIN_KEYS})
    return model


def run_sweep_arm(config: SweepConfig, name: str, seed: int, inputs: SweepInputs, save_models: bool) -> dict:
    from ..checkpoints.save import save_checkpoint
    from ..core.layers import count_parameters

    settings = arm_settings(config, name)
    model = build_arm(inputs, settings, seed)
    pad_id = inputs.tokenizer.pad_token_id

    def score(trained):
        return accuracy(trained, inputs.dev, pad_id, config.train.get("eval_batch_size", 250))

    training = {**config.train, **{key: settings[key] for key in ARM_TRAIN_KEYS if key in settings}}
    with PeakMemory() as memory:
        record = train_classifier(model, inputs.train, pad_id, training, seed, score)
    record.update(
        arm=name, seed=seed, accuracy=record["curve"][-1][1] if "curve" in record else score(model),
        trainable_parameters=count_parameters(model, trainable_only=True), total_parameters=count_parameters(model),
        peak_memory_bytes=memory.peak_bytes,
    )
    print(f"    accuracy {100 * record['accuracy']:.1f}%, {record['train_seconds']:.0f} s "
          f"({record['seconds_per_step']:.2f} s/step)", flush=True)
    if save_models:
        folder = Path(config.out) / "models" / name
        save_checkpoint(model, inputs.tokenizer, folder / f"seed{seed}")
        # the arm's name is made fit for a folder; its settings as written are kept beside its models
        (folder / ARM_SETTINGS_FILE).write_text(
            json.dumps({"arm": name, "settings": config.arms[name], "resolved": settings}, indent=2, default=str)
            + "\n", encoding="utf-8")
    return record


def summarize_sweep(records: list[dict], dev_size: int) -> list[dict]:
    """One row per arm: accuracy mean, std and standard error over seeds, parameters, times, memory."""
    rows = []
    for arm in dict.fromkeys(record["arm"] for record in records):
        runs = [record for record in records if record["arm"] == arm]
        values = [run["accuracy"] for run in runs]
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        # the error of the mean: seed-to-seed spread, or with one seed the binomial error of one dev set
        error = std / math.sqrt(len(values)) if len(values) > 1 else math.sqrt(mean * (1 - mean) / dev_size)
        rows.append({
            "arm": arm, "seeds": [run["seed"] for run in runs],
            "accuracy": {"mean": mean, "std": std, "stderr": error, "n": len(values)},
            "trainable_parameters": runs[0]["trainable_parameters"], "total_parameters": runs[0]["total_parameters"],
            "train_seconds": statistics.fmean(run["train_seconds"] for run in runs),
            "seconds_per_step": statistics.fmean(run["seconds_per_step"] for run in runs),
            "peak_memory_bytes": max(run["peak_memory_bytes"] for run in runs),
            **({"curve": mean_curve(runs)} if all("curve" in run for run in runs) else {}),
        })
    front = pareto_front(rows)
    for row in rows:
        row["pareto"] = row["arm"] in front
    return rows


def mean_curve(runs: list[dict]) -> list[dict]:
    """Dev accuracy against steps over an arm's seeds: ``[{"step", "mean", "stderr"}]`` at the steps every run
    scored."""
    steps = sorted(set.intersection(*({step for step, _ in run["curve"]} for run in runs)))
    points = []
    for step in steps:
        values = [dict(run["curve"])[step] for run in runs]
        error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        points.append({"step": step, "mean": statistics.fmean(values), "stderr": error})
    return points


def pareto_front(rows: list[dict]) -> set[str]:
    """Arms no other arm beats on both accuracy (higher) and training time (lower)."""
    return {
        row["arm"] for row in rows
        if not any(other["accuracy"]["mean"] >= row["accuracy"]["mean"] and other["train_seconds"] <= row["train_seconds"]
                   and (other["accuracy"]["mean"], other["train_seconds"]) != (row["accuracy"]["mean"], row["train_seconds"])
                   for other in rows)
    }


def sweep_markdown(config: SweepConfig, rows: list[dict], dev_size: int) -> str:
    memory = "peak GPU memory" if torch.cuda.is_available() else "peak RSS"
    lines = [
        f"# Sweep {config.name}", "",
        f"Model `{config.model}` shrunk with {config.shrink}"
        f"{', vocabulary of the training texts' if config.trim_vocabulary else ''}; arm defaults {config.retrofit}; "
        f"training {config.train}; seeds {config.seeds}; {dev_size} dev rows. Accuracy: mean ± std over seeds "
        f"(standard error of the mean in brackets). * marks the Pareto front of accuracy against training time.", "",
        f"| arm | accuracy | trainable params | total params | train time | s/step | {memory} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        stat = row["accuracy"]
        lines.append(
            f"| {row['arm']}{' *' if row['pareto'] else ''} | {100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}% "
            f"({100 * stat['stderr']:.1f}) | {row['trainable_parameters']:,} | {row['total_parameters']:,} | "
            f"{row['train_seconds']:.0f} s | {row['seconds_per_step']:.3f} | {row['peak_memory_bytes'] / 2**30:.2f} GiB |"
        )
    lines += curve_table(rows)
    return portable_paths("\n".join(lines) + "\n")


def curve_table(rows: list[dict]) -> list[str]:
    """Markdown lines: dev accuracy against training steps (mean over seeds), for the arms scored along the way."""
    curves = [row for row in rows if row.get("curve")]
    if not curves:
        return []
    steps = sorted({point["step"] for row in curves for point in row["curve"]})
    lines = ["", "Dev accuracy (%) against training steps, mean over seeds (train.eval_every):", "",
             "| arm | " + " | ".join(str(step) for step in steps) + " |", "| --- |" + " ---: |" * len(steps)]
    for row in curves:
        by_step = {point["step"]: point["mean"] for point in row["curve"]}
        cells = [f"{100 * by_step[step]:.1f}" if step in by_step else "" for step in steps]
        lines.append(f"| {row['arm']} | " + " | ".join(cells) + " |")
    return lines


def plot_sweep(rows: list[dict], path: Path) -> Path:
    """Accuracy against training time, one point per arm with its standard error, the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 6))
    for row in rows:
        color = "tab:red" if row["pareto"] else "tab:blue"
        axis.errorbar(row["train_seconds"], 100 * row["accuracy"]["mean"], yerr=100 * row["accuracy"]["stderr"],
                      fmt="o", color=color, capsize=3)
        axis.annotate(row["arm"], (row["train_seconds"], 100 * row["accuracy"]["mean"]), fontsize=7,
                      textcoords="offset points", xytext=(4, 3))
    front = sorted((row for row in rows if row["pareto"]), key=lambda row: row["train_seconds"])
    axis.plot([row["train_seconds"] for row in front], [100 * row["accuracy"]["mean"] for row in front],
              color="tab:red", linestyle="--", label="Pareto front")
    axis.set_xlabel("training time per run (s)")
    axis.set_ylabel("dev accuracy (%), mean ± standard error over seeds")
    axis.set_title("Accuracy against training time, one point per arm")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_curves(rows: list[dict], path: Path) -> Path | None:
    """Dev accuracy against training steps, one line per arm (mean over seeds, standard error shaded)."""
    curves = [row for row in rows if row.get("curve")]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 6))
    for row in curves:
        steps = [point["step"] for point in row["curve"]]
        mean = [100 * point["mean"] for point in row["curve"]]
        error = [100 * point["stderr"] for point in row["curve"]]
        dashed = "--" if row["arm"].startswith("fully") else "-"
        line, = axis.plot(steps, mean, dashed, marker="o", markersize=3, label=row["arm"])
        axis.fill_between(steps, [m - e for m, e in zip(mean, error)], [m + e for m, e in zip(mean, error)],
                          color=line.get_color(), alpha=0.15)
    axis.set_xlabel("training steps")
    axis.set_ylabel("dev accuracy (%), mean ± standard error over seeds")
    axis.set_title("Dev accuracy against training steps")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def run_sweep(config: SweepConfig, restart: bool = False, save_models: bool = False) -> dict:
    """Run every arm for every seed (resuming from ``OUT/runs.json``), then write the report and the plot."""
    data = load_data(config)  # bad data fails here, before anything is loaded or written
    out = Path(config.out)
    mini_model = prepare_mini_model(config, data[0])
    inputs = prepare_inputs(config, mini_model, data)
    digest = rows_digest(*data[:2])
    jobs = [(name, seed, _run_settings(config, name, save_models, digest))
            for name in config.arms for seed in config.seeds]
    records = run_recorded(out, jobs, lambda name, seed: run_sweep_arm(config, name, seed, inputs, save_models),
                           restart)
    rows = summarize_sweep(records, len(data[1]))
    report = sweep_markdown(config, rows, len(data[1]))
    (out / "results.md").write_text(report, encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps({"config": asdict(config), "arms": rows, "runs": records}, indent=2, default=str) + "\n",
        encoding="utf-8",
    )
    plot = plot_sweep(rows, out / "accuracy_vs_time.png")
    curves = plot_curves(rows, out / "accuracy_vs_steps.png")
    print(report)
    return {"rows": rows, "runs": records, "report": str(out / "results.md"), "plot": str(plot),
            "curves": str(curves) if curves else None}


def _run_settings(config: SweepConfig, name: str, save_models: bool, data_digest: str) -> dict:
    """What decides a run's result besides its seed, as runs.json stores it: the data by its content (``data_digest``
    of the training and dev rows), not only by where it is."""
    settings = {"model": config.model, "shrink": config.shrink, "trim_vocabulary": config.trim_vocabulary,
                "data": config.data, "data_rows": data_digest, "train": config.train,
                "arm": arm_settings(config, name)}
    if save_models:  # a run recorded without its saved model runs again when models are asked for
        settings["saved_model"] = True
    return json.loads(json.dumps(settings, default=str))


