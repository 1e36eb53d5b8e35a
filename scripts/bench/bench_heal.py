"""Healing at equal wall-clock budgets: kallm.heal against today's kallm train --distill.

Arms (each in its own process, so that its peak memory is its own; the same ``--minutes`` of
healing each, evaluation time excluded; ``--threads`` torch threads):

- ``original``: the untouched model, the line to reach;
- ``kan-fit+heal``: ``retrofit(last_n, init="fit")`` (cheby2 degree 2, default size) + ``kallm.heal``;
- ``kan-random+heal``: random init + ``kallm.heal``;
- ``linear+heal``: the linear restart (fresh MLPs of the original shape) + ``kallm.heal``, same recipe;
- ``kan-fit+heal-tail`` (not run by default): as ``kan-fit+heal`` with whole retrofitted blocks trainable
  (``trainable="tail"``);
- ``kan-fit+train``: fit init + today's ``kallm train --distill`` (``TrainConfig`` defaults: the full-model
  teacher, ``tail+embeddings``, alpha 0.5, T 2, lr 1e-4 constant after 10 warmup steps) on the
  OpenAssistant chats (kallm train reads chat data only).

Perplexity is scored on the first ``--score-tokens`` tokens of WikiText-2 test every ``--eval-every``
minutes of healing. Healing data (the heal arms): the rest of WikiText-2 test (after the scored part),
Tiny Shakespeare and the OpenAssistant chats; never the scored text, nor HH-RLHF, which scores the
held-out chat loss at the end of the budget next to BBH (log-likelihood, local tasks). The ``kan-fit+heal``
arm also reports, per retrofitted block, its feedforward's relative error on the scored text before and
after healing, and the perplexity with that block alone retrofitted (the others original).

    KALLM_DATA_DIR=../shared/data python scripts/bench/bench_heal.py --minutes 8 --eval-every 2
    # writes docs/results/bench_heal.{json,md,png}
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from skeleton import (
    ROOT,
    add_output_flag,
    add_threads_flag,
    argument_parser,
    parse_arguments,
    require_data,
    write_report_at,
)

ARMS = ("original", "kan-fit+heal", "kan-random+heal", "linear+heal", "kan-fit+train", "kan-fit+heal-tail")
DEFAULT_ARMS = ARMS[:5]
BBH_TASKS = "boolean_expressions,navigate,causal_judgement,hyperbaton,formal_fallacies"


def parse(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--minutes", type=float, default=8.0, help="healing budget of each arm")
    parser.add_argument("--eval-every", type=float, default=2.0, help="minutes of healing between evaluations")
    parser.add_argument("--score-tokens", type=int, default=8192, help="WikiText-2 test tokens scored")
    parser.add_argument("--last-n", type=int, default=5)
    parser.add_argument("--trainable", default="retrofitted", help="kallm.heal's trainable policy")
    parser.add_argument("--lr", type=float, default=None, help="kallm.heal's learning rate (default: its own)")
    parser.add_argument("--heal-option", action="append", default=[], metavar="FIELD=VALUE",
                        help="any other kallm.HealConfig field for the heal arms, e.g. local_fraction=0.5 (repeatable)")
    parser.add_argument("--bbh-limit", type=int, default=12, help="examples per BBH task")
    parser.add_argument("--chat-limit", type=int, default=48, help="HH-RLHF conversations for the chat loss")
    parser.add_argument("--retrofit-option", action="append", default=[], metavar="FIELD=VALUE",
                        help="a kallm.retrofit keyword for the KAN arms, e.g. intermediate_size=1148 (repeatable)")
    add_threads_flag(parser, 2)
    parser.add_argument("--no-blocks", action="store_true",
                        help="skip the per-block errors of the kan-fit+heal arm (saves a few minutes)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_heal"), help="folder for per-arm results")
    add_output_flag(parser, "bench_heal", writes=".json, .md and .png")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parse_arguments(parser, argv)


def data_paths():
    data = require_data("the healing benchmark")
    return {"wikitext": data / "text/wikitext2/wiki.test.raw", "shakespeare": data / "text/tinyshakespeare/input.txt",
            "oasst": data / "chat/oasst_en100/all_paths.jsonl", "hh": data / "chat/hh_rlhf_helpful/test.jsonl",
            "bbh": data / "bbh/bbh"}


def split_wikitext(text: str, tokenizer, tokens: int) -> tuple[str, str]:
    """``(scored, rest)``: the text of the first ``tokens + 1`` tokens, and everything after it."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut = offsets[min(tokens + 1, len(offsets)) - 1][1]
    return text[:cut], text[cut:]


