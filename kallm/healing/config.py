"""The settings of ``kallm.heal`` (``HealConfig``, whose fields are ``kallm heal``'s flags), what it returns
(``HealReport``) and the files it writes."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..surgery.trainable import POLICIES
from ..train.options import check_values, option
from ..values import Number, non_negative_float, non_negative_int, positive_float, positive_int
from ..values import seed as seed_range

REPORT_FILE = "heal_report.json"
CURVE_FILE = "heal_curve.png"
CHECKPOINT_PREFIX = "checkpoint-"
#: a heal checkpoint's state, written last: a checkpoint without it was cut off while saving
STATE_FILE = "heal_state.json"


@dataclass
class HealConfig:
    """Settings of ``kallm.heal`` (``kallm heal`` flags map one to one)."""

    output_dir: str | None = option(None, "folder for metrics.jsonl, the curve, checkpoints and the healed model "
                                          "(None writes nothing)")
    minutes: float | None = option(None, "wall-clock budget of both stages (data preparation and callbacks not "
                                         "counted)", positive_float)
    max_steps: int | None = option(None, "end-to-end optimizer steps; with --minutes too, whichever ends first",
                                   positive_int)
    trainable: str = option("retrofitted", "which parameters train end to end (a kallm.set_trainable policy)",
                            choices=POLICIES)
    learning_rate: float = option(3e-4, "peak learning rate of the end-to-end stage", positive_float, aliases=["--lr"])
    warmup: float = option(0.05, "warmup as a share of the end-to-end stage; then cosine decay to zero at its end",
                           Number(float, 0, 1, high_open=True))
    batch_size: int = option(4, "sequences per step and process", positive_int)
    max_length: int = option(256, "tokens per sequence", Number(int, 2))
    temperature: float = option(1.0, "softmax temperature of both distributions in the KL", positive_float)
    ce_weight: float = option(0.0, "loss = KL * T^2 + ce_weight * next-token cross-entropy", non_negative_float)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: none)", non_negative_float)
    progressive: bool = option(False, "blend each retrofitted feedforward as (1 - a) * original + a * new, a "
                                      "rising 0 -> 1")
    progressive_fraction: float = option(0.5, "share of the end-to-end stage over which a reaches 1",
                                         Number(float, 0, 1, low_open=True))
    local_fraction: float = option(0.25, "share of --minutes the block-local stage may use (0 skips it)",
                                   Number(float, 0, 1, high_open=True))
    local_passes: float = option(4.0, "passes over the recorded pairs in the block-local stage (it stops at its "
                                      "time share too)", non_negative_float)
    local_tokens: int = option(32768, "tokens recorded for the block-local stage, from randomly drawn sequences "
                                      "(8 x hidden_size bytes per token and block)", positive_int)
    local_learning_rate: float = option(1e-3, "peak learning rate of the block-local stage", positive_float,
                                        aliases=["--local-lr"])
    local_batch_rows: int = option(512, "rows per step of the block-local stage", positive_int)
    generate_tokens: int = option(8192, "tokens of text the original model writes when no data is given",
                                   positive_int)
    split: str = option("train", "split of a hub dataset")
    limit: int | None = option(None, "use the first N rows of the data only", positive_int)
    cache_dir: str | None = option(None, "keep the prefix hidden states of each sequence here (safetensors) and "
                                         "reuse them in later epochs")
    bf16: bool = option(False, "bfloat16 autocast")
    fp16: bool = option(False, "float16 autocast with gradient scaling (GPU)")
    save_steps: int = option(0, "end-to-end steps between checkpoints (0: none)", non_negative_int)
    logging_steps: int = option(1, "end-to-end steps between points of the curve in metrics.jsonl", positive_int)
    #: resume from this checkpoint folder, or True for the latest one in output_dir (``--resume [CHECKPOINT]``)
    resume: str | bool | None = None
    seed: int = option(0, "seed of the data order and the block-local stage's held-out rows", seed_range)
    #: a progress bar (``--quiet`` turns it off)
    progress_bar: bool = True
    #: write the healed model and tokenizer to output_dir (metrics, report and curve are written regardless)
    save_model: bool = True

    def __post_init__(self):
        check_values(self)  # every number's range, as declared on its field
        checks = [
            (self.minutes is not None or self.max_steps is not None,
             "heal needs a budget: minutes= (wall clock) and/or max_steps= (end-to-end steps)"),
            (self.trainable in POLICIES, f"trainable must be one of {', '.join(POLICIES)}, got {self.trainable!r}"),
            (not (self.bf16 and self.fp16), "choose at most one of bf16 and fp16"),
            (not (self.save_steps or self.resume) or self.output_dir, "checkpoints and resume need output_dir"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class HealReport:
    """What ``heal`` returns (also written to ``output_dir/heal_report.json``)."""

    #: one point per logged step: stage, step, seconds, tokens, kl/ce (end to end) or error (local)
    curve: list[dict]
    #: per retrofitted block: held-out relative error of its feedforward before and after the local stage,
    #: over ordinary tokens (``before``/``after``) and over all tokens
    local: dict
    steps: int
    #: wall-clock seconds of both stages, callbacks excluded
    seconds: float
    local_seconds: float
    #: tokens the end-to-end stage trained on (all processes)
    tokens: int
    tokens_per_second: float
    #: sequences and tokens of healing data, and where they came from
    data: dict
    trainable_parameters: int
    shared_prefix: bool
    world_size: int
    output_dir: str | None = None
    config: dict = field(default_factory=dict)
