"""The block-local stage of ``kallm.heal``: each new feedforward learns, on its own, what the original one computed.

The original model reads a sample of the healing text once; forward hooks record, for every retrofitted block,
the input of its feedforward and the original MLP's output (teacher forcing: later blocks see the original's
hidden states). Each new feedforward is then trained with Adam on those pairs: no LM head, no attention, no
backward through blocks. The weights with the lowest held-out error are the ones kept.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ..surgery.calibration import original_feedforward, record_feedforwards
from ..surgery.fit import outlier_rows

logger = logging.getLogger("kallm")

#: rows of each block's recorded pairs kept apart to choose the best local weights
LOCAL_HELD_OUT = 0.1
#: with a time budget, recording stops after this share of the local stage's time (training gets the rest)
LOCAL_RECORDING_SHARE = 0.5
RECORDING_BATCH = 8


class LocalStage:
    """The block-local stage of one heal run (``healer``: the run's ``_Healer``, whose clock, budget, data and log
    it uses). Per retrofitted block it holds the recorded pairs split into training and held-out rows, an Adam
    optimizer, and the best weights so far by held-out error with that error: the stage ends by loading them."""

    def __init__(self, healer):
        self.healer, self.config, self.layout = healer, healer.config, healer.layout
        self.budget = healer.budget * self.config.local_fraction if healer.budget is not None else None
        self.feedforwards = {i: original_feedforward(self.layout.student_blocks[i], self.layout.adapter)
                             for i in self.layout.blocks}
        self.generator = torch.Generator().manual_seed(self.config.seed)
        #: block -> (training inputs, training outputs, held-out inputs, held-out outputs)
        self.splits: dict[int, tuple[torch.Tensor, ...]] = {}
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        #: block -> (lowest held-out error, the weights that reached it)
        self.best: dict[int, tuple[float, dict]] = {}
        #: block -> held-out errors before and after the stage, what ``HealReport.local`` reports
        self.errors: dict[int, dict] = {}

    def run(self) -> dict[int, dict]:
        """Record, train every block's feedforward, keep its best weights; returns the errors per block."""
        deadline = self.budget * LOCAL_RECORDING_SHARE if self.budget is not None else None
        self._split(self._record(self._sample(), deadline))  # the recordings go once split
        self._train()
        self._load_best()
        return self.errors

    def _sample(self) -> list[torch.Tensor]:
        """``local_tokens`` tokens of randomly drawn sequences: a sample of every source in the data."""
        config, sequences = self.config, self.healer.sequences
        rows, total = [], 0
        order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(config.seed))
        for sequence in (sequences[i] for i in order.tolist()):
            if total >= config.local_tokens:
                break
            rows.append(sequence[:config.local_tokens - total])
            total += rows[-1].numel()
        return rows

    def _record(self, rows: list[torch.Tensor], deadline: float | None) -> dict:
        """``record_feedforwards`` on the original, a few sequences at a time, until ``deadline`` (clock seconds)."""
        healer, layout, parts = self.healer, self.layout, []
        bar = tqdm(total=sum(r.numel() for r in rows), desc="kallm heal: recording", unit="tok",
                   disable=not (self.config.progress_bar and healer.main))
        for start in range(0, len(rows), RECORDING_BATCH):
            if parts and deadline is not None and healer.clock() >= deadline:
                break
            chunk = rows[start:start + RECORDING_BATCH]
            parts.append(record_feedforwards(healer.teacher, layout.adapter, layout.blocks, chunk, progress=False))
            bar.update(sum(r.numel() for r in chunk))
        bar.close()
        return {i: (torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in layout.blocks}

    def _split(self, records: dict):
        """Hold out rows of every block's pairs, and measure the error the stage starts from."""
        for index, (x, y) in records.items():
            order = torch.randperm(len(x), generator=self.generator)
            held = max(1, int(len(x) * LOCAL_HELD_OUT))
            self.splits[index] = (x[order[held:]], y[order[held:]], x[order[:held]], y[order[:held]])
            feedforward = self.feedforwards[index]
            self.optimizers[index] = torch.optim.Adam(feedforward.parameters(), lr=self.config.local_learning_rate)
            error, error_all = _held_out_errors(feedforward, *self.splits[index][2:])
            self.best[index] = (error, _copy_state(feedforward))
            self.errors[index] = {"before": error, "before_all_tokens": error_all}

    def _train(self):
        """Adam steps on every block at once, the learning rate on a cosine over the stage; a curve point and the
        best weights kept after every pass over the training rows."""
        config, clock = self.config, self.healer.clock
        train_rows = min(len(s[0]) for s in self.splits.values())
        steps_per_pass = max(1, math.ceil(train_rows / config.local_batch_rows))
        total_steps = max(1, math.ceil(config.local_passes * steps_per_pass))
        bar = tqdm(total=total_steps, desc="kallm heal: local stage", unit="step",
                   disable=not (config.progress_bar and self.healer.main))
        step, started = 0, clock()
        for feedforward in self.feedforwards.values():
            feedforward.requires_grad_(True)
        while True:
            progress = step / total_steps
            if self.budget is not None:  # recording took its share of the budget too
                progress = max(progress, (clock() - started) / max(self.budget - started, 1e-9))
            if progress >= 1:
                break
            self._step(config.local_learning_rate * (0.5 * (1 + math.cos(math.pi * progress))))
            step += 1
            bar.update(1)
            if step % steps_per_pass == 0:
                self._point(step, bar)
        if step % steps_per_pass:
            self._point(step, bar)
        bar.close()

    def _step(self, learning_rate: float):
        for index, feedforward in self.feedforwards.items():
            x, y = self.splits[index][:2]
            rows_at = torch.randint(len(x), (self.config.local_batch_rows,), generator=self.generator)
            loss = _relative_loss(feedforward, x[rows_at], y[rows_at])
            for group in self.optimizers[index].param_groups:
                group["lr"] = learning_rate
            self.optimizers[index].zero_grad(set_to_none=True)
            loss.backward()
            self.optimizers[index].step()

    def _point(self, step: int, bar):
        """Keep each block's weights where its held-out error is the lowest yet; log the mean error."""
        errors = {}
        for index, feedforward in self.feedforwards.items():
            errors[index] = _held_out_errors(feedforward, *self.splits[index][2:])[0]
            if errors[index] < self.best[index][0]:
                self.best[index] = (errors[index], _copy_state(feedforward))
        point = {"stage": "local", "step": step, "seconds": self.healer.clock(), "tokens": 0,
                 "error": sum(errors.values()) / len(errors)}
        bar.set_postfix(error=f"{point['error']:.3f}")
        self.healer.log(point)

    def _load_best(self):
        accelerator = self.healer.accelerator
        for index, feedforward in self.feedforwards.items():
            error, state = self.best[index]
            feedforward.load_state_dict(state)
            self.errors[index].update(after=error,
                                      after_all_tokens=_held_out_errors(feedforward, *self.splits[index][2:])[1])
            if accelerator.num_processes > 1:  # every process trained alike; make it exact
                from accelerate.utils import broadcast

                for parameter in feedforward.parameters():
                    parameter.data.copy_(broadcast(parameter.data.clone()))


def _relative_loss(feedforward, x, y) -> torch.Tensor:
    """Mean over rows of ``||f(x) - y||^2 / (||y||^2 + median ||y||^2)``: every token counts, the rare
    massive-activation rows no more than the rest."""
    dtype = next(feedforward.parameters()).dtype
    prediction = feedforward(x.to(dtype)).float()
    energy = y.pow(2).sum(-1)
    return ((prediction - y).pow(2).sum(-1) / (energy + energy.median())).mean()


@torch.no_grad()
def _held_out_errors(feedforward, x, y) -> tuple[float, float]:
    """Held-out ``||f(x) - y|| / ||y||`` over ordinary tokens (the massive-activation rows left out, as
    fit init reports it), and over all tokens."""
    dtype = next(feedforward.parameters()).dtype
    prediction = torch.cat([feedforward(x[s:s + 4096].to(dtype)).float() for s in range(0, len(x), 4096)])
    ordinary = ~outlier_rows(y)
    error = (prediction - y).norm(dim=-1)
    return (float(error[ordinary].norm() / y[ordinary].norm().clamp_min(1e-12)),
            float(error.norm() / y.norm().clamp_min(1e-12)))


def _copy_state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
