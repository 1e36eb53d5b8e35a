"""Benchmark serving a retrofit: prefill and decode speed, model memory and perplexity, fp32 and int8.

Arms (all built from ``--model``, default the bundled SmolLM2-135M-Instruct):

- ``original``: the model as loaded;
- ``last-5``: its last ``--last-n`` blocks retrofitted (cheby2, degree 2, half the MLP's parameters);
- ``all-blocks``: every block retrofitted;

each in fp32 and with int8 weight-only quantization (``kallm.quantize``: the KAN layers and the blocks' linear
layers of the retrofits, the blocks' linear layers of the original). Retrofits use random init: speed does not
depend on the weights' values, and the perplexity columns compare each arm with its own int8 version (the
quantization's cost), not retrofits with the original.

Measured per arm: prefill tokens/s (one ``--prefill`` token forward pass), decode tokens/s at each
``--batch`` (``--new-tokens`` greedy tokens after a 16-token prompt, with the KV cache), the bytes of its
weights (CUDA: peak memory of the decode run), and WikiText-2 perplexity on ``--perplexity-tokens`` tokens.
All arms run interleaved, round after round (the order rotates), and each number is the median over
``--repeats`` rounds, so that load shared by all arms cancels in the ratios.

    python scripts/bench/bench_inference.py --threads 2   # full run, writes docs/results/bench_inference.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from skeleton import add_report_flags, add_threads_flag, argument_parser, data_path, parse_arguments, write_report

import kallm
from kallm.eval.perplexity import perplexity
from kallm.surgery.retrofit import retrofit

PROMPT_TOKENS = 16


def build_arms(model, last_n: int, quantized: bool) -> dict:
    blocks = model.config.num_hidden_layers
    arms = {"original": model,
            f"last-{last_n}": retrofit(copy.deepcopy(model), last_n=last_n),
            f"all-{blocks}": retrofit(copy.deepcopy(model), last_n=blocks)}
    if quantized:
        for name in list(arms):
            arms[f"{name} int8"] = kallm.quantize(copy.deepcopy(arms[name]),
                                                  modules="linear" if name == "original" else "all")
    return {name: arm.eval() for name, arm in arms.items()}


def weight_bytes(model) -> int:
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        parts = [tensor.qdata, tensor.scale] if hasattr(tensor, "qdata") else [tensor]
        for part in parts:
            storages[part.untyped_storage().data_ptr()] = part.untyped_storage().nbytes()
    return sum(storages.values())


def timed(function, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_round(model, args, vocab, device, generator) -> dict:
    prefill_ids = torch.randint(3, vocab, (1, args.prefill), generator=generator).to(device)
    result = {"prefill_s": timed(lambda: model(prefill_ids, use_cache=False), device)}
    for batch in args.batch:
        prompt = torch.randint(3, vocab, (batch, PROMPT_TOKENS), generator=generator).to(device)
        result[f"decode_b{batch}_s"] = timed(lambda prompt=prompt: model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0), device)
    return result


def speed_ratio(arm_rounds, original_rounds, key) -> float:
    """Median over rounds of the original's time over the arm's: load shared within a round cancels."""
    return statistics.median(o[key] / a[key] for a, o in zip(arm_rounds, original_rounds))


def markdown(rows, args) -> str:
    """The table; "x orig" columns are tokens/s relative to the original (above 1: faster)."""
    header = (["arm", "params", "weights MiB", f"prefill {args.prefill} tok/s", "x orig"]
              + [part for b in args.batch for part in (f"decode b{b} tok/s", "x orig")] + ["WikiText-2 ppl"])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in rows:
        cells = [r["arm"], f"{r['parameters']:,}", f"{r['weight_bytes'] / 2**20:.1f}",
                 f"{r['prefill_tokens_per_s']:.0f}", f"{r['prefill_ratio']:.2f}"]
        for b in args.batch:
            cells += [f"{r[f'decode_b{b}_tokens_per_s']:.1f}", f"{r[f'decode_b{b}_ratio']:.2f}"]
        cells.append("-" if r["perplexity"] is None else f"{r['perplexity']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--last-n", type=int, default=5)
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per decode measurement")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each number is their median")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 weight-only arms")
    parser.add_argument("--perplexity-tokens", type=int, default=2048, help="0 to skip perplexity")
    parser.add_argument("--text", default=data_path("text", "wikitext2", "wiki.test.raw"),
                        help="text to score (default: $KALLM_DATA_DIR/text/wikitext2/wiki.test.raw)")
    add_threads_flag(parser, torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    add_report_flags(parser, "bench_inference")
    args = parse_arguments(parser, argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, tokenizer = kallm.load_model(args.model)
    arms = {name: arm.to(device) for name, arm in build_arms(model, args.last_n, not args.no_int8).items()}
    vocab = model.config.vocab_size
    text = None
    if args.perplexity_tokens:
        if args.text and Path(args.text).is_file():
            text = Path(args.text).read_text(encoding="utf-8")
        else:
            print(f"no text to score at {args.text or '$KALLM_DATA_DIR'} (set KALLM_DATA_DIR or --text): perplexity "
                  "skipped")

    load_before = os.getloadavg()
    names = list(arms)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:  # warm-up: first calls allocate and pick kernels
            measure_round(arms[name], argparse.Namespace(**{**vars(args), "new_tokens": 2, "prefill": 16}), vocab,
                          device, torch.Generator().manual_seed(0))
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(measure_round(arms[name], args, vocab, device, torch.Generator().manual_seed(r)))

    rows = []
    for name in names:
        row = {"arm": name, "parameters": sum(p.numel() for p in arms[name].parameters()),
               "weight_bytes": weight_bytes(arms[name]), "rounds": times[name]}
        row["prefill_tokens_per_s"] = args.prefill / statistics.median(t["prefill_s"] for t in times[name])
        row["prefill_ratio"] = speed_ratio(times[name], times["original"], "prefill_s")
        for b in args.batch:
            key = f"decode_b{b}_s"
            row[f"decode_b{b}_tokens_per_s"] = b * args.new_tokens / statistics.median(t[key] for t in times[name])
            row[f"decode_b{b}_ratio"] = speed_ratio(times[name], times["original"], key)
        row["perplexity"] = None
        if text is not None:
            with torch.inference_mode():
                row["perplexity"] = perplexity(arms[name], tokenizer, text, max_length=512,
                                               max_tokens=args.perplexity_tokens)["perplexity"]
        rows.append(row)

    table = markdown(rows, args)
    print(table)
    report = {
        "model": args.model, "last_n": args.last_n, "prefill_tokens": args.prefill, "new_tokens": args.new_tokens,
        "batches": args.batch, "repeats": args.repeats, "threads": args.threads, "device": args.device,
        "perplexity_tokens": args.perplexity_tokens if text is not None else 0,
        "environment": {"torch": torch.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count(),
                        "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "rows": rows,
    }
    write_report(report, table, args.json, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