# ------------------------------------------------------------------------------------------- one arm


def run_arm(args, arm: str) -> dict:
    import kallm
    from kallm.eval.perplexity import perplexity

    paths = data_paths()
    teacher, tokenizer = kallm.load_model(args.model)
    teacher.eval()
    scored, rest = split_wikitext(paths["wikitext"].read_text(encoding="utf-8"), tokenizer, args.score_tokens)

    def score(model) -> float:
        return perplexity(model, tokenizer, scored, max_tokens=args.score_tokens)["perplexity"]

    result = {"arm": arm, "curve": []}
    if arm == "original":
        value = score(teacher)
        marks = [k * args.eval_every for k in range(int(args.minutes / args.eval_every + 1e-9) + 1)]
        result["curve"] = [{"minutes": round(m, 4), "perplexity": value} for m in sorted({*marks, args.minutes})]
        return finish(result, teacher, teacher, tokenizer, args, paths)

    started = time.perf_counter()
    student = build_student(arm, teacher, tokenizer, args)
    result["init_seconds"] = time.perf_counter() - started
    evaluator = Marks(args, score)
    evaluator.record(student, 0.0)
    if "+heal" in arm:
        texts = [rest, paths["shakespeare"].read_text(encoding="utf-8")]
        texts += [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
                  for line in paths["oasst"].read_text(encoding="utf-8").splitlines() if line.strip()]
        before = block_errors(student, teacher, tokenizer, scored) \
            if arm == "kan-fit+heal" and not args.no_blocks else None
        options = heal_options(args)
        trainable = "tail" if arm.endswith("-tail") else args.trainable
        report = kallm.heal(student, teacher, tokenizer, data=texts, minutes=args.minutes, trainable=trainable,
                            callbacks=[evaluator.heal_callback], progress_bar=False, **options)
        result.update(tokens_per_second=report.tokens_per_second, steps=report.steps, tokens=report.tokens,
                      local=report.local, local_seconds=report.local_seconds, data=report.data,
                      heal_seconds=report.seconds, heal_curve=report.curve)
        evaluator.final(student, report.seconds)
        if before is not None:
            result["blocks"] = {"before": before, "after": block_errors(student, teacher, tokenizer, scored),
                                "alone": blocks_alone(student, teacher, score)}
    else:
        result.update(train_arm(student, teacher, tokenizer, args, paths, evaluator))
    result["curve"] = evaluator.points
    return finish(result, student, teacher, tokenizer, args, paths)


def heal_options(args) -> dict:
    """``--lr`` and the ``--heal-option`` pairs."""
    return {**({"learning_rate": args.lr} if args.lr else {}), **parse_assignments(args.heal_option)}


