"""``kallm plot``: draw the learned univariate functions of a KAN layer.

Every edge (input i -> output o) of a ``KANLinear`` is a function
``f_io(x) = sum_k w_oik * phi_k(t_i(x))`` (plus ``v_oi * silu(x)`` or ``v_oi * x`` with a base
branch); plotting the strongest edges shows what a
retrofitted block has learned.
"""

from __future__ import annotations

import math

import torch

from ..core.layers import KANLinear


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


