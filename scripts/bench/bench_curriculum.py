"""Degree curriculum against training at the final degree from the start, at equal steps: held-out chat loss.

Both arms retrofit the same blocks of the same base model with the same basis and intermediate size (the
parameter-budget size at the final degree), train the same policy for the same number of steps on the same
chat data with kallm.train, and are scored by kallm.eval.chat_loss on held-out conversations. The curriculum arm
starts at the first degree of --stages and converts exactly between stages. Prints a markdown table per run and
the mean over the seeds; --json and --markdown write them (after every run: a stopped benchmark keeps its runs).

    python scripts/bench/bench_curriculum.py [--model smollm2-135m-instruct] [--steps 30] [--stages 1 2 3] [--seeds 0]
        [--json docs/results/bench_curriculum.json] [--markdown docs/results/bench_curriculum.md]
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from skeleton import (
    add_chat_data_flags,
    add_report_flags,
    argument_parser,
    check_chat_data,
    load_average,
    parse_arguments,
    write_report,
)

import kallm
from kallm.eval.chat_loss import chat_loss
from kallm.train import TrainConfig, train


def run_arm(base, tokenizer, args, degree: int, stages, intermediate_size: int, seed: int, work: Path) -> dict:
    torch.manual_seed(seed)
    model = kallm.retrofit(copy.deepcopy(base), last_n=args.last_n, basis=args.basis, degree=degree,
                           intermediate_size=intermediate_size)
    config = TrainConfig(
        output_dir=str(work / f"degree-{degree}-{'-'.join(map(str, stages or []))}-seed-{seed}"),
        trainable=args.trainable,
        max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, warmup=0, max_length=args.max_length,
        limit=args.train_limit, logging_steps=max(1, args.steps // 10), save_steps=10**6, seed=seed,
        progress_bar=False, degree_stages=list(stages) if stages else None,
    )
    start = time.perf_counter()
    train(model, tokenizer, args.train_data, config)
    seconds = time.perf_counter() - start
    score = chat_loss(model, tokenizer, args.eval_data, max_length=args.max_length, limit=args.eval_limit)
    return {"arm": f"curriculum {' -> '.join(map(str, stages))}" if stages else f"degree {degree} from the start",
            "seed": seed, "chat_loss": score["loss"], "tokens": score["tokens"], "seconds": seconds,
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (kallm.load_model name)")
    add_chat_data_flags(parser)
    parser.add_argument("--train-limit", type=int, default=400, help="conversations to train on")
    parser.add_argument("--eval-limit", type=int, default=40, help="held-out conversations")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], help="degrees of the curriculum")
    parser.add_argument("--basis", default="cheby2")
    parser.add_argument("--last-n", type=int, default=2, help="blocks to retrofit (default %(default)s)")
    parser.add_argument("--trainable", default="retrofitted", help="trainable policy (default %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per arm (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run of each arm per seed")
    add_report_flags(parser)
    args = parse_arguments(parser, argv)
    check_chat_data(parser, args)

    base, tokenizer = kallm.load_model(args.model)
    final = args.stages[-1]
    probe = kallm.retrofit(copy.deepcopy(base), last_n=args.last_n, basis=args.basis, degree=final)
    intermediate_size = probe.config.kan_config["intermediate_size"]
    del probe
    settings = {key: value for key, value in vars(args).items() if key not in ("json", "markdown")}
    settings["intermediate_size"] = intermediate_size
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            for degree, stages in ((args.stages[0], args.stages), (final, None)):
                runs.append(run_arm(base, tokenizer, args, degree, stages, intermediate_size, seed, Path(work)))
                print(json.dumps(runs[-1]), flush=True)
                table = report_runs(args, settings, runs)
    print(table)
    return 0


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"{s['model']}, last {s['last_n']} blocks, {s['basis']}, intermediate size {s['intermediate_size']}, "
             f"{s['trainable']}, {s['steps']} steps of {s['batch_size']} x {s['max_length']} tokens at lr {s['lr']:g} "
             f"(cosine, no warmup) on {s['train_limit']} conversations; held-out chat loss on {s['eval_limit']} "
             f"conversations. Load average {s['load_average']}.", "",
             "| arm | seed | parameters | held-out chat loss | train time |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {row['arm']} | {row['seed']} | {row['parameters']:,} | {row['chat_loss']:.4f} | "
              f"{row['seconds']:.0f} s |" for row in report["runs"]]
    lines += ["", "| arm | mean held-out chat loss | per seed |", "|---|---:|---|"]
    lines += [f"| {row['arm']} | {row['mean_chat_loss']:.4f} | {', '.join(f'{x:.4f}' for x in row['seed_losses'])} |"
              for row in report["means"]]
    return "\n".join(lines) + "\n"


def report_runs(args, settings: dict, runs: list[dict]) -> str:
    by_arm = {}
    for row in runs:
        by_arm.setdefault(row["arm"], []).append(row["chat_loss"])
    report = {"settings": {**settings, "load_average": load_average()},
              "runs": runs, "means": [{"arm": arm, "mean_chat_loss": statistics.mean(losses), "seed_losses": losses}
                                      for arm, losses in by_arm.items()]}
    table = markdown(report)
    write_report(report, table, args.json, args.markdown)
    return table


if __name__ == "__main__":
    raise SystemExit(main())
