"""``kallm plot MODEL --block N``: draw the learned functions of a KAN layer (``kallm.eval.plot``)."""

from __future__ import annotations

import argparse
import warnings

from ..checkpoints.load import load_model
from ..core.retrofit_config import kan_config_blocks
from ..eval.plot import plot_layer
from ..values import non_negative_int, path_or_hub_id, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=path_or_hub_id, help="folder (or hub id) of a retrofitted model")
    parser.add_argument("--block", type=non_negative_int, help="index of a retrofitted decoder block (required)")
    parser.add_argument("--layer", type=non_negative_int, dest="deprecated_layer", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=non_negative_int, default=0,
                        help="which KAN layer of the feedforward (0 = first; form=gated: the last is the gate)")
    parser.add_argument("--edges", type=positive_int, default=16, help="how many of the strongest edges to draw")
    parser.add_argument("--out", help="PNG path (default: kan_block<L>_stage<S>.png)")


def run(args) -> int:
    if args.deprecated_layer is not None:
        if args.block is not None:
            raise ValueError("give --block or its deprecated name --layer, not both")
        warnings.warn("kallm plot --layer is deprecated: use --block", FutureWarning, stacklevel=2)
        args.block = args.deprecated_layer
    if args.block is None:
        raise ValueError("kallm plot needs --block, the index of a retrofitted decoder block")
    model, _ = load_model(args.model)
    kan_blocks = kan_config_blocks(model.config)
    if not kan_blocks:
        raise ValueError(f"{args.model} has no KAN feedforwards to plot")
    if args.block not in kan_blocks:
        raise ValueError(f"block {args.block} is not a KAN block; KAN blocks: {kan_blocks}")
    kan_config = model.config.kan_config
    if kan_config["form"] == "glu":
        raise ValueError(f"{args.model} was retrofitted with form='glu', whose blocks keep their MLPs; kallm plot draws "
                         f"the edge functions of form='kan' feedforwards")
    block = model.get_submodule(kan_config["blocks_path"])[args.block]
    feedforward = getattr(block, kan_config["mlp_attribute"])
    stages = [*feedforward.layers, *([feedforward.gate] if getattr(feedforward, "gate", None) is not None else [])]
    if not 0 <= args.stage < len(stages):
        gate = f" (stage {len(stages) - 1}: the gate of form='gated')" if len(stages) > len(feedforward.layers) else ""
        raise ValueError(f"--stage must be between 0 and {len(stages) - 1}{gate}")
    path = args.out or f"kan_block{args.block}_stage{args.stage}.png"
    edges = plot_layer(stages[args.stage], path, args.edges, title=f"block {args.block}, stage {args.stage}")
    print(f"Wrote {path} ({len(edges)} edge functions)")
    return 0
