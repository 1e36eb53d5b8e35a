"""transformers' Trainer with kallm's model card: what ``create_model_card`` (and so ``Trainer.push_to_hub``)
writes for a retrofitted model is kallm's card, with the training data and losses in its metadata. A run can also
follow one part of a longer learning-rate schedule (``schedule``), as the stages of a degree curriculum do."""

from __future__ import annotations

import os
from functools import partial

from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer
from transformers.optimization import get_scheduler

from ..checkpoints.load import public_source_name
from ..core.model_card import HUB_ID, write_model_card
from ..core.retrofit_config import kan_config_blocks


class ChatTrainer(Trainer):
    """A ``Trainer`` whose model card is kallm's. ``data_source`` and ``eval_source`` name the training and
    evaluation data (a hub id, a file, ...) for the card. ``schedule``: ``(steps before this run, steps of the whole
    schedule)``, for a run that is one part of a longer one: its learning rate continues the schedule
    ``args.lr_scheduler_type`` of that many steps (warmup included) from that step, instead of starting its own."""

    def __init__(self, *args, data_source=None, eval_source=None, data_split: str = "train",
                 eval_split: str | None = None, schedule: tuple[int, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_source, self.eval_source = data_source, eval_source
        self.data_split, self.eval_split = data_split, eval_split
        self.schedule = schedule

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.schedule is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer or self.optimizer
        done, total = self.schedule
        whole = get_scheduler(self.args.lr_scheduler_type, optimizer=optimizer,
                              num_warmup_steps=self.args.get_warmup_steps(total), num_training_steps=total,
                              scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
        self.lr_scheduler = LambdaLR(optimizer, [partial(_shifted, factor, done) for factor in whole.lr_lambdas])
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def create_model_card(self, *args, tags=None, **kwargs):
        if not self._has_kallm_card():
            return super().create_model_card(*args, tags=tags, **kwargs)
        if self.is_world_process_zero():
            self.write_model_card(self.args.output_dir, tags=[tags] if isinstance(tags, str) else tags or ())
        return None

    def write_model_card(self, folder, tags=()) -> None:
        """kallm's card in ``folder``/README.md, with the training data as ``datasets`` (hub ids only) and the
        last logged training and evaluation losses as ``model-index`` results; nothing for a model without KAN
        feedforwards, whose save keeps transformers' behaviour."""
        if not self._has_kallm_card():
            return
        model = self.accelerator.unwrap_model(self.model)
        location = self.args.hub_model_id if self.args.push_to_hub and self.args.hub_model_id else "PATH_OR_REPO"
        write_model_card(model, folder, tags, location=location, datasets=self._hub_datasets(),
                         eval_results=self._results())

    def _has_kallm_card(self) -> bool:
        """A model with KAN feedforwards; not a linear restart (its family's class) nor an adapter (PEFT's card)."""
        from peft import PeftModel

        model = self.accelerator.unwrap_model(self.model)
        return not isinstance(model, PeftModel) and bool(kan_config_blocks(model.config))

    def _hub_datasets(self) -> list[str]:
        sources = (self.data_source, self.eval_source)
        return list(dict.fromkeys(name for name in map(_hub_dataset, sources) if name))

    def _results(self) -> list:
        from huggingface_hub import EvalResult

        results = []
        for key, source, split, what in (("loss", self.data_source, self.data_split, "training loss"),
                                         ("eval_loss", self.eval_source, self.eval_split, "evaluation loss")):
            logged = [entry[key] for entry in self.state.log_history if key in entry]
            if logged and source is not None:
                name = _hub_dataset(source) or _describe(source)
                results.append(EvalResult(
                    task_type="text-generation", dataset_type=name, dataset_name=name, dataset_split=split,
                    metric_type="loss", metric_name=f"{what} (assistant tokens, last logged)",
                    metric_value=float(logged[-1]),
                ))
        return results


def _shifted(factor, done: int, step: int) -> float:
    return factor(done + step)


def _hub_dataset(source) -> str | None:
    """The hub dataset id of a data source (``"name:config"`` gives ``name``), or None for local data."""
    if not isinstance(source, str):
        return None
    name = source.partition(":")[0]
    return name if HUB_ID.fullmatch(name) and "/" in name and not os.path.exists(source) else None


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return public_source_name(os.fspath(source))  # a local path is private: only its last name
    return "chat data given in Python"
