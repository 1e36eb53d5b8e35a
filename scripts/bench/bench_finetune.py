"""Retrofit as fine-tuning: the exact-start KAN form (form="glu", only its new functions trained) against LoRA on the
same MLP projections, full fine-tuning of those MLPs, and the untouched model.

Every arm trains for the same steps on the same chat data with kallm.train (same batches, schedule and seed), at each
learning rate of --lrs, and is scored on held-out conversations (chat loss), on WikiText-2 perplexity (what it
forgot of general text) and on the local BIG-Bench Hard tasks in log-likelihood mode. Each arm runs in a process of
its own, so that its peak resident memory is its own. Equal steps make the losses independent of how loaded the CPU
is; only the times depend on it.

Arms (--arms): untouched; glu-last5 and glu-all (form="glu" on the last --last-blocks / all blocks, only the
"functions" trainable); lora-r8 (LoRA rank 8 on gate/up/down of the last --last-blocks blocks); lora-matched (LoRA
there at the rank whose trainable count is closest to glu-last5's); full-mlp (those MLPs fully trained: form="glu"
under the "retrofitted" policy, which trains the projections and the functions).

    KALLM_DATA_DIR=../shared/data python scripts/bench/bench_finetune.py [--steps 60] [--lrs 1e-3 3e-3]
        [--json docs/results/bench_finetune.json] [--markdown docs/results/bench_finetune.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from skeleton import (
    add_chat_data_flags,
    add_report_flags,
    argument_parser,
    check_chat_data,
    data_path,
    load_average,
    parse_arguments,
    write_report,
)

ARMS = ("untouched", "glu-last5", "glu-all", "lora-r8", "lora-matched", "full-mlp")


def mlp_projections(model, blocks) -> list[str]:
    """The names of the MLP's linear maps in ``blocks`` (gate/up/down for the gated families)."""
    from kallm.surgery.checks import causal_lm_parts

    _, adapter, block_list = causal_lm_parts(model, "bench_finetune")
    names = []
    for index in blocks:
        prefix = f"{adapter.blocks_path}.{index}.{adapter.mlp_attribute}"
        mlp = model.get_submodule(prefix)
        names += [f"{prefix}.{name}" for name, module in mlp.named_children() if isinstance(module, torch.nn.Linear)]
    return names


def glu_function_count(base, last_n: int) -> int:
    import kallm

    model = kallm.retrofit(copy.deepcopy(base), last_n=last_n, basis="cheby2", degree=2, form="glu")
    return kallm.set_trainable(model, "functions")


#: arm -> the kallm.set_trainable policy kallm.train applies (None: a PEFT model's adapter alone)
POLICIES = {"glu-last5": "functions", "glu-all": "functions", "lora-r8": None, "lora-matched": None,
            "full-mlp": "retrofitted"}


def build_arm(base, arm: str, args):
    """The model of ``arm``; kallm.train sets what trains by ``POLICIES``."""
    from peft import LoraConfig, get_peft_model

    import kallm

    count = base.config.num_hidden_layers
    blocks = range(count - args.last_blocks, count)
    if arm.startswith("glu"):
        last_n = args.last_blocks if arm == "glu-last5" else count
        return kallm.retrofit(base, last_n=last_n, basis="cheby2", degree=2, form="glu")
    if arm.startswith("lora"):
        rank = 8
        if arm == "lora-matched":
            per_rank = sum(sum(base.get_submodule(name).weight.shape) for name in mlp_projections(base, blocks))
            rank = max(1, round(glu_function_count(base, args.last_blocks) / per_rank))
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=mlp_projections(base, blocks))
        return get_peft_model(base, config)
    if arm == "full-mlp":
        return kallm.retrofit(base, last_n=args.last_blocks, basis="cheby2", degree=2, form="glu")
    raise ValueError(f"unknown arm {arm!r}; valid choices: {', '.join(ARMS)}")


