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

``--per-block`` adds where the fit-init cost comes from, scored on the first ``--per-block-tokens``
tokens: each retrofitted block alone fitted, alone deleted (its MLP replaced by its mean output
on the calibration), alone replaced by a ridge-linear map of the calibration, and all of them at
once each way; and each fit's error on the calibration next to its error on the scored text.

    KALLM_DATA_DIR=../shared/data python scripts/bench/bench_fit_init.py  # writes docs/results/bench_fit_init.{json,md}
"""

from __future__ import annotations

import copy
import os
import platform
import time
from pathlib import Path

import torch
from skeleton import add_report_flags, add_threads_flag, argument_parser, data_path, parse_arguments, write_report
from torch import nn

import kallm
from kallm.eval.perplexity import perplexity
from kallm.surgery.architectures import architecture_for
from kallm.surgery.calibration import default_calibration, record_feedforwards
from kallm.surgery.fit import ordinary_token_error, outlier_rows


def main(argv=None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--text", default=data_path("text", "wikitext2", "wiki.test.raw"),
                        help="text file to score (default: $KALLM_DATA_DIR/text/wikitext2/wiki.test.raw)")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--last-n", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="*", default=[],
                        help="extra fit-init arms at these KAN intermediate sizes")
    parser.add_argument("--per-block", action="store_true", help="also the block-by-block table (slow)")
    parser.add_argument("--per-block-tokens", type=int, default=4096, help="tokens scored by the per-block table")
    add_threads_flag(parser, None, help="torch CPU threads (default: torch's choice)")
    add_report_flags(parser, "bench_fit_init")
    args = parse_arguments(parser, argv)
    if args.text is None:
        parser.error("give --text or set KALLM_DATA_DIR")
    text = Path(args.text).read_text(encoding="utf-8")

    base, tokenizer = kallm.load_model(args.model)
    base.eval()
    architecture = architecture_for(base.config.model_type)

    def score(model):
        return perplexity(model, tokenizer, text, max_length=args.max_length, max_tokens=args.max_tokens)

    arms = []

    def record(name, model, seconds=None, report=None):
        started = time.perf_counter()
        result = score(model)
        last_block = model.get_submodule(architecture.blocks_path)[-1]
        feedforward = getattr(last_block, architecture.mlp_attribute)
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
    blocks = per_block(base, model, architecture, tokenizer, text, args) if args.per_block else None
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
        "text": Path(args.text).name,
        "scored_tokens": arms[0]["tokens"],
        "max_length": args.max_length,
        "retrofit": {key: kan_config[key] for key in ("blocks", "basis", "degree", "intermediate_size")},
        "arms": arms,
        "per_block": blocks,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "command": "python scripts/bench/bench_fit_init.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
    }
    table = markdown(result)
    print(table)
    write_report(result, table, args.json, args.markdown)
    return 0


def markdown(result) -> str:
    retrofit = result["retrofit"]
    lines = [
        f"# Fit init: perplexity without training ({result['model']})",
        "",
        f"{result['text']}, first {result['scored_tokens']} tokens scored in windows of {result['max_length']}; "
        f"KAN feedforwards ({retrofit['basis']}, degree {retrofit['degree']}, intermediate size "
        f"{retrofit['intermediate_size']}) in blocks {retrofit['blocks']}, no training.",
        "",
        "| arm | parameters per feedforward | perplexity | x original | retrofit time (s) | relative error per block |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for arm in result["arms"]:
        seconds = "" if arm["retrofit_seconds"] is None else f"{arm['retrofit_seconds']:.0f}"
        errors = ", ".join(f"{k}: {v:.2f}" for k, v in arm.get("fit_relative_error", {}).items())
        lines.append(f"| {arm['arm']} | {arm['feedforward_parameters']:,} | {arm['perplexity']:.2f} | "
                     f"{arm['ratio_to_original']:.2f} | {seconds} | {errors} |")
    if result["per_block"]:
        lines += per_block_markdown(result["per_block"])
    machine = result["machine"]
    lines += ["", f"Command: `{result['command']}`; torch {machine['torch']}, {machine['threads']} threads, "
              f"load average {machine['load_average']}.", ""]
    return "\n".join(lines)


class MeanOutput(nn.Module):
    """A deleted feedforward: every token gets the mean output of the ordinary calibration tokens."""

    def __init__(self, outputs):
        super().__init__()
        self.register_buffer("mean", outputs.mean(0))

    def forward(self, x):
        return self.mean.to(x.dtype).expand(*x.shape[:-1], -1)


class RidgeLinear(nn.Module):
    """An affine map fitted to the calibration rows by ridge regression (ridge 0.1 times each input's variance)."""

    def __init__(self, inputs, outputs, ridge=0.1):
        super().__init__()
        x_mean, y_mean = inputs.mean(0), outputs.mean(0)
        x, y = (inputs - x_mean).double(), (outputs - y_mean).double()
        gram = x.T @ x
        gram.diagonal().add_(ridge * gram.diagonal())
        weight = torch.linalg.solve(gram, x.T @ y).float()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", y_mean - x_mean @ weight)

    def forward(self, x):
        return (x.float() @ self.weight + self.bias).to(x.dtype)


def per_block(base, fitted, architecture, tokenizer, text, args) -> dict:
    """The ``--per-block`` table: perplexity with blocks swapped one at a time and all at once,
    for the fitted KAN feedforwards, deletion and a linear map, and the fit errors on the
    calibration (the default one, as the fit used) and on the scored text."""
    if architecture.bypassed_attributes:
        raise SystemExit("--per-block needs a model whose feedforward is one module (not OPT-style)")
    indices = fitted.config.kan_config["blocks"]
    fitted_blocks = fitted.get_submodule(architecture.blocks_path)
    kans = {i: getattr(fitted_blocks[i], architecture.mlp_attribute) for i in indices}
    calibration = record_feedforwards(base, architecture, indices, default_calibration(base, tokenizer), progress=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][: args.per_block_tokens]
    scored = record_feedforwards(base, architecture, indices, list(ids.split(args.max_length)), progress=False)
    ordinary = {i: ~outlier_rows(outputs) for i, (_, outputs) in calibration.items()}
    deleted = {i: MeanOutput(outputs[ordinary[i]]) for i, (_, outputs) in calibration.items()}
    linear = {i: RidgeLinear(inputs[ordinary[i]], outputs[ordinary[i]]) for i, (inputs, outputs) in calibration.items()}
    scored_errors = {i: ordinary_token_error(kans[i], *scored[i]) for i in indices}

    def score(replacements):
        model = copy.deepcopy(base)
        for i, module in replacements.items():
            setattr(model.get_submodule(architecture.blocks_path)[i], architecture.mlp_attribute, module)
        return perplexity(model, tokenizer, text, max_length=args.max_length,
                          max_tokens=args.per_block_tokens)["perplexity"]

    rows = []
    for group in [[i] for i in indices] + [indices]:
        rows.append({
            "blocks": group,
            "calibration_error": [fitted.kallm_fit_report["ordinary_token_error"][i] for i in group],
            "scored_text_error": [scored_errors[i] for i in group],
            **{f"perplexity_{name}": score({i: modules[i] for i in group})
               for name, modules in (("fitted", kans), ("deleted", deleted), ("linear", linear))},
        })
        print(f"blocks {group}: {rows[-1]}", flush=True)
    return {"tokens": int(ids.numel()), "original": score({}), "rows": rows}


def per_block_markdown(table) -> list[str]:
    lines = [
        "",
        f"## Block by block (first {table['tokens']} tokens; original perplexity {table['original']:.2f})",
        "",
        "Fit errors are over ordinary tokens (no massive activations): on the calibration, and on the scored text.",
        "",
        "| blocks swapped | fit error, calibration | fit error, scored text | perplexity, fitted KAN "
        "| perplexity, MLP deleted (mean output) | perplexity, ridge-linear map |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for row in table["rows"]:
        name = ", ".join(str(i) for i in row["blocks"])
        errors = [", ".join(f"{e:.2f}" for e in row[key]) for key in ("calibration_error", "scored_text_error")]
        lines.append(f"| {name} | {errors[0]} | {errors[1]} | {row['perplexity_fitted']:.2f} | "
                     f"{row['perplexity_deleted']:.2f} | {row['perplexity_linear']:.2f} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
