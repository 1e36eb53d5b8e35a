"""Benchmark kallm's KAN feedforward against SmolLM2's MLP and the textbook KAN formulation.

At hidden size 576 (SmolLM2-135M) it compares, for each token count N:

- ``kan``: ``KANFeedForward(576, h)`` (cheby2, degree 2) with ``h`` sized to half the MLP's parameters;
- ``kan_base_silu``: the same with a base branch on every layer (``base="silu"``), ``h`` sized to the same budget;
- ``kan_gated``: the gated form (``gated=True``: ``down(silu(gate(x)) * up(x))``, three KAN layers), ``h``
  sized to the same budget;
- ``llama_mlp``: transformers' ``LlamaMLP`` 576 -> 1536 -> 576 (SiLU), the module kallm replaces;
- ``textbook``: the ``kan`` arm computed by ``kallm.testing.reference`` (stack + einsum, plain autograd).

For each: parameters, median forward+backward time (the models run interleaved, and each
ratio is the median of per-round ratios so that load shared by all of them cancels),
activation bytes saved for backward per token (``saved_tensors_hooks``; parameters,
duplicates of one storage and copies of weights, which do not grow with N, are not
counted) and, on CUDA, the peak memory of one step above what was allocated before it.
fp32 on CPU, at each ``--threads`` count; fp32 and bf16 on CUDA as well.

``--device cuda`` measures the GPU rows instead (bf16, hidden 576 and 2048, N = 4k, 16k and 64k tokens by
default), with the KAN feedforward at half the MLP's parameters in four forms:

- ``kan_fused``: the Triton kernels of ``kallm/core/triton_kan.py`` (what a CUDA tensor gets);
- ``kan_plain``: the plain op (``KANLinearFunction``), which writes the feature matrix;
- ``kan_compiled``: ``torch.compile`` (inductor) of the plain op;
- against ``llama_mlp`` and ``gemm``, two bias-free ``nn.Linear`` ``hidden -> K*h -> hidden`` with the
  KAN feedforward's FLOPs.

Each row gives forward+backward time, the ratio to ``llama_mlp``, the ratio to ``gemm``, the peak memory of
a step above what was allocated before it, and the achieved bandwidth: the bytes the layers' matrix
multiplies must move at least over the time (per layer: forward reads the input and writes the output,
backward reads the output grad twice and the input once and writes the input grad; weights are read twice
and their grads written once), the same count for every arm.

    python scripts/bench/bench_layers.py                      # full run, writes docs/results/bench_layers.{json,md}
    python scripts/bench/bench_layers.py --tokens 512 --repeats 5 --json '' --markdown ''   # quick look
    python scripts/bench/bench_layers.py --device cuda        # GPU rows, writes docs/results/bench_layers_gpu.{json,md}
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch
from skeleton import add_report_flags, add_threads_flag, argument_parser, parse_arguments, result_path, write_report
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from kallm.core import kan_function
from kallm.core.layers import KANFeedForward, intermediate_size_for_budget
from kallm.testing.reference import ReferenceKANFeedForward

HIDDEN, MLP_INTERMEDIATE = 576, 1536
#: GPU rows: hidden size -> the intermediate size of the Llama MLP it is compared with (SmolLM2-135M, Llama-3.2-1B)
GPU_SIZES = {576: 1536, 2048: 8192}


#: the KAN feedforward arms of the CPU rows: name -> KANFeedForward options beside basis and degree
KAN_ARMS = {"kan": {}, "kan_base_silu": {"base": "silu"}, "kan_gated": {"gated": True}}


def build_models(basis: str, degree: int):
    """The intermediate size of each KAN arm (each at half the MLP's parameters) and the models of the CPU rows."""
    mlp = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=MLP_INTERMEDIATE, hidden_act="silu"))
    budget = sum(p.numel() for p in mlp.parameters()) // 2
    sizes = {name: intermediate_size_for_budget(HIDDEN, budget, basis, degree, **options)
             for name, options in KAN_ARMS.items()}
    models = {name: KANFeedForward(HIDDEN, sizes[name], basis, degree, **options) for name, options in KAN_ARMS.items()}
    return sizes, {**models, "llama_mlp": mlp, "textbook": ReferenceKANFeedForward(models["kan"])}


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