def run_arm(arm: str, lr: float, args) -> dict:
    """Train and score one arm in this process."""
    import kallm
    from kallm.eval.bbh import evaluate_bbh, load_bbh
    from kallm.eval.chat_loss import chat_loss
    from kallm.eval.perplexity import load_text, perplexity
    from kallm.train import TrainConfig, train

    torch.manual_seed(args.seed)
    base, tokenizer = kallm.load_model(args.model)
    model = base if arm == "untouched" else build_arm(base, arm, args)
    trainable, seconds = 0, 0.0
    if arm != "untouched":
        if POLICIES[arm]:
            trainable = kallm.set_trainable(model, POLICIES[arm])
        else:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        with tempfile.TemporaryDirectory() as work:
            config = TrainConfig(output_dir=work, max_steps=args.steps, batch_size=args.batch_size,
                                 learning_rate=lr, warmup=args.warmup, max_length=args.max_length,
                                 limit=args.train_limit, logging_steps=max(1, args.steps // 10), save_steps=10**6,
                                 seed=args.seed, progress_bar=False, trainable=POLICIES[arm])
            start = time.perf_counter()
            train(model, tokenizer, args.train_data, config)
            seconds = time.perf_counter() - start
    model.eval()
    with tempfile.TemporaryDirectory() as work:
        row = {"arm": arm, "lr": lr if arm != "untouched" else None, "trainable_parameters": trainable,
               "seconds_per_step": seconds / args.steps if seconds else None,
               "chat_loss": chat_loss(model, tokenizer, held_out_data(args, Path(work)), max_length=args.max_length,
                                      limit=args.eval_limit)["loss"]}
    if args.text:
        row["perplexity"] = perplexity(model, tokenizer, load_text(args.text), max_length=512,
                                       max_tokens=args.perplexity_tokens)["perplexity"]
    if args.bbh_dir:
        bbh = evaluate_bbh(model, tokenizer, load_bbh(args.bbh_dir, args.bbh_tasks.split(","), args.bbh_limit),
                           mode="loglik", progress=False)
        row["bbh"] = bbh["average"]
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def held_out_data(args, work: Path) -> str:
    """The held-out conversations: --eval-data, or with --held-out-from N the --eval-limit conversations of the
    training file from its N-th line on (the training distribution; they must lie past --train-limit)."""
    if args.held_out_from is None:
        return args.eval_data
    lines = Path(args.train_data).read_text(encoding="utf-8").splitlines(True)
    rows = lines[args.held_out_from:args.held_out_from + args.eval_limit]
    if len(rows) < args.eval_limit:
        raise SystemExit(f"--held-out-from {args.held_out_from}: {args.train_data} has {len(lines)} lines")
    path = work / "held_out.jsonl"
    path.write_text("".join(rows), encoding="utf-8")
    return str(path)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"{s['model']}; {s['steps']} steps of {s['batch_size']} x {s['max_length']} tokens on {s['train_limit']} "
        f"conversations of {Path(s['train_data']).parent.name}, warmup {s['warmup']}, seed {s['seed']}; held-out "
        f"chat loss on {s['eval_limit']} conversations of {held_out_name(s)}; WikiText-2 perplexity "
        f"over {s['perplexity_tokens']:,} tokens; BBH ({s['bbh_limit']} examples per task, loglik). Load average "
        f"{s['load_average']}. Each arm at its best learning rate of {', '.join(f'{lr:g}' for lr in s['lrs'])} "
        f"(lowest held-out chat loss); every run in the JSON.",
        "",
        "| arm | lr | trainable parameters | held-out chat loss | WikiText-2 perplexity | BBH (loglik) | s/step | "
        "peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["best"]:
        lr = "" if row["lr"] is None else f"{row['lr']:g}"
        step = "" if row["seconds_per_step"] is None else f"{row['seconds_per_step']:.2f}"
        ppl = f"{row['perplexity']:.2f}" if "perplexity" in row else ""
        bbh = f"{row['bbh']:.1%}" if "bbh" in row else ""
        lines.append(f"| {row['arm']} | {lr} | {row['trainable_parameters']:,} | {row['chat_loss']:.4f} | {ppl} | "
                     f"{bbh} | {step} | {row['peak_rss_mb']:,.0f} MB |")
    return "\n".join(lines) + "\n"


def held_out_name(settings: dict) -> str:
    if settings["held_out_from"] is None:
        return Path(settings["eval_data"]).parent.name
    return f"{Path(settings['train_data']).parent.name} from line {settings['held_out_from']} (not trained on)"


def best_per_arm(runs: list[dict]) -> list[dict]:
    best = {}
    for row in runs:
        if row["arm"] not in best or row["chat_loss"] < best[row["arm"]]["chat_loss"]:
            best[row["arm"]] = row
    return [best[arm] for arm in ARMS if arm in best]


def parse_args(argv):
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms (default: all)")
    parser.add_argument("--last-blocks", type=int, default=5, help="the blocks the 'last5' arms change")
    add_chat_data_flags(parser)
    parser.add_argument("--held-out-from", type=int,
                        help="score the --eval-limit conversations of --train-data from this line on instead")
    parser.add_argument("--text", default=data_path("text", "wikitext2", "wiki.test.raw"))
    parser.add_argument("--bbh-dir", default=data_path("bbh", "bbh"))
    parser.add_argument("--bbh-tasks", default="boolean_expressions,navigate,causal_judgement,hyperbaton,"
                                               "formal_fallacies")
    parser.add_argument("--bbh-limit", type=int, default=12)
    parser.add_argument("--perplexity-tokens", type=int, default=4096)
    parser.add_argument("--train-limit", type=int, default=400)
    parser.add_argument("--eval-limit", type=int, default=40)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", nargs=2, metavar=("ARM", "LR"), help=argparse.SUPPRESS)  # a child process's run
    add_report_flags(parser)
    args = parse_arguments(parser, argv)
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; valid choices: {', '.join(ARMS)}")
    check_chat_data(parser, args)
    if args.held_out_from is not None and args.held_out_from < args.train_limit:
        parser.error(f"--held-out-from {args.held_out_from} would score conversations trained on (the first "
                     f"--train-limit {args.train_limit})")
    for name in ("text", "bbh_dir"):
        if getattr(args, name) and not os.path.exists(getattr(args, name)):
            setattr(args, name, None)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_arm(args.one[0], float(args.one[1]), args)), flush=True)
        return 0
    own = [word for word in (argv if argv is not None else sys.argv[1:])
           if word not in ("--json", "--markdown", args.json, args.markdown)]
    runs = []
    for arm in args.arms.split(","):
        for lr in args.lrs if arm != "untouched" else [0.0]:
            child = subprocess.run([sys.executable, __file__, *own, "--one", arm, str(lr)], capture_output=True,
                                   text=True)
            if child.returncode != 0:
                raise SystemExit(f"{arm} at lr {lr} failed:\n{child.stderr[-3000:]}")
            runs.append(json.loads(next(line for line in child.stdout.splitlines()
                                        if line.startswith("RESULT "))[len("RESULT "):]))
            print(json.dumps(runs[-1]), flush=True)
            settings = {key: value for key, value in vars(args).items() if key not in ("json", "markdown", "one")}
            report = {"settings": {**settings, "load_average": load_average()}, "runs": runs,
                      "best": best_per_arm(runs)}
            table = markdown(report)
            write_report(report, table, args.json, args.markdown)  # after every run: a slow bench
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
