"""Degree curriculum against training at the final degree from the start, at equal steps: held-out chat loss.

Both arms retrofit the same blocks of the same base model with the same basis and intermediate size (the
parameter-budget size at the final degree), train the same policy for the same number of steps on the same
chat data with kallm.train, and are scored by kallm.eval.chat_loss on held-out conversations. The curriculum arm
starts at the first degree of --stages and converts exactly between stages. Prints a markdown table.

    python scripts/bench_curriculum.py [--model smollm2-135m-instruct] [--steps 30] [--stages 1 2 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch

import kallm
from kallm.eval.chat_loss import chat_loss
from kallm.train import TrainConfig, train


def default_data(name: str) -> str | None:
    folder = os.environ.get("KALLM_DATA_DIR")
    return str(Path(folder) / "chat" / name) if folder else None


def run_arm(base, tokenizer, args, degree: int, stages, intermediate_size: int, work: Path) -> dict:
    torch.manual_seed(args.seed)
    model = kallm.retrofit(copy.deepcopy(base), last_n=args.last_n, basis=args.basis, degree=degree,
                           intermediate_size=intermediate_size)
    config = TrainConfig(
        output_dir=str(work / f"degree-{degree}-{'-'.join(map(str, stages or []))}"), trainable=args.trainable,
        max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, warmup=0, max_length=args.max_length,
        limit=args.train_limit, logging_steps=max(1, args.steps // 10), save_steps=10**6, seed=args.seed,
        progress_bar=False, degree_stages=list(stages) if stages else None,
    )
    start = time.perf_counter()
    train(model, tokenizer, args.train_data, config)
    seconds = time.perf_counter() - start
    score = chat_loss(model, tokenizer, args.eval_data, max_length=args.max_length, limit=args.eval_limit)
    return {"arm": f"curriculum {' -> '.join(map(str, stages))}" if stages else f"degree {degree} from the start",
            "chat_loss": score["loss"], "tokens": score["tokens"], "seconds": seconds,
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (kallm.load_model name)")
    parser.add_argument("--train-data", default=default_data("hh_rlhf_helpful/test.jsonl"),
                        help="chat data to train on (default: $KALLM_DATA_DIR/chat/hh_rlhf_helpful/test.jsonl)")
    parser.add_argument("--eval-data", default=default_data("oasst_en100/best_path.jsonl"),
                        help="held-out chat data (default: $KALLM_DATA_DIR/chat/oasst_en100/best_path.jsonl)")
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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.train_data or not args.eval_data:
        parser.error("set KALLM_DATA_DIR or pass --train-data and --eval-data")

    base, tokenizer = kallm.load_model(args.model)
    final = args.stages[-1]
    probe = kallm.retrofit(copy.deepcopy(base), last_n=args.last_n, basis=args.basis, degree=final)
    intermediate_size = probe.config.kan_config["intermediate_size"]
    del probe
    with tempfile.TemporaryDirectory() as work:
        rows = [run_arm(base, tokenizer, args, args.stages[0], args.stages, intermediate_size, Path(work)),
                run_arm(base, tokenizer, args, final, None, intermediate_size, Path(work))]
    print(f"{args.model}, last {args.last_n} blocks, {args.basis}, intermediate size {intermediate_size}, "
          f"{args.trainable}, {args.steps} steps of {args.batch_size} x {args.max_length} tokens\n")
    print("| arm | parameters | held-out chat loss | train time |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['arm']} | {row['parameters']:,} | {row['chat_loss']:.4f} | {row['seconds']:.0f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