def parse_assignments(pairs: list[str]) -> dict:
    """``FIELD=VALUE`` pairs as a dict, each value read as a Python literal where it is one."""
    import ast

    values = {}
    for pair in pairs:
        field, _, value = pair.partition("=")
        try:
            values[field.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            values[field.strip()] = value.strip()
    return values


def build_student(arm, teacher, tokenizer, args):
    import kallm

    model = copy.deepcopy(teacher)
    options = parse_assignments(args.retrofit_option)
    if arm.startswith("kan-fit"):
        suffix = "".join(f"-{k}={v}" for k, v in sorted(options.items()))
        saved = Path(args.work) / f"kan-fit-init{suffix}"
        if (saved / "config.json").is_file():  # the fit is deterministic: both fit arms share one
            return kallm.load_model(str(saved))[0].eval()
        kallm.retrofit(model, last_n=args.last_n, init="fit", tokenizer=tokenizer, **options)
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        return model
    if arm.startswith("kan-random"):
        return kallm.retrofit(model, last_n=args.last_n, **options)
    return kallm.retrofit(model, last_n=args.last_n, kind="linear")


class Marks:
    """Perplexity every ``eval_every`` minutes of healing; the time it takes is not healing time."""

    def __init__(self, args, score):
        self.every, self.budget, self.score = args.eval_every * 60, args.minutes * 60, score
        self.next = self.every
        self.points = []

    def record(self, model, mark_seconds, seconds=None):
        """One point at the nominal mark (``seconds``: when it was actually taken)."""
        seconds = mark_seconds if seconds is None else seconds
        self.points.append({"minutes": round(mark_seconds / 60, 4), "at_minutes": round(seconds / 60, 4),
                            "perplexity": self.score(model)})
        print(f"    {seconds / 60:6.2f} min: perplexity {self.points[-1]['perplexity']:.2f}", flush=True)

    def due(self, seconds) -> float | None:
        """The mark just passed, if one is due before the final one."""
        if seconds >= self.next and self.next < self.budget - 1e-6:
            mark, self.next = self.next, self.next + self.every
            return mark
        return None

    def final(self, model, seconds):
        self.record(model, self.budget, seconds)

    def heal_callback(self, model, point):
        mark = self.due(point["seconds"])
        if mark is not None:
            self.record(model, mark, point["seconds"])


def train_arm(student, teacher, tokenizer, args, paths, evaluator) -> dict:
    from transformers import TrainerCallback

    from kallm.train import TrainConfig, train

    class Budget(TrainerCallback):
        def __init__(self):
            self.start, self.paused = time.perf_counter(), 0.0

        def seconds(self):
            return time.perf_counter() - self.start - self.paused

        def on_step_end(self, args_, state, control, model=None, **kwargs):
            mark = evaluator.due(self.seconds())
            if mark is not None:
                began = time.perf_counter()
                evaluator.record(model, mark, self.seconds())
                model.train()
                self.paused += time.perf_counter() - began
            if self.seconds() >= evaluator.budget:
                control.should_training_stop = True

    budget = Budget()
    config = TrainConfig(output_dir=str(Path(args.work) / "train-arm"), max_steps=100_000,
                         lr_scheduler="constant_with_warmup", warmup=10, batch_size=4, max_length=256,
                         save_steps=100_000, logging_steps=5, progress_bar=False)
    result = train(student, tokenizer, str(paths["oasst"]), config, teacher=teacher, callbacks=[budget])
    seconds = budget.seconds()
    student.eval()
    evaluator.final(student, seconds)
    tokens = result.global_step * config.batch_size * config.max_length  # at most; rows are often shorter
    return {"steps": result.global_step, "heal_seconds": seconds, "tokens_per_second": tokens / seconds,
            "tokens_per_second_note": "upper bound (4 x 256 tokens a step)"}


@torch.no_grad()
def block_errors(student, teacher, tokenizer, scored: str) -> dict:
    """Relative error ||f(x) - y|| / ||y|| of each retrofitted feedforward on the scored text's hidden
    states (teacher forced), over all tokens and over ordinary (non-outlier) tokens."""
    from kallm.core.retrofit_config import retrofitted_blocks
    from kallm.surgery.architectures import architecture_for
    from kallm.surgery.calibration import original_feedforward, record_feedforwards
    from kallm.surgery.fit import ordinary_token_error

    architecture = architecture_for(teacher.config.model_type)
    layers = retrofitted_blocks(student)
    ids = tokenizer(scored, add_special_tokens=False, return_tensors="pt").input_ids[0]
    sequences = [ids[s:s + 512] for s in range(0, ids.numel(), 512)]
    records = record_feedforwards(teacher, architecture, layers, sequences, progress=False)
    blocks = student.get_submodule(architecture.blocks_path)
    errors = {}
    for index, (x, y) in records.items():
        feedforward = original_feedforward(blocks[index], architecture)
        prediction = torch.cat([feedforward(x[s:s + 4096]) for s in range(0, len(x), 4096)])
        errors[index] = {"all": float((prediction - y).norm() / y.norm()),
                         "ordinary": ordinary_token_error(feedforward, x, y)}
    return errors


def blocks_alone(student, teacher, score) -> dict:
    """Perplexity with one retrofitted block's new feedforward in the original model, for each block."""
    from torch import nn

    from kallm.core.retrofit_config import retrofitted_blocks
    from kallm.surgery.architectures import architecture_for

    architecture = architecture_for(teacher.config.model_type)
    alone = {}
    for index in retrofitted_blocks(student):
        model = copy.deepcopy(teacher)
        block = model.get_submodule(architecture.blocks_path)[index]
        new = student.get_submodule(architecture.blocks_path)[index]
        setattr(block, architecture.mlp_attribute, getattr(new, architecture.mlp_attribute))
        for name in architecture.bypassed_attributes:
            setattr(block, name, nn.Identity())
        alone[index] = score(model)
    return alone


def finish(result, model, teacher, tokenizer, args, paths) -> dict:
    from kallm.eval.evaluate import evaluate

    model.eval()
    scores = evaluate(model, tokenizer, ["bbh", "chat_loss"], bbh_source=str(paths["bbh"]), bbh_tasks=BBH_TASKS,
                      limit=args.bbh_limit, mode="loglik", chat_data=str(paths["hh"]), chat_limit=args.chat_limit,
                      progress=False)
    result["bbh"] = scores["bbh"]["average"]
    result["chat_loss"] = scores["chat_loss"]["loss"]
    result["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# --------------------------------------------------------------------------------------------- report


def markdown(results: list[dict], args) -> str:
    original = next((r for r in results if r["arm"] == "original"), None)
    reference = original["curve"][0]["perplexity"] if original else None
    marks = sorted({p["minutes"] for r in results for p in r["curve"] if r["arm"] != "original"})
    form = ", ".join(args.retrofit_option) or "cheby2 degree 2 (default size)"
    lines = [f"SmolLM2-135M-Instruct, last {args.last_n} blocks, KAN arms retrofitted with {form}, "
             f"{args.minutes:g} minutes of healing per arm on {args.threads} CPU threads (evaluation excluded). "
             f"Perplexity on the first {args.score_tokens:,} tokens of WikiText-2 test (never healed on)"
             + (f"; in brackets, times the original's {reference:.2f}." if reference else "."), "",
             "| arm | " + " | ".join(f"{m:g} min" for m in marks) + " | BBH (loglik) | HH-RLHF chat loss | tokens/s "
             "| peak memory |", "|---|" + "---:|" * (len(marks) + 4)]
    for r in results:
        by_minute = {p["minutes"]: p["perplexity"] for p in r["curve"]}
        cells = []
        for m in marks:
            value = by_minute.get(m, r["curve"][0]["perplexity"] if r["arm"] == "original" else None)
            cells.append("" if value is None else f"{value:.2f}" + (f" ({value / reference:.2f}x)" if reference else ""))
        speed = f"{r['tokens_per_second']:,.0f}" if "tokens_per_second" in r else ""
        lines.append(f"| {r['arm']} | " + " | ".join(cells) + f" | {r['bbh']:.1%} | {r['chat_loss']:.3f} | {speed} | "
                     f"{r['peak_memory_mib']:,.0f} MiB |")
    fitted = next((r for r in results if "blocks" in r), None)
    if fitted:
        blocks = fitted["blocks"]
        lines += ["", f"{fitted['arm']}: each retrofitted feedforward on the scored text (relative error over all "
                      f"tokens / ordinary tokens), and the perplexity with that block alone retrofitted:", "",
                  "| block | error before healing | error after | perplexity, this block alone |", "|---:|---:|---:|---:|"]
        for index in blocks["after"]:
            b, a = blocks["before"][index], blocks["after"][index]
            lines.append(f"| {index} | {b['all']:.3f} / {b['ordinary']:.3f} | {a['all']:.3f} / {a['ordinary']:.3f} | "
                         f"{blocks['alone'][index]:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in results:
        minutes = [p["minutes"] for p in r["curve"]]
        values = [p["perplexity"] for p in r["curve"]]
        style = "k--" if r["arm"] == "original" else "o-"
        axis.plot(minutes, values, style, label=r["arm"])
    axis.set_yscale("log")
    axis.set_xlabel("minutes of healing (2 CPU cores)")
    axis.set_ylabel("WikiText-2 perplexity")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> int:
    args = parse(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        result = run_arm(args, args.child)
        (work / f"{args.child}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    data_paths()
    results = []
    for arm in arms:
        print(f"== {arm}", flush=True)
        started = time.perf_counter()
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", arm]
        subprocess.run(command, check=True)
        results.append(json.loads((work / f"{arm}.json").read_text(encoding="utf-8")))
        print(f"   done in {time.perf_counter() - started:.0f} s", flush=True)
    table = markdown(results, args)
    print("\n" + table)
    write_report_at(args.output, {"settings": vars(args), "arms": results}, table)
    if args.output:
        plot(results, Path(f"{args.output}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
