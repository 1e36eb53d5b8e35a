"""What int8 weight-only quantization costs in quality on a fit-init retrofit (WikiText-2 perplexity).

Arms, each scored on the same first ``--perplexity-tokens`` tokens of ``--text`` (WikiText-2 test by default, windows
of 512 tokens, ``kallm.eval.perplexity.perplexity``, as scripts/bench/bench_inference.py scores):

- ``original`` and ``original int8`` (``kallm.quantize(modules="linear")``: the blocks' linear layers);
- ``fit last-N``: ``kallm.retrofit(model, last_n=N, init="fit", tokenizer=tokenizer)`` (default calibration: replies
  the model writes itself), no training;
- ``fit last-N int8 kan`` and ``fit last-N int8 all``: that retrofit with ``kallm.quantize(modules="kan")`` (its KAN
  layers) and ``modules="all"`` (its KAN and linear layers), with the default scales (one per group of up to 32
  weights of a row);
- ``fit last-N int8 kan, one scale per row``: ``kallm.quantize(modules="kan", group_size=None)``.

Each quantized arm's change is given relative to its unquantized model (the target: within 1%).

    KALLM_DATA_DIR=../shared/data python scripts/bench/bench_int8_quality.py
    # writes docs/results/bench_int8_quality.{json,md}
"""

from __future__ import annotations

import copy
import platform
import time
from pathlib import Path

import torch
from skeleton import (
    add_report_flags,
    add_threads_flag,
    argument_parser,
    data_path,
    parse_arguments,
    require_data,
    write_report,
)

import kallm
from kallm.eval.perplexity import perplexity


def build_arms(model, tokenizer, last_n: int) -> dict:
    """name -> (model, the unquantized arm it is compared with)"""
    fitted = kallm.retrofit(copy.deepcopy(model), last_n=last_n, init="fit", tokenizer=tokenizer)
    retrofit_name = f"fit last-{last_n}"
    return {
        "original": (model, None),
        "original int8": (kallm.quantize(copy.deepcopy(model), modules="linear"), "original"),
        retrofit_name: (fitted, None),
        f"{retrofit_name} int8 kan": (kallm.quantize(copy.deepcopy(fitted), modules="kan"), retrofit_name),
        f"{retrofit_name} int8 all": (kallm.quantize(copy.deepcopy(fitted), modules="all"), retrofit_name),
        f"{retrofit_name} int8 kan, one scale per row": (
            kallm.quantize(copy.deepcopy(fitted), modules="kan", group_size=None), retrofit_name),
    }


def markdown(rows) -> str:
    lines = ["| arm | WikiText-2 ppl | vs unquantized |", "|---|---:|---:|"]
    for row in rows:
        change = "-" if row["relative_change"] is None else f"{100 * row['relative_change']:+.2f}%"
        lines.append(f"| {row['arm']} | {row['perplexity']:.3f} | {change} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--last-n", type=int, default=5)
    parser.add_argument("--perplexity-tokens", type=int, default=2048)
    parser.add_argument("--text", default=data_path("text", "wikitext2", "wiki.test.raw"),
                        help="text to score (default: $KALLM_DATA_DIR/text/wikitext2/wiki.test.raw)")
    add_threads_flag(parser, torch.get_num_threads())
    add_report_flags(parser, "bench_int8_quality")
    args = parse_arguments(parser, argv)

    path = Path(args.text or require_data("the default --text"))
    if not path.is_file():
        raise SystemExit(f"no text to score at {path}: set KALLM_DATA_DIR or pass --text")
    text = path.read_text(encoding="utf-8")
    torch.manual_seed(0)
    model, tokenizer = kallm.load_model(args.model)
    started = time.perf_counter()
    arms = build_arms(model.eval(), tokenizer, args.last_n)
    build_seconds = time.perf_counter() - started

    scores, rows = {}, []
    for name, (arm, reference) in arms.items():
        with torch.inference_mode():
            scores[name] = perplexity(arm.eval(), tokenizer, text, max_length=512,
                                      max_tokens=args.perplexity_tokens)["perplexity"]
        change = None if reference is None else scores[name] / scores[reference] - 1
        rows.append({"arm": name, "perplexity": scores[name], "compared_with": reference, "relative_change": change})

    table = markdown(rows)
    print(table)
    report = {"model": args.model, "last_n": args.last_n, "init": "fit", "perplexity_tokens": args.perplexity_tokens,
              "text": str(path.name), "seconds_to_build_arms": build_seconds,
              "environment": {"torch": torch.__version__, "machine": platform.machine(), "threads": args.threads},
              "rows": rows}
    write_report(report, table, args.json, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
