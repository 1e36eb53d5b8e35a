"""Benchmark kallm's KAN feedforward against SmolLM2's MLP and the textbook KAN formulation.

At hidden size 576 (SmolLM2-135M) it compares, for each token count N:

- ``kan``: ``KANFeedForward(576, h)`` (cheby2, degree 2) with ``h`` sized to half the MLP's parameters;
- ``llama_mlp``: transformers' ``LlamaMLP`` 576 -> 1536 -> 576 (SiLU), the module kallm replaces;
- ``textbook``: the same KAN feedforward computed by ``kallm.reference`` (stack + einsum, plain autograd).

For each: parameters, median forward+backward time (the models run interleaved, and each
ratio is the median of per-round ratios so that load shared by all three cancels),
activation bytes saved for backward per token (``saved_tensors_hooks``; parameters,
duplicates of one storage and copies of weights, which do not grow with N, are not
counted) and, on CUDA, the peak memory of one step above what was allocated before it.
fp32 on CPU, at each ``--threads`` count; fp32 and bf16 on CUDA as well.

    python scripts/bench_layers.py                      # full run, writes docs/bench_layers.{json,md}
    python scripts/bench_layers.py --tokens 512 --repeats 5 --json '' --markdown ''   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from kallm.core.layers import KANFeedForward, intermediate_size_for_budget
from kallm.reference import ReferenceKANFeedForward

HIDDEN, MLP_INTERMEDIATE = 576, 1536
ROOT = Path(__file__).resolve().parent.parent


def build_models(basis: str, degree: int):
    mlp = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=MLP_INTERMEDIATE, hidden_act="silu"))
    mlp_params = sum(p.numel() for p in mlp.parameters())
    h = intermediate_size_for_budget(HIDDEN, mlp_params // 2, basis, degree)
    kan = KANFeedForward(HIDDEN, h, basis, degree)
    return h, {"kan": kan, "llama_mlp": mlp, "textbook": ReferenceKANFeedForward(kan)}


def saved_bytes(model, x) -> int:
    """Bytes autograd keeps for backward in one forward pass, parameters excluded."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return sum(storages.values())


def step(model, x, grad):
    model.zero_grad(set_to_none=True)
    x.grad = None
    model(x).backward(grad)


def timed_step(model, x, grad, sync) -> float:
    sync()
    start = time.perf_counter()
    step(model, x, grad)
    sync()
    return time.perf_counter() - start


