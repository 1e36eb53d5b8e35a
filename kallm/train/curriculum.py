"""Degree curriculum: train a retrofitted model in stages that raise its KAN degree (``TrainConfig.degree_stages``).

Degree ``d`` of a polynomial basis lies inside degree ``d + 1``, so between stages ``kallm.convert`` moves each
trained KAN layer to the next degree exactly: the model computes the same function, and the new, higher
coefficients start at zero. Each stage is an ordinary ``train`` run of its share of ``max_steps`` into
``output_dir/stage-N-degree-D``, with an optimizer of its own (the layers' shapes change) but one learning-rate
schedule across all stages: a stage continues it where the previous stage stopped (warmup once, one decay), so
the curriculum is one run whose model grows, not a series of warm restarts. The final model goes to
``output_dir``.

``train`` hands itself in as the function that runs a stage, so that this module needs nothing of it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from ..checkpoints.save import save_checkpoint
from ..core.layers import is_kan_linear
from ..surgery.convert import convert
from .config import RESULT_FILE, TrainConfig, TrainResult
from .runs import METRICS_FILE, write_metrics


def train_in_degree_stages(model, tokenizer, data, config: TrainConfig, train: Callable[..., TrainResult],
                           teacher=None, callbacks=None) -> TrainResult:
    """``train`` (``kallm.train.train``, which runs each stage) in the stages ``config.degree_stages`` (see the
    module docstring); returns a ``TrainResult`` whose ``stages`` list each stage and whose ``metrics_file`` holds
    every stage's log, ``degree`` added."""
    basis, options = _polynomial_basis(model)
    _check_exact(model, basis, options, config.degree_stages)
    output = Path(config.output_dir)
    stages, log, step_offset = [], [], 0
    for degree, steps in zip(config.degree_stages, _split(config.max_steps, len(config.degree_stages))):
        if degree != model.config.kan_config["degree"]:
            convert(model, basis=basis, degree=degree, **options)
        # each stage is a fresh run: a seed of its own gives it a data order of its own, where the shared seed
        # would replay the first stage's batches in every stage
        stage_config = replace(config, degree_stages=None, max_steps=steps, seed=config.seed + len(stages),
                               output_dir=str(output / f"stage-{len(stages) + 1}-degree-{degree}"))
        result = train(model, tokenizer, data, stage_config, teacher=teacher, callbacks=callbacks,
                       schedule=(step_offset, config.max_steps))
        stages.append({"degree": degree, "output_dir": result.output_dir, "global_step": result.global_step,
                       "last_logged_loss": result.metrics.get("last_logged_loss")})
        log += [{**entry, "step": entry.get("step", 0) + step_offset, "degree": degree}
                for entry in map(json.loads, Path(result.metrics_file).read_text(encoding="utf-8").splitlines())]
        step_offset += result.global_step
    save_checkpoint(model, tokenizer, output)
    metrics_file = output / METRICS_FILE
    write_metrics(metrics_file, log)
    combined = TrainResult(
        output_dir=str(output), metrics=result.metrics, data=result.data,
        trainable_parameters=result.trainable_parameters, global_step=step_offset, world_size=result.world_size,
        metrics_file=str(metrics_file), log_history=log, stages=stages,
    )
    summary = {**asdict(combined), "config": asdict(config)}
    summary.pop("log_history")
    (output / RESULT_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return combined


def _polynomial_basis(model) -> tuple[str, dict]:
    """The basis name and options of the model's KAN layers, which a curriculum keeps."""
    kan_config = getattr(getattr(model, "config", None), "kan_config", None)
    if not kan_config or not any(map(is_kan_linear, model.modules())):
        raise ValueError("degree_stages needs a retrofitted model with KAN layers (kallm.retrofit first)")
    names = set(kan_config["basis"].split(">"))
    if len(names) != 1 or "+" in kan_config["basis"]:
        raise ValueError(f"degree_stages needs one basis in every KAN layer, got {kan_config['basis']!r}")
    return names.pop(), dict(kan_config["basis_options"])


def _check_exact(model, basis: str, options: dict, degrees) -> None:
    """Refuse before any training unless every stage's conversion is exact (a polynomial basis whose degree
    only grows from the model's current one): convert raises on a lossy one."""
    current = model.config.kan_config["degree"]
    if degrees[0] < current:
        raise ValueError(f"degree_stages must start at the model's degree ({current}) or above, got "
                         f"{list(degrees)}; lowering the degree is a lossy projection")
    layer = copy.deepcopy(next(module for module in model.modules() if is_kan_linear(module)))
    for degree in degrees:
        try:
            layer = convert(layer, basis=basis, degree=degree, **options)
        except ValueError as error:
            raise ValueError(f"degree_stages needs exact conversions between stages: {error}") from error


def _split(steps: int, parts: int) -> list[int]:
    """``steps`` in ``parts`` near-equal shares, the larger ones last."""
    return [steps // parts + (index >= parts - steps % parts) for index in range(parts)]
