"""Size of a delta checkpoint (kallm.save_delta) against the full checkpoint, for a retrofit of the last N blocks
as retrofitted and after training with a trainable policy (every tensor the policy trains moved a little, as
training moves it), with the largest logit gap after kallm.load_delta. Prints a markdown table.

    python scripts/bench/bench_delta.py [--model smollm2-135m-instruct] [--last-n 5] [--policy tail+embeddings]
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from skeleton import argument_parser

import kallm
from kallm.checkpoints.save import save_checkpoint


def folder_size(folder: Path) -> int:
    """Bytes of the weight files (``*.safetensors``) in ``folder``."""
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def measure(model, base, tokens, work: Path, name: str) -> dict:
    save_checkpoint(model, None, work / f"{name}-full")
    kallm.save_delta(model, work / f"{name}-delta", base=base)
    loaded, _ = kallm.load_delta(work / f"{name}-delta", base=base)
    with torch.no_grad():
        gap = (loaded(tokens).logits - model(tokens).logits).abs().max().item()
    full, delta = folder_size(work / f"{name}-full"), folder_size(work / f"{name}-delta")
    return {"variant": name, "full_bytes": full, "delta_bytes": delta, "logit_gap": gap}


def main(argv=None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (kallm.load_model name)")
    parser.add_argument("--last-n", type=int, default=5, help="blocks to retrofit (default %(default)s)")
    parser.add_argument("--policy", default="tail+embeddings", help="trainable policy of the trained variant")
    args = parser.parse_args(argv)

    base, _ = kallm.load_model(args.model)
    base.eval()
    model = kallm.retrofit(copy.deepcopy(base), last_n=args.last_n).eval()
    vocab = base.get_input_embeddings().weight.shape[0]
    tokens = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        rows.append(measure(model, base, tokens, Path(work), "retrofitted"))
        kallm.set_trainable(model, args.policy)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-3)
        rows.append(measure(model, base, tokens, Path(work), f"trained ({args.policy})"))
    print(f"{args.model}, last {args.last_n} blocks retrofitted\n")
    print("| variant | full checkpoint | delta | delta / full | largest logit gap after load_delta |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['variant']} | {row['full_bytes'] / 1e6:.1f} MB | {row['delta_bytes'] / 1e6:.1f} MB | "
              f"{row['delta_bytes'] / row['full_bytes']:.1%} | {row['logit_gap']:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
