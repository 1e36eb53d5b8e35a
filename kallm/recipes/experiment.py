"""``kallm experiment CONFIG.yaml``: train and evaluate several arms over seeds, then
write ``results.md``, ``results.json`` and plots.

A config names the model, the retrofit, the arms, the seeds, the data, the training and
the evaluation settings (see ``configs/``). ``${VAR}`` in string values is replaced by the
environment variable ``VAR``, so recipes stay portable; only variables named ``KALLM_*`` are
expanded (e.g. ``${KALLM_DATA_DIR}``), so a config cannot read the rest of the environment.

Every finished run is recorded in ``OUT/runs.json`` with its settings; running the same config again skips the
runs recorded with the same settings (``--restart`` runs them all again).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from transformers import set_seed

from ..checkpoints.load import DEFAULT_MODEL, load_model
from ..core.retrofit_config import INITS
from ..eval.evaluate import evaluate
from ..surgery.retrofit import retrofit
from ..surgery.trainable import set_trainable
from ..train.trainer import TrainConfig, train
from .runs import ARM_NAME, ARM_NAME_RULE, PeakMemory, check_unique_seeds, portable_paths, read_config, run_recorded

ARM_KINDS = ("baseline", "linear", "kan")


@dataclass
class Arm:
    """One experimental condition.

    kind: ``baseline`` (the untouched model, evaluated only), ``linear`` (the MLPs of the
    retrofitted blocks re-initialised, the research's "linear restart") or ``kan``.
    init: ``random`` or ``fit`` (KAN arms only): the KAN feedforwards start fitted to the
    MLPs they replace, on the default calibration (replies the original model writes).
    distill: train with the original model as teacher.
    """

    name: str
    kind: str = "kan"
    init: str = "random"
    distill: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not ARM_NAME.fullmatch(self.name) or ".." in self.name:
            raise ValueError(f"arm name {self.name!r} is not allowed: arm names become folder names, so they must be "
                             f"{ARM_NAME_RULE}")
        if self.kind not in ARM_KINDS:
            raise ValueError(f"arm {self.name!r}: unknown kind {self.kind!r}; valid choices: {', '.join(ARM_KINDS)}")
        if self.init not in INITS:
            raise ValueError(f"arm {self.name!r}: unknown init {self.init!r}; valid choices: {', '.join(INITS)}")
        if self.init == "fit" and self.kind != "kan":
            raise ValueError(f"arm {self.name!r}: init 'fit' fits KAN feedforwards; use it with kind 'kan'")
        if self.kind == "baseline" and self.distill:
            raise ValueError(f"arm {self.name!r}: the baseline is not trained, so it cannot distill")


@dataclass
class ExperimentConfig:
    name: str
    arms: list[Arm]
    data: str | None = None
    model: str = DEFAULT_MODEL
    out: str = "runs/experiment"
    seeds: list[int] = field(default_factory=lambda: [0])
    #: keyword arguments of kallm.retrofit (last_n, basis, degree, layer options, ...)
    retrofit: dict = field(default_factory=lambda: {"last_n": 5, "basis": "cheby2", "degree": 2})
    #: TrainConfig fields (output_dir and seed are set per run)
    train: dict = field(default_factory=dict)
    #: keyword arguments of kallm.eval.evaluate.evaluate (tasks, bbh_source, mode, limit, ...)
    eval: dict = field(default_factory=lambda: {"tasks": ["bbh"]})

    def __post_init__(self):
        if not self.arms:
            raise ValueError("an experiment needs at least one arm")
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        if not self.seeds:
            raise ValueError("an experiment needs at least one seed")
        if not isinstance(self.seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                       for s in self.seeds):
            raise ValueError(f"seeds must be a list of integers, got {self.seeds!r}")
        check_unique_seeds(self.seeds, "seeds")
        if self.data is None and any(arm.kind != "baseline" for arm in self.arms):
            raise ValueError("trained arms need 'data' (a chat dataset: local file or hub id)")
        reserved = {"output_dir", "seed"} & set(self.train)
        if reserved:
            raise ValueError(f"train settings {sorted(reserved)} are set per run by the experiment; remove them")
        per_arm = {"kind", "init", "calibration", "tokenizer"} & set(self.retrofit)
        if per_arm:
            raise ValueError(f"retrofit settings {sorted(per_arm)} are set per arm; move them to the arms")
        TrainConfig(**self.train)  # fail on a bad setting now, not after the first arm


def load_experiment(path: str | os.PathLike) -> ExperimentConfig:
    """Read and validate a YAML experiment config."""
    path = Path(path)
    raw = read_config(path, "experiment")
    known = {f.name for f in fields(ExperimentConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown experiment keys {sorted(unknown)}; valid keys: {', '.join(sorted(known))}")
    arms = raw.get("arms") or {}
    if not isinstance(arms, dict):
        raise ValueError("'arms' must map arm names to settings, e.g. {kan: {kind: kan, distill: true}}")
    arm_keys = {f.name for f in fields(Arm)} - {"name"}
    for name, settings in arms.items():
        if settings is not None and not isinstance(settings, dict):
            raise ValueError(f"arm {name!r}: settings must be a mapping such as {{kind: kan}}, got {settings!r}")
        unknown = set(settings or {}) - arm_keys
        if unknown:
            raise ValueError(f"arm {name!r}: unknown settings {sorted(unknown)}; valid: {', '.join(sorted(arm_keys))}")
    raw["arms"] = [Arm(name=name, **(settings or {})) for name, settings in arms.items()]
    raw.setdefault("name", path.stem)
    try:
        return ExperimentConfig(**raw)
    except (TypeError, AttributeError) as error:  # a value of the wrong type, e.g. retrofit: 5
        raise ValueError(f"{path}: a setting has the wrong type: {error}") from error


def run_arm(config: ExperimentConfig, arm: Arm, seed: int) -> dict:
    """Build, train and evaluate one arm with one seed; returns its record."""
    set_seed(seed)
    run_dir = Path(config.out) / arm.name / f"seed{seed}"
    model, tokenizer = load_model(config.model)
    teacher = copy.deepcopy(model).eval() if arm.distill else None
    record = {"arm": arm.name, "seed": seed, "kind": arm.kind, "init": arm.init, "distill": arm.distill}
    started = time.perf_counter()
    if arm.kind != "baseline":
        settings = config.retrofit
        if arm.kind == "linear":  # the restart keeps the MLP shape: only the block choice applies to it
            settings = {key: value for key, value in settings.items() if key in ("last_n", "blocks", "layers")}
        retrofit(model, kind=arm.kind, init=arm.init, tokenizer=tokenizer, **settings)
    if arm.init == "fit":
        record["fit_report"] = model.kallm_fit_report
    record["retrofit_seconds"] = round(time.perf_counter() - started, 1)
    if arm.kind == "baseline":
        record["trainable_parameters"] = 0
        record["train_seconds"] = 0.0
        record["peak_memory_bytes"] = None
        record["losses"] = []
    else:
        train_config = TrainConfig(**{**config.train, "output_dir": str(run_dir), "seed": seed})
        with PeakMemory() as memory:
            result = train(model, tokenizer, config.data, train_config, teacher=teacher)
        record["trainable_parameters"] = result.trainable_parameters
        record["train_seconds"] = round(result.metrics.get("train_runtime", 0.0), 1)
        record["peak_memory_bytes"] = memory.peak_bytes
        record["losses"] = [(entry["step"], entry["loss"]) for entry in result.log_history if "loss" in entry]
    del teacher
    set_trainable(model, "all")
    model.eval()
    record["eval"] = evaluate(model, tokenizer, progress=True, **config.eval)
    return record


def summarize(records: list[dict]) -> list[dict]:
    """One row per arm: metrics as mean and standard deviation over seeds."""
    rows = []
    for arm in dict.fromkeys(record["arm"] for record in records):
        runs = [record for record in records if record["arm"] == arm]
        row = {"arm": arm, "seeds": [run["seed"] for run in runs],
               "trainable_parameters": runs[0]["trainable_parameters"]}
        metrics = {
            "bbh_accuracy": [run["eval"]["bbh"]["average"] for run in runs if "bbh" in run["eval"]],
            "perplexity": [run["eval"]["perplexity"]["perplexity"] for run in runs if "perplexity" in run["eval"]],
            "chat_loss": [run["eval"]["chat_loss"]["loss"] for run in runs if "chat_loss" in run["eval"]],
            "train_seconds": [run["train_seconds"] for run in runs],
            "peak_memory_bytes": [run["peak_memory_bytes"] for run in runs if run["peak_memory_bytes"] is not None],
        }
        for name, values in metrics.items():
            values = [value for value in values if value is not None]
            row[name] = _mean_std(values) if values else None
        rows.append(row)
    return rows


def _mean_std(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def to_markdown(config: ExperimentConfig, rows: list[dict]) -> str:
    def cell(stat, scale=1.0, digits=1, suffix=""):
        if stat is None:
            return "-"
        return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}{suffix}"

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    memory_label = "peak GPU memory" if torch.cuda.is_available() else "peak RSS"
    lines = [
        f"# Experiment {config.name}", "",
        f"Model `{config.model}`, retrofit {config.retrofit}, seeds {config.seeds}, data `{config.data}`, "
        f"training {config.train}, evaluation {config.eval}; run on {device}. Values are mean ± std over seeds.", "",
        f"| arm | trainable params | BBH accuracy | perplexity | chat loss | {memory_label} | train time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['arm']} | {row['trainable_parameters']:,} | {cell(row['bbh_accuracy'], 100, 1, '%')} | "
            f"{cell(row['perplexity'], digits=2)} | {cell(row['chat_loss'], digits=3)} | "
            f"{cell(row['peak_memory_bytes'], 1 / 2**30, 2, ' GiB')} | {cell(row['train_seconds'], 1, 0, ' s')} |"
        )
    return portable_paths("\n".join(lines) + "\n")


def plot_results(records: list[dict], rows: list[dict], out: Path) -> list[Path]:
    """``loss_curves.png`` (training loss per arm and seed) and ``accuracy.png`` (BBH
    accuracy per arm with its standard deviation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figure, axis = plt.subplots(figsize=(7, 4))
    colors = {}
    for record in records:
        if not record["losses"]:
            continue
        label = None if record["arm"] in colors else record["arm"]  # one legend entry per arm
        color = colors.setdefault(record["arm"], f"C{len(colors)}")
        steps, losses = zip(*record["losses"])
        axis.plot(steps, losses, color=color, alpha=0.8, label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_title("Training loss per arm (one line per seed)")
    if colors:
        axis.legend()
    figure.tight_layout()
    paths.append(out / "loss_curves.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    scored = [row for row in rows if row["bbh_accuracy"] is not None]
    if scored:
        figure, axis = plt.subplots(figsize=(7, 4))
        means = [100 * row["bbh_accuracy"]["mean"] for row in scored]
        errors = [100 * row["bbh_accuracy"]["std"] for row in scored]
        axis.bar([row["arm"] for row in scored], means, yerr=errors, capsize=4, color="tab:blue")
        axis.set_ylabel("BBH accuracy (%)")
        axis.set_title("BBH accuracy per arm (mean ± std over seeds)")
        plt.setp(axis.get_xticklabels(), rotation=20, ha="right")
        figure.tight_layout()
        paths.append(out / "accuracy.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)
    return paths


def run_settings(config: ExperimentConfig, arm: Arm) -> dict:
    """What decides a run's result besides its seed, as runs.json stores it. The untrained baseline depends
    on neither the data, the retrofit nor the training settings."""
    settings = {"model": config.model, "arm": asdict(arm), "eval": config.eval}
    if arm.kind != "baseline":
        settings.update(data=config.data, retrofit=config.retrofit, train=config.train)
    return json.loads(json.dumps(settings, default=str))


def run_experiment(config: ExperimentConfig, restart: bool = False) -> dict:
    """Run every arm for every seed (the untrained baseline once), then write the report.

    A run already in ``OUT/runs.json`` with the same settings is kept rather than run again, so an interrupted
    experiment resumes where it stopped; ``restart`` runs everything again.
    """
    jobs = [(arm.name, seed, run_settings(config, arm))
            for arm in config.arms for seed in (config.seeds[:1] if arm.kind == "baseline" else config.seeds)]
    arms = {arm.name: arm for arm in config.arms}
    out = Path(config.out)
    records = run_recorded(out, jobs, lambda name, seed: run_arm(config, arms[name], seed), restart)
    rows = summarize(records)
    report = to_markdown(config, rows)
    (out / "results.md").write_text(report, encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps({"config": asdict(config), "arms": rows, "runs": records}, indent=2, default=str) + "\n",
        encoding="utf-8",
    )
    plots = plot_results(records, rows, out)
    print(report)
    return {"rows": rows, "runs": records, "report": str(out / "results.md"), "plots": [str(p) for p in plots]}


