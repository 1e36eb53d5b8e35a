"""Perplexity after a retrofit without training: random init vs function-preserving fit init.

Arms, each scored on the same first ``--max-tokens`` tokens of ``--text`` (WikiText-2 test by
default, windows of ``--max-length`` tokens, ``kallm.eval.perplexity.perplexity``):

- ``original``: the untouched model;
- ``random init``: ``kallm.retrofit(model, last_n=5)`` (default size), no training;
- ``fit init``: ``kallm.retrofit(model, last_n=5, init="fit", tokenizer=tokenizer)``: default
  calibration (replies the model writes itself to kallm's generic prompts; never the scored
  text), no training;
- ``fit init, size N``: the same at ``intermediate_size=N``, for each N of ``--sizes`` (how the
  fit improves with the parameter budget; the default size holds half the MLP's parameters).

    KALLM_DATA_DIR=../shared/data python scripts/bench_fit_init.py       # writes docs/bench_fit_init.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

import kallm
from kallm.eval.perplexity import perplexity
from kallm.surgery.adapters import adapter_for

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--text", help="text file to score (default: $KALLM_DATA_DIR/text/wikitext2/wiki.test.raw)")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--last-n", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="*", default=[],
                        help="extra fit-init arms at these KAN intermediate sizes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=str(ROOT / "docs" / "bench_fit_init.json"), help="'' to skip")
    parser.add_argument("--markdown", default=str(ROOT / "docs" / "bench_fit_init.md"), help="'' to skip")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    text_path = args.text
    if text_path is None:
        data = os.environ.get("KALLM_DATA_DIR")
        if not data:
            parser.error("give --text or set KALLM_DATA_DIR")
        text_path = str(Path(data) / "text" / "wikitext2" / "wiki.test.raw")
    text = Path(text_path).read_text(encoding="utf-8")

    base, tokenizer = kallm.load_model(args.model)
    base.eval()
    adapter = adapter_for(base.config.model_type)

    def score(model):
        return perplexity(model, tokenizer, text, max_length=args.max_length, max_tokens=args.max_tokens)

    arms = []

    def record(name, model, seconds=None, report=None):
        started = time.perf_counter()
        result = score(model)
        last_block = model.get_submodule(adapter.blocks_path)[-1]
        feedforward = getattr(last_block, adapter.mlp_attribute)
        arm = {"arm": name, **result, "feedforward_parameters": sum(p.numel() for p in feedforward.parameters()),
               "retrofit_seconds": seconds, "score_seconds": time.perf_counter() - started}
        if report is not None:
            arm["fit_relative_error"] = {str(k): v for k, v in report["relative_error"].items()}
            arm["calibration_tokens"] = report["calibration_tokens"]
        arms.append(arm)
        print(f"{name}: perplexity {result['perplexity']:.2f}", flush=True)

    record("original", base)
    started = time.perf_counter()
    model = kallm.retrofit(copy.deepcopy(base), last_n=args.last_n)
    record("random init", model, time.perf_counter() - started)
    del model
    started = time.perf_counter()
    model = kallm.retrofit(copy.deepcopy(base), last_n=args.last_n, init="fit", tokenizer=tokenizer)
    record("fit init", model, time.perf_counter() - started, model.kallm_fit_report)
    kan_config = model.config.kan_config
    for size in args.sizes:
        del model
        started = time.perf_counter()
        model = kallm.retrofit(copy.deepcopy(base), last_n=args.last_n, init="fit", tokenizer=tokenizer,
                               intermediate_size=size)
        record(f"fit init, size {size}", model, time.perf_counter() - started, model.kallm_fit_report)

    original = arms[0]["perplexity"]
    for arm in arms:
        arm["ratio_to_original"] = arm["perplexity"] / original
    result = {
        "model": args.model,
        "text": Path(text_path).name,
        "scored_tokens": arms[0]["tokens"],
        "max_length": args.max_length,
        "retrofit": {key: kan_config[key] for key in ("layers", "basis", "degree", "intermediate_size")},
        "arms": arms,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "command": "python scripts/bench_fit_init.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
    }
    table = markdown(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


def markdown(result) -> str:
    retrofit = result["retrofit"]
    lines = [
        f"# Fit init: perplexity without training ({result['model']})",
        "",
        f"{result['text']}, first {result['scored_tokens']} tokens scored in windows of {result['max_length']}; "
        f"KAN feedforwards ({retrofit['basis']}, degree {retrofit['degree']}, intermediate size "
        f"{retrofit['intermediate_size']}) in blocks {retrofit['layers']}, no training.",
        "",
        "| arm | parameters per feedforward | perplexity | x original | retrofit time (s) | relative error per block |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for arm in result["arms"]:
        seconds = "" if arm["retrofit_seconds"] is None else f"{arm['retrofit_seconds']:.0f}"
        errors = ", ".join(f"{k}: {v:.2f}" for k, v in arm.get("fit_relative_error", {}).items())
        lines.append(f"| {arm['arm']} | {arm['feedforward_parameters']:,} | {arm['perplexity']:.2f} | "
                     f"{arm['ratio_to_original']:.2f} | {seconds} | {errors} |")
    machine = result["machine"]
    lines += ["", f"Command: `{result['command']}`; torch {machine['torch']}, {machine['threads']} threads, "
              f"load average {machine['load_average']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