def peak_memory(model, x, grad, device) -> int | None:
    if device.type != "cuda":
        return None
    step(model, x, grad)  # gradients exist in steady state; count only what one step adds on top
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(model, x, grad)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(models, tokens, dtype, device, repeats, warmup):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randn(tokens, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, HIDDEN, device=device, dtype=dtype)
    half = x[: tokens // 2].detach().clone().requires_grad_()
    names = list(models)
    for _ in range(warmup):
        for name in names:
            step(models[name], x, grad)
    times = {name: [] for name in names}
    for r in range(repeats):
        # rotate the order so that no model always runs right after the same one
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(timed_step(models[name], x, grad, sync))
    rows = []
    for name in names:
        ratios = [a / b for a, b in zip(times[name], times["llama_mlp"])]
        rows.append({
            "device": device.type, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "model": name,
            "parameters": sum(p.numel() for p in models[name].parameters()),
            "fwd_bwd_ms": 1e3 * statistics.median(times[name]),
            "ratio_vs_llama_mlp": statistics.median(ratios),
            # per-token slope between N/2 and N tokens: weight copies a model saves do not count
            "saved_bytes_per_token": (saved_bytes(models[name], x) - saved_bytes(models[name], half))
            / (tokens - half.shape[0]),
            "saved_bytes": saved_bytes(models[name], x),
            "peak_memory_bytes": peak_memory(models[name], x, grad, device),
        })
    return rows


def measure_decode(models, tokens, dtype, device, repeats, calls=50):
    """Forward time under ``torch.inference_mode`` at a decoding batch (``tokens`` rows): the median over
    interleaved rounds of the mean over ``calls`` calls, and the median per-round ratio to the LlamaMLP."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randn(1, tokens, HIDDEN, device=device, dtype=dtype)
    names = list(models)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            for _ in range(5):
                models[name](x)
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                sync()
                start = time.perf_counter()
                for _ in range(calls):
                    models[name](x)
                sync()
                times[name].append((time.perf_counter() - start) / calls)
    return [{
        "device": device.type, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "model": name,
        "forward_us": 1e6 * statistics.median(times[name]),
        "ratio_vs_llama_mlp": statistics.median(a / b for a, b in zip(times[name], times["llama_mlp"])),
    } for name in names]


def decode_markdown(rows) -> str:
    lines = [
        "Decoding (forward only, torch.inference_mode; N = tokens per call):",
        "",
        "| device | threads | dtype | N | model | forward us | x LlamaMLP |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['device']} | {r['threads'] or '-'} | {r['dtype']} | {r['tokens']} | {r['model']} | "
                     f"{r['forward_us']:.1f} | {r['ratio_vs_llama_mlp']:.2f} |")
    return "\n".join(lines) + "\n"


def markdown(rows, h) -> str:
    lines = [
        f"hidden 576; KAN intermediate h = {h}; saved-bytes target for the KAN FF in fp32: 4*(576+h) = "
        f"{4 * (HIDDEN + h)} bytes/token",
        "",
        "| device | threads | dtype | N | model | params | fwd+bwd ms | x LlamaMLP | saved bytes/token | peak GPU MiB |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.1f}"
        lines.append(
            f"| {r['device']} | {r['threads'] or '-'} | {r['dtype']} | {r['tokens']} | {r['model']} | {r['parameters']:,} | "
            f"{r['fwd_bwd_ms']:.2f} | {r['ratio_vs_llama_mlp']:.2f} | {r['saved_bytes_per_token']:,.0f} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--decode-tokens", type=int, nargs="*", default=[1, 8, 64],
                        help="token counts of the decoding rows (forward only, no grad)")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per model and token count")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--basis", default="cheby2")
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="CPU thread counts to measure (default: torch's choice)")
    parser.add_argument("--json", default=str(ROOT / "docs" / "bench_layers.json"), help="'' to skip")
    parser.add_argument("--markdown", default=str(ROOT / "docs" / "bench_layers.md"), help="'' to skip")
    args = parser.parse_args(argv)

    settings = [(torch.device("cpu"), torch.float32, threads) for threads in args.threads]
    if torch.cuda.is_available():
        settings += [(torch.device("cuda"), dtype, args.threads[0]) for dtype in (torch.float32, torch.bfloat16)]
    load_before = os.getloadavg()
    rows, decode_rows = [], []
    for device, dtype, threads in settings:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        h, models = build_models(args.basis, args.degree)
        models = {name: model.to(device=device, dtype=dtype) for name, model in models.items()}
        for tokens in args.tokens:
            new_rows = measure(models, tokens, dtype, device, args.repeats, args.warmup)
            for row in new_rows:
                row["threads"] = threads if device.type == "cpu" else None
            rows += new_rows
            print(markdown(new_rows, h), flush=True)
        for tokens in args.decode_tokens:
            new_rows = measure_decode(models, tokens, dtype, device, args.repeats)
            for row in new_rows:
                row["threads"] = threads if device.type == "cpu" else None
            decode_rows += new_rows
            print(decode_markdown(new_rows), flush=True)

    table = markdown(rows, h) + ("\n" + decode_markdown(decode_rows) if decode_rows else "")
    print(table)
    report = {
        "hidden_size": HIDDEN, "mlp_intermediate_size": MLP_INTERMEDIATE, "kan_intermediate_size": h,
        "basis": args.basis, "degree": args.degree, "repeats": args.repeats, "warmup": args.warmup,
        "saved_bytes_target_fp32": 4 * (HIDDEN + h),
        "environment": {
            "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "rows": rows,
        "decode_rows": decode_rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
