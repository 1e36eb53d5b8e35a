"""``kallm plot``: draw the learned univariate functions of a KAN layer.

Every edge (input i -> output o) of a ``KANLinear`` is a function
``f_io(x) = sum_k w_oik * phi_k(t_i(x))`` (plus ``v_oi * silu(x)`` or ``v_oi * x`` with a base
branch); plotting the strongest edges shows what a
retrofitted block has learned.
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch

from ..checkpoints.load import load_model
from ..core.layers import KANLinear
from ..core.retrofit_config import kan_config_blocks
from ..values import non_negative_int, path_or_hub_id, positive_int


@torch.no_grad()
def edge_functions(layer: KANLinear, edges: list[tuple[int, int]], points: int = 200):
    """``(x, y)`` tensors of shape ``(len(edges), points)`` for each ``(input, output)`` edge.

    x spans the inputs that reach t in [-0.995, 0.995] through the layer's input map, the
    part of the real line where the function can still change.
    """
    t = torch.linspace(-0.995, 0.995, points, dtype=torch.float64)
    inputs = [i for i, _ in edges]
    if layer.input_scale is not None:
        scale = layer.input_scale.detach().double()[inputs].unsqueeze(-1)
        shift = layer.input_shift.detach().double()[inputs].unsqueeze(-1)
        x = (torch.atanh(t) - shift) / scale
    else:
        x = torch.atanh(t).expand(len(edges), points)
    params = [p.detach().double() for p in layer.basis_parameters]
    # Evaluate the basis on a (points, in) grid where column i holds input i's t values.
    grid = t.unsqueeze(-1).expand(points, layer.in_features).contiguous()
    values = layer.basis.values(grid, params)
    weight = layer.weight.detach().double().view(layer.out_features, len(values), layer.in_features)
    ys = []
    for i, o in edges:
        ys.append(sum(weight[o, k, i] * values[k][:, i] for k in range(len(values))))
    y = torch.stack(ys)
    if layer.base_weight is not None:
        branch = torch.nn.functional.silu(x) if layer.base == "silu" else x
        y = y + layer.base_weight.detach().double()[[o for _, o in edges], inputs].unsqueeze(-1) * branch
    return x, y


def strongest_edges(layer: KANLinear, count: int) -> list[tuple[int, int]]:
    """The ``count`` edges whose coefficient vectors (with the base branch's weight) have the largest norm."""
    weight = layer.weight.detach().float().view(layer.out_features, -1, layer.in_features)
    if layer.base_weight is not None:
        weight = torch.cat([weight, layer.base_weight.detach().float().unsqueeze(1)], 1)
    norms = weight.norm(dim=1)  # (out, in)
    top = norms.flatten().topk(min(count, norms.numel())).indices
    return [(int(index % layer.in_features), int(index // layer.in_features)) for index in top]


def plot_layer(layer: KANLinear, path: str, count: int = 16, title: str = "") -> list[tuple[int, int]]:
    """Save a grid of the ``count`` strongest edge functions of ``layer`` to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = strongest_edges(layer, count)
    x, y = edge_functions(layer, edges)
    columns = min(4, len(edges))
    rows = math.ceil(len(edges) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), squeeze=False)
    for axis, (i, o), xs, ys in zip(axes.flat, edges, x, y):
        axis.plot(xs.numpy(), ys.numpy(), color="tab:blue")
        axis.set_title(f"input {i} -> output {o}", fontsize=9)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(edges):]:
        axis.axis("off")
    figure.suptitle(title or f"{layer.basis.describe()['basis']} KAN layer: strongest edges", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return edges


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
