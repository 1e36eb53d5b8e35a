"""kallm's BBH scorer and lm-evaluation-harness side by side, on the same model, tasks and examples.

Both score in log-likelihood mode: kallm's ``evaluate_bbh(mode="loglik")``, and the harness on the same examples
written as local task YAMLs by ``kallm.eval.harness.write_bbh_tasks`` (the question as the chat's user turn,
each answer of the closed set right after the prompt). Offline; needs ``kallm[harness]`` and a BBH folder.

    python scripts/bench/compare_harness.py --bbh-dir $KALLM_DATA_DIR/bbh/bbh --limit 12
"""

from __future__ import annotations

import os
import tempfile
import time

from skeleton import argument_parser, data_path

DEFAULT_TASKS = "boolean_expressions,navigate,causal_judgement,hyperbaton,formal_fallacies"


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model to score (kallm.load_model)")
    parser.add_argument("--bbh-dir", default=data_path("bbh", "bbh"),
                        help="folder of BBH task JSON files (default: $KALLM_DATA_DIR/bbh/bbh)")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="BBH tasks, comma-separated")
    parser.add_argument("--limit", type=int, default=12, help="first N examples of each task")
    parser.add_argument("--batch-size", type=int, default=8, help="examples scored at once")
    args = parser.parse_args()
    if not args.bbh_dir:
        parser.error("give --bbh-dir, or set KALLM_DATA_DIR")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import kallm
    from kallm.eval.bbh import evaluate_bbh, load_bbh
    from kallm.eval.harness import evaluate_harness, write_bbh_tasks

    model, tokenizer = kallm.load_model(args.model)
    data = load_bbh(args.bbh_dir, args.tasks, args.limit)
    started = time.perf_counter()
    ours = evaluate_bbh(model, tokenizer, data, mode="loglik", batch_size=args.batch_size, progress=True)
    ours_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        names = write_bbh_tasks(data, folder)
        started = time.perf_counter()
        harness = evaluate_harness(model, tokenizer, names, include=folder, batch_size=args.batch_size)
        harness_seconds = time.perf_counter() - started
    print(f"\n{args.model}, BBH in log-likelihood mode, first {args.limit} examples per task, chat template\n")
    print("| task | examples scored | kallm | lm-evaluation-harness " + harness["lm_eval_version"] + " |")
    print("|---|---:|---:|---:|")
    for task, entry in ours["tasks"].items():
        theirs = harness["tasks"].get(f"kallm_bbh_{task}", {}).get("acc")
        print(f"| {task} | {entry['total']} | {entry['accuracy']:.1%} | "
              + (f"{theirs:.1%} |" if theirs is not None else "not scored |"))
    average = sum(harness["tasks"][f"kallm_bbh_{task}"]["acc"] for task in ours["tasks"]) / len(ours["tasks"])
    print(f"| **average (macro)** | | **{ours['average']:.1%}** | **{average:.1%}** |")
    print(f"\nseconds: kallm {ours_seconds:.1f}, lm-evaluation-harness {harness_seconds:.1f}")


if __name__ == "__main__":
    main()