def markdown(rows, sizes) -> str:
    h = sizes["kan"]
    others = ", ".join(f"{name} {size}" for name, size in sizes.items() if name != "kan")
    lines = [
        f"hidden 576; KAN intermediate h = {h} ({others}); saved-bytes target for the KAN FF in fp32: "
        f"4*(576+h) = {4 * (HIDDEN + h)} bytes/token",
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


class PlainOp(torch.nn.Module):
    """Runs ``model`` with the plain KAN op, the fused kernels switched off."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        previous = kan_function.FUSED_DEVICE_TYPES
        kan_function.FUSED_DEVICE_TYPES = ()
        try:
            return self.model(x)
        finally:
            kan_function.FUSED_DEVICE_TYPES = previous


def gpu_models(hidden: int, basis: str, degree: int, dtype):
    """The arms of the GPU rows at one hidden size, and the (in, out) shapes of each arm's matrix multiplies."""
    intermediate = GPU_SIZES[hidden]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu")
    mlp = LlamaMLP(config)
    h = intermediate_size_for_budget(hidden, sum(p.numel() for p in mlp.parameters()) // 2, basis, degree)
    kan = KANFeedForward(hidden, h, basis, degree)
    width = kan.layers[0].basis.num_features
    gemm = torch.nn.Sequential(torch.nn.Linear(hidden, width * h, bias=False),
                               torch.nn.Linear(width * h, hidden, bias=False))
    kan, mlp, gemm = (m.to(device="cuda", dtype=dtype) for m in (kan, mlp, gemm))
    plain = PlainOp(kan)
    kan_shapes = [(hidden, h, width * hidden * h), (h, hidden, width * h * hidden)]
    models = {
        "kan_fused": (kan, kan_shapes),
        "kan_plain": (plain, kan_shapes),
        # compiled inside PlainOp, so that the compiled code is traced and always run with the plain op
        "kan_compiled": (PlainOp(torch.compile(kan)), kan_shapes),
        "llama_mlp": (mlp, [(hidden, intermediate, hidden * intermediate)] * 2
                      + [(intermediate, hidden, hidden * intermediate)]),
        "gemm": (gemm, [(hidden, width * h, width * hidden * h), (width * h, hidden, width * h * hidden)]),
    }
    return h, models


def gemm_traffic_bytes(shapes, tokens: int, element_size: int) -> int:
    """The bytes a forward+backward of these matrix multiplies must move at least (see the module docstring)."""
    return element_size * sum(3 * tokens * (n_in + n_out) + 3 * weights for n_in, n_out, weights in shapes)


def measure_gpu(models, hidden, tokens, dtype, repeats, warmup):
    sync = torch.cuda.synchronize
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    names = list(models)
    for _ in range(warmup):  # also compiles and autotunes
        for name in names:
            step(models[name][0], x, grad)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(timed_step(models[name][0], x, grad, sync))
    rows = []
    for name in names:
        model, shapes = models[name]
        seconds = statistics.median(times[name])
        rows.append({
            "device": "cuda", "dtype": str(dtype).removeprefix("torch."), "hidden": hidden, "tokens": tokens,
            "model": name, "parameters": sum(p.numel() for p in model.parameters()),
            "fwd_bwd_ms": 1e3 * seconds,
            "ratio_vs_llama_mlp": statistics.median(a / b for a, b in zip(times[name], times["llama_mlp"])),
            "ratio_vs_gemm": statistics.median(a / b for a, b in zip(times[name], times["gemm"])),
            "peak_memory_bytes": peak_memory(model, x, grad, x.device),
            "achieved_gb_per_s": gemm_traffic_bytes(shapes, tokens, x.element_size()) / seconds / 1e9,
        })
    return rows


def gpu_markdown(rows) -> str:
    lines = [
        "| hidden | N | model | params | fwd+bwd ms | x LlamaMLP | x GEMM | peak MiB | GB/s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['hidden']} | {r['tokens']} | {r['model']} | {r['parameters']:,} | {r['fwd_bwd_ms']:.2f} | "
            f"{r['ratio_vs_llama_mlp']:.2f} | {r['ratio_vs_gemm']:.2f} | {r['peak_memory_bytes'] / 2**20:.0f} | "
            f"{r['achieved_gb_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def gpu_main(args) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; torch.cuda.is_available() is False on this machine")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = []
    for hidden in args.hidden:
        torch.manual_seed(0)
        h, models = gpu_models(hidden, args.basis, args.degree, dtype)
        for tokens in args.tokens:
            new_rows = measure_gpu(models, hidden, tokens, dtype, args.repeats, args.warmup)
            for row in new_rows:
                row["kan_intermediate_size"] = h
            rows += new_rows
            print(gpu_markdown(new_rows), flush=True)
    table = gpu_markdown(rows)
    print(table)
    report = {
        "basis": args.basis, "degree": args.degree, "dtype": args.dtype, "repeats": args.repeats,
        "warmup": args.warmup, "mlp_intermediate_sizes": GPU_SIZES,
        "environment": {"torch": torch.__version__, "cuda": torch.cuda.get_device_name(),
                        "triton": _triton_version()},
        "rows": rows,
    }
    json_path = args.json if args.json != result_path("bench_layers.json") else result_path("bench_layers_gpu.json")
    markdown_path = (args.markdown if args.markdown != result_path("bench_layers.md")
                     else result_path("bench_layers_gpu.md"))
    write_report(report, table, json_path, markdown_path)
    return 0


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def main(argv=None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: the CPU rows (and fp32/bf16 CUDA rows where a GPU exists); cuda: the GPU rows")
    parser.add_argument("--tokens", type=int, nargs="+", help="default: 512 2048 8192 (cpu), 4096 16384 65536 (cuda)")
    parser.add_argument("--hidden", type=int, nargs="+", default=list(GPU_SIZES), choices=list(GPU_SIZES),
                        help="hidden sizes of the GPU rows")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the GPU rows")
    parser.add_argument("--decode-tokens", type=int, nargs="*", default=[1, 8, 64],
                        help="token counts of the decoding rows (forward only, no grad)")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per model and token count")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--basis", default="cheby2")
    parser.add_argument("--degree", type=int, default=2)
    add_threads_flag(parser, [torch.get_num_threads()], nargs="+",
                     help="CPU thread counts to measure (default: torch's choice)")
    add_report_flags(parser, "bench_layers", note=" (--device cuda: docs/results/bench_layers_gpu.json and .md)")
    args = parse_arguments(parser, argv)
    if args.device == "cuda":
        args.tokens = args.tokens or [4096, 16384, 65536]
        return gpu_main(args)
    args.tokens = args.tokens or [512, 2048, 8192]

    settings = [(torch.device("cpu"), torch.float32, threads) for threads in args.threads]
    if torch.cuda.is_available():
        settings += [(torch.device("cuda"), dtype, args.threads[0]) for dtype in (torch.float32, torch.bfloat16)]
    load_before = os.getloadavg()
    rows, decode_rows = [], []
    for device, dtype, threads in settings:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        sizes, models = build_models(args.basis, args.degree)
        models = {name: model.to(device=device, dtype=dtype) for name, model in models.items()}
        for tokens in args.tokens:
            new_rows = measure(models, tokens, dtype, device, args.repeats, args.warmup)
            for row in new_rows:
                row["threads"] = threads if device.type == "cpu" else None
            rows += new_rows
            print(markdown(new_rows, sizes), flush=True)
        for tokens in args.decode_tokens:
            new_rows = measure_decode(models, tokens, dtype, device, args.repeats)
            for row in new_rows:
                row["threads"] = threads if device.type == "cpu" else None
            decode_rows += new_rows
            print(decode_markdown(new_rows), flush=True)

    table = markdown(rows, sizes) + ("\n" + decode_markdown(decode_rows) if decode_rows else "")
    print(table)
    report = {
        "hidden_size": HIDDEN, "mlp_intermediate_size": MLP_INTERMEDIATE, "kan_intermediate_size": sizes["kan"],
        "kan_intermediate_sizes": sizes, "basis": args.basis, "degree": args.degree, "repeats": args.repeats, "warmup": args.warmup,
        "saved_bytes_target_fp32": 4 * (HIDDEN + sizes["kan"]),
        "environment": {
            "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "rows": rows,
        "decode_rows": decode_rows,
    }
    write_report(report, table, args.json, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
