"""Function-preserving initialisation: fit each new KAN feedforward to the MLP it replaces.

``retrofit(..., init="fit")`` records the inputs and outputs of the chosen feedforwards
while the original model reads calibration text, swaps in the KAN feedforwards, then
fits each one to the recorded input -> output map of the module it replaced (block-local
regression). See docs/fit-init.md for the method and measured numbers. This module is the
solver; the calibration text and the records come from ``kallm.surgery.calibration``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.retrofit_config import INITS
from .architectures import Architecture, swiglu_parts
from .calibration import calibration_sequences, check_calibration, original_feedforward, record_feedforwards

logger = logging.getLogger("kallm")

#: noisy copies of each recorded row that the fit adds, with targets from the replaced MLP
AUGMENT = 4


def check_fit_arguments(init: str, calibration, tokenizer) -> None:
    """Refuse bad ``init``/``calibration``/``tokenizer`` combinations before anything runs."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid choices: {', '.join(INITS)}")
    if init == "random":
        if calibration is not None:
            raise ValueError("calibration is only used by init='fit'; pass init='fit' or drop calibration")
        return
    check_calibration(calibration, tokenizer)


def fit_new_feedforwards(model, architecture: Architecture, indices: list[int], install: Callable[[], None],
                         template: nn.Module, calibration=None, tokenizer=None, progress: bool = True) -> dict:
    """Record the feedforwards of ``indices`` on calibration text, run ``install`` (which swaps
    in the KAN feedforwards), then fit each new one to the module it replaced.

    ``template`` is a KAN feedforward like the new ones; it sizes the fit, and a calibration
    with fewer tokens than ``minimum_calibration_tokens(template)`` is refused before
    ``install`` runs. A fit that leaves any non-finite parameter or error raises (the caller
    undoes ``install``).

    Attaches and returns ``model.kallm_fit_report``: ``{"relative_error": {block: error},
    "ordinary_token_error": {block: error}, "calibration_tokens": count}``, and logs the
    errors (``logging.getLogger("kallm")``). ``relative_error`` is over all calibration tokens;
    ``ordinary_token_error`` leaves out the few tokens with massive activations, which can hold
    most of a block's output energy and so hide a poor fit of every other token.
    """
    blocks = model.get_submodule(architecture.blocks_path)
    originals = {i: original_feedforward(blocks[i], architecture) for i in indices}
    sequences = calibration_sequences(model, calibration, tokenizer, progress=progress)
    tokens = sum(int(s.numel()) for s in sequences)
    _check_calibration_size(template, tokens)
    records = record_feedforwards(model, architecture, indices, sequences, progress=progress)
    for index, (inputs, _) in records.items():
        _check_spread(index, inputs, tokens)
    install()
    errors, ordinary = {}, {}
    bar = tqdm(sorted(indices), desc="kallm fit: blocks", disable=not progress, unit="block")
    for index in bar:
        inputs, outputs = records.pop(index)
        feedforward = getattr(blocks[index], architecture.mlp_attribute)
        if getattr(feedforward, "gate", None) is not None:
            errors[index] = fit_gated_feedforward(feedforward, inputs, outputs, originals.pop(index),
                                                  dict(architecture.mlp_layout))
        else:
            errors[index] = fit_feedforward(feedforward, inputs, outputs, originals.pop(index))
        ordinary[index] = ordinary_token_error(feedforward, inputs, outputs)
        bar.set_postfix(block=index, relative_error=f"{errors[index]:.3f}")
        _check_finite(index, feedforward, errors[index], ordinary[index], tokens)
    report = {"relative_error": errors, "ordinary_token_error": ordinary, "calibration_tokens": tokens}
    logger.info("kallm fit init on %d calibration tokens, relative error per block: %s", tokens,
                format_errors(report))
    model.kallm_fit_report = report
    return report


def minimum_calibration_tokens(feedforward, augment: int = AUGMENT) -> int:
    """The fewest calibration tokens that give each least-squares problem of the fit at least as
    many rows as unknowns: a layer with ``F`` basis features solves, per output, ``F`` coefficients
    and a bias, and each token gives ``1 + augment`` rows (itself and its noisy copies)."""
    return -(-_unknowns_per_output(feedforward) // (1 + augment))


def _unknowns_per_output(feedforward) -> int:
    return max(_coefficients(layer).shape[1] for layer in feedforward.layers) + 1


def _check_calibration_size(template, tokens: int) -> None:
    needed = minimum_calibration_tokens(template)
    if tokens < needed:
        unknowns = _unknowns_per_output(template)
        raise ValueError(
            f"init='fit' needs at least {needed} calibration tokens for these KAN feedforwards, got {tokens}: its "
            f"largest least-squares problem has {unknowns} unknowns per output (basis features, base branch inputs "
            f"and a bias) and "
            f"each token gives {1 + AUGMENT} rows (itself and {AUGMENT} noisy copies), so fewer tokens leave the "
            f"fit underdetermined. Pass more calibration text, or use init='random'"
        )


#: below this spread across tokens (relative to the inputs' size) the inputs of a feedforward are all alike
MIN_INPUT_SPREAD = 1e-3


def _check_spread(index: int, inputs: torch.Tensor, tokens: int) -> None:
    """Refuse calibration whose tokens all give block ``index``'s feedforward the same input (one token
    repeated): a fit to a single point matches it exactly with huge parameters and says nothing of other text."""
    x = inputs.float()
    if x.std(0, unbiased=False).max() <= MIN_INPUT_SPREAD * x.pow(2).mean().sqrt():
        raise ValueError(
            f"init='fit': the {tokens} calibration tokens give the feedforward of block {index} the same input "
            f"(no spread across tokens, e.g. one token repeated), so there is nothing to fit; pass varied "
            f"calibration text, or use init='random'")


def _check_finite(index: int, feedforward, error: float, ordinary: float, tokens: int) -> None:
    broken = [name for name, param in feedforward.named_parameters() if not torch.isfinite(param).all()]
    if broken or not math.isfinite(error) or not math.isfinite(ordinary):
        detail = f"parameters {broken}" if broken else f"relative error {error}, ordinary-token error {ordinary}"
        raise FloatingPointError(
            f"init='fit' left non-finite values in block {index}'s KAN feedforward ({detail}); the model is "
            f"restored as it was before retrofit. The {tokens} calibration tokens may be too few or too alike "
            f"for this fit, or the model's dtype too narrow: pass more varied calibration text, retrofit in "
            f"float32, or use init='random'"
        )


def format_errors(report: dict) -> str:
    """``"25: 0.457, 28: 0.058 (ordinary tokens 0.333), ..."`` from a fit report."""
    parts = []
    for index, error in report["relative_error"].items():
        ordinary = report["ordinary_token_error"][index]
        parts.append(f"{index}: {error:.3f}" + (f" (ordinary tokens {ordinary:.3f})" if abs(ordinary - error) > 5e-4 else ""))
    return ", ".join(parts)


@torch.no_grad()
def ordinary_token_error(feedforward, inputs: torch.Tensor, outputs: torch.Tensor) -> float:
    """``||f(x) - y|| / ||y||`` over the rows that are not massive-activation outliers."""
    keep = ~outlier_rows(outputs)
    x, y = inputs[keep], outputs[keep]
    prediction = _run(feedforward, x.to(next(feedforward.parameters()).device))
    return float((prediction.cpu() - y.cpu().float()).norm() / y.float().norm().clamp_min(1e-12))


# ------------------------------------------------------------------------ the fit

#: a row whose target norm exceeds this many times the median is an outlier (attention-sink tokens)
OUTLIER_FACTOR = 5.0
#: standardised inputs reach tanh(SPREAD * z); no row of the fit data goes past tanh(ZCAP)
INPUT_SPREAD, HIDDEN_SPREAD, ZCAP = 1.0, 0.5, 3.0
#: the step unit reaches tanh(+-STEP_SHARPNESS) at the edges of the gap: flat to 1e-6 on either side
STEP_SHARPNESS = 8.0
#: ridge of the first (and middle) layers, which fit smooth targets
HIDDEN_RIDGE = 1e-3
CHUNK = 8192


@torch.no_grad()
def fit_feedforward(feedforward, inputs: torch.Tensor, outputs: torch.Tensor, original: nn.Module | None = None, *,
                    augment: int = AUGMENT, noise: float = 0.5, ridge: float = 0.1, seed: int = 0) -> float:
    """Fit ``feedforward`` (a ``KANFeedForward``) so that ``feedforward(inputs) ~ outputs``.

    ``original`` is the module being replaced. It supplies the first layer's targets (the
    pre-activations of its most important neurons; a pair ``g + u``, ``g - u`` per neuron of a
    gated MLP, whose squares give the product ``g * u``) and the targets of ``augment`` noisy
    copies of each recorded row (Gaussian noise of ``noise`` times each channel's spread).
    Without it the first layer keeps its random weights and only the recorded rows are used.
    The last layer is solved by ridge least squares (``ridge`` times each feature's variance).
    A layer's base branch (``base="silu"`` or ``"linear"``) is solved with its basis coefficients: its
    inputs (``silu(x)`` or ``x``) are extra columns of the same least-squares problem.

    Rows whose target is far larger than the rest (the attention-sink token's massive
    activations) are fitted apart: one hidden unit becomes a step that is on for them only,
    so they are matched without bending the fit of ordinary tokens.

    Returns the relative error ``||f(x) - y|| / ||y||`` over the recorded rows.
    """
    layers = list(feedforward.layers)
    device = layers[0].weight.device
    x = inputs.to(device=device, dtype=torch.float32)
    y = outputs.to(device=device, dtype=torch.float32)
    if x.shape[0] == 0:
        raise ValueError("no calibration rows to fit")
    generator = torch.Generator(device=device).manual_seed(seed)
    outlier = outlier_rows(y)
    train_x, train_y = x[~outlier], y[~outlier]
    if original is not None and augment > 0:
        copies = train_x.repeat(augment, 1)
        copies += noise * train_x.std(0, unbiased=False) * torch.randn(copies.shape, generator=generator, device=device)
        train_x, train_y = torch.cat([train_x, copies]), torch.cat([train_y, _run(original, copies)])

    sink = int(outlier.any())
    _standardize(layers, 0, train_x, INPUT_SPREAD)
    directions = NeuronDirections(original, train_x, layers[0].out_features - sink) if original is not None else None
    if directions is not None and directions.count:
        units = torch.arange(sink, sink + directions.count, device=device)
        _least_squares(layers[0], train_x, directions, HIDDEN_RIDGE, units=units)
    hidden = train_x
    for k in range(1, len(layers)):
        hidden = _run(layers[k - 1], hidden)
        _standardize(layers, k, hidden, HIDDEN_SPREAD)
        if k < len(layers) - 1:  # middle stages start as identities
            _least_squares(layers[k], hidden, hidden, HIDDEN_RIDGE)
    if sink:
        _make_step_unit(layers, _inputs_of(layers, len(layers) - 2, x), outlier)
    _least_squares(layers[-1], _inputs_of(layers, len(layers) - 1, train_x), train_y, ridge)
    if sink:
        _match_outliers(layers[-1], _inputs_of(layers, len(layers) - 1, x), y, outlier)
    prediction = _run(feedforward, x)
    return float((prediction - y).norm() / y.norm().clamp_min(1e-12))


@torch.no_grad()
def fit_gated_feedforward(feedforward, inputs: torch.Tensor, outputs: torch.Tensor, original: nn.Module,
                          layout: dict[str, str], *, augment: int = AUGMENT, noise: float = 0.5,
                          ridge: float = HIDDEN_RIDGE, seed: int = 0) -> float:
    """Start a ``form="gated"`` feedforward (``base="linear"``) as the most important channels of the SwiGLU MLP
    ``original``, then solve its output layer; returns the relative error over the recorded rows.

    The gate and up layers' base branches get the MLP's gate and up rows of the ``intermediate_size`` channels with
    the largest ``rms(silu(g_j) u_j) * ||down[:, j]||`` on the recorded inputs, and zero basis coefficients, so they
    compute those channels exactly (a wider form's spare channels get a zero up row and add nothing); their input
    maps are set so that the basis functions see well-spread inputs once they learn. The output layer's base branch
    gets the MLP's down columns of those channels, and on top of them its basis and base branch are solved by ridge
    least squares for the rest of the output, on the recorded rows and ``augment`` noisy copies of each (targets
    from ``original``): that makes up for part of the dropped channels, and at full width leaves the copy exact.
    """
    gate, up, down = swiglu_parts(original, layout)
    first, last = feedforward.layers[0], feedforward.layers[-1]
    if len(feedforward.layers) != 2:
        raise ValueError("fit init of form='gated' needs a two-stage basis (one '>' at most)")
    device = first.base_weight.device
    x = inputs.to(device=device, dtype=torch.float32)
    y = outputs.to(device=device, dtype=torch.float32)
    channels = torch.nn.functional.silu(_run(gate, x)) * _run(up, x)
    eye = torch.eye(channels.shape[1], device=device)
    down_columns = _run(down, eye) - _run(down, eye[:1] * 0)
    importance = channels.pow(2).mean(0).sqrt() * down_columns.norm(dim=1)
    keep = importance.argsort(descending=True)[: feedforward.intermediate_size]
    width = len(keep)
    for layer, projection in ((feedforward.gate, gate), (first, up)):
        bias = projection.bias
        if bias is not None and layer.bias is None:
            raise ValueError("the MLP's projections have biases, which a form='gated' feedforward built with "
                             "bias=False cannot hold; use bias=True")
        layer.weight.zero_()
        layer.base_weight.zero_()
        layer.base_weight[:width] = projection.weight[keep].to(layer.base_weight.dtype)
        if layer.bias is not None:
            layer.bias.zero_()
            if bias is not None:
                layer.bias[:width] = bias[keep].to(layer.bias.dtype)
        _standardize([layer], 0, x, INPUT_SPREAD)
    if width < feedforward.intermediate_size:  # spare gate channels keep their random rows: their up rows are zero
        feedforward.gate.base_weight[width:].normal_(0.0, x.shape[1] ** -0.5)
    generator = torch.Generator(device=device).manual_seed(seed)
    train_x, train_y = x, y
    if augment > 0:
        copies = x.repeat(augment, 1)
        copies += noise * x.std(0, unbiased=False) * torch.randn(copies.shape, generator=generator, device=device)
        train_x, train_y = torch.cat([x, copies]), torch.cat([y, _run(original, copies)])
    hidden = _gated_hidden(feedforward, train_x)
    _standardize([last], 0, hidden, HIDDEN_SPREAD)
    # solved for what the copied channels miss, so that the ridge pulls towards the copy (exact at full width)
    copied, offset = down_columns[keep].T, _run(down, eye[:1] * 0)[0]
    _least_squares(last, hidden, train_y - hidden[:, :width] @ copied.T - offset, ridge)
    last.base_weight[:, :width] += copied.to(last.base_weight.dtype)
    if last.bias is not None:
        last.bias += offset.to(last.bias.dtype)
    prediction = _run(feedforward, x)
    return float((prediction - y).norm() / y.norm().clamp_min(1e-12))


def _gated_hidden(feedforward, x):
    """The input of a gated feedforward's output layer, ``silu(gate(x)) * up(x)``, in float32."""
    return torch.nn.functional.silu(_run(feedforward.gate, x)) * _run(feedforward.layers[0], x)


class NeuronDirections:
    """Standardised pre-activations of the most important neurons of an MLP, as fit targets.

    Found by watching ``original`` run: its leaf modules fed the MLP input itself are the
    input projections (``gate_proj``/``up_proj``, ``c_fc``, ``fc1``, a fused ``gate_up_proj``),
    and the last leaf mapping another width back to the hidden size is the output
    projection. Twice as many pre-activations as output-projection inputs means a gated
    MLP. A neuron's importance is its mean square activation times the squared norm of its
    output column. Unrecognised layouts give ``count == 0`` (the caller keeps random weights).
    """

    def __init__(self, original: nn.Module, x: torch.Tensor, count: int):
        self.count = 0
        parameter = next(original.parameters(), None)
        sample = x[:CHUNK].to(parameter.dtype if parameter is not None else x.dtype)
        calls = []
        hooks = [
            module.register_forward_hook(lambda m, args, out: calls.append((m, args[0], out)))
            for module in original.modules()
            if not list(module.children())
        ]
        try:
            original(sample)
        finally:
            for hook in hooks:
                hook.remove()
        hidden = x.shape[-1]
        self.projections = list(dict.fromkeys(m for m, inp, _ in calls if inp is sample))
        downs = [(m, inp) for m, inp, out in calls if inp.shape[-1] != hidden and out.shape[-1] == hidden]
        if not self.projections or not downs:
            return
        down, activations = downs[-1]
        width = activations.shape[-1]
        pre = self._pre(sample)
        if pre.shape[-1] not in (width, 2 * width):
            return
        eye = torch.eye(width, device=x.device, dtype=activations.dtype)
        columns = _run(down, eye) - _run(down, eye[:1] * 0)
        importance = activations.float().pow(2).mean(0) * columns.pow(2).sum(1)
        order = importance.argsort(descending=True).tolist()
        # (a, b, sign): the target is (z_a + sign * z_b) / sqrt(2), or z_a alone when sign is 0
        targets = []
        if pre.shape[-1] == 2 * width:  # gated: the squares of a pair recover the product
            targets = [(j, width + j, sign) for j in order[: count // 2] for sign in (1.0, -1.0)]
        targets += [(j, j, 0.0) for j in order[len(targets) // 2 :]][: count - len(targets)]
        if not targets:
            return
        self.std = pre.std(0).clamp_min(1e-6)
        self.index = [torch.tensor(column, device=x.device) for column in zip(*targets)]
        self.count = len(targets)

    def _pre(self, x):
        return torch.cat([_run(m, x) for m in self.projections], -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a, b, sign = self.index
        z = self._pre(x) / self.std
        return torch.where(sign == 0, z[:, a], (z[:, a] + sign * z[:, b]) / 2**0.5)


def _run(module, x):
    """``module(x)`` in the module's dtype, chunked, returned in float32."""
    parameter = next(module.parameters(), None)
    dtype = parameter.dtype if parameter is not None else x.dtype
    return torch.cat([module(x[s : s + CHUNK].to(dtype)).float() for s in range(0, len(x), CHUNK)])


def outlier_rows(y: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the massive-activation rows of feedforward outputs ``y``: norm above
    ``OUTLIER_FACTOR`` times the median, and no more than a tenth of the rows."""
    if y.dim() != 2 or len(y) == 0:
        raise ValueError(f"outlier_rows needs a non-empty (rows, features) tensor, got shape {tuple(y.shape)}")
    norms = y.norm(dim=1)
    outlier = norms > OUTLIER_FACTOR * norms.median()
    # Outliers are the rare sink tokens; a large share of them means a heavy-tailed target instead.
    return outlier if 0 < int(outlier.sum()) <= 0.1 * len(y) else torch.zeros_like(outlier)


def _features(layer, x):
    """The columns ``layer`` is linear in: its basis features, then its base branch's inputs (if any)."""
    if layer.input_scale is not None:
        t = torch.tanh(x * layer.input_scale.float() + layer.input_shift.float())
    else:
        t = torch.tanh(x)
    params = [p.float() for p in layer.basis_parameters]
    branch = [] if layer.base_weight is None else [torch.nn.functional.silu(x) if layer.base == "silu" else x]
    return torch.cat([*layer.basis.values(t, params), *branch], -1)


def _coefficients(layer) -> torch.Tensor:
    """The matrix that multiplies ``_features(layer, x)``: the basis coefficients, then the base branch's."""
    return layer.weight if layer.base_weight is None else torch.cat([layer.weight, layer.base_weight], 1)


def _set_coefficients(layer, rows, values: torch.Tensor) -> None:
    """Write ``values`` (columns as in ``_coefficients``) into rows ``rows`` of the layer's matrices."""
    basis_columns = layer.weight.shape[1]
    layer.weight[rows] = values[:, :basis_columns].to(layer.weight.dtype)
    if layer.base_weight is not None:
        layer.base_weight[rows] = values[:, basis_columns:].to(layer.base_weight.dtype)


def _inputs_of(layers, k, x):
    for layer in layers[:k]:
        x = _run(layer, x)
    return x


def _set_map(layers, k, scale, shift, units=None):
    """Make layer ``k`` read ``tanh(scale * x + shift)`` on ``units`` (default all inputs).

    A layer without its own affine input map gets it folded into the previous layer's
    outputs; the first layer of a ``"tanh"`` feedforward keeps its plain tanh.
    """
    layer = layers[k]
    units = slice(None) if units is None else units
    if layer.input_scale is not None:
        layer.input_scale[units] = scale.to(layer.input_scale.dtype)
        layer.input_shift[units] = shift.to(layer.input_shift.dtype)
    elif k > 0 and layers[k - 1].bias is not None:
        previous = layers[k - 1]
        previous.weight[units] *= scale.to(previous.weight.dtype)[:, None]
        if previous.base_weight is not None:
            previous.base_weight[units] *= scale.to(previous.base_weight.dtype)[:, None]
        previous.bias[units] = (previous.bias[units] * scale + shift).to(previous.bias.dtype)


def _standardize(layers, k, x, spread):
    """Centre each input channel on its median and scale its spread to ``spread`` (robust to outliers),
    but never let a fit row reach past ``ZCAP``: a plain tanh of these inputs uses a sliver of the basis
    domain, while a scale set by rare huge values would flatten the rest."""
    sample = x[torch.randperm(len(x), device=x.device)[:CHUNK]] if len(x) > CHUNK else x
    q = torch.quantile(sample, torch.tensor([0.1587, 0.5, 0.8413], device=x.device), dim=0)
    center, std = q[1], (q[2] - q[0]) / 2
    std = std.clamp_min(0.1 * float(std.median())).clamp_min(1e-6)
    reach = (x - center).abs().amax(0).clamp_min(1e-6)
    scale = torch.minimum(spread / std, ZCAP / reach)
    _set_map(layers, k, scale, -scale * center)


def _least_squares(layer, x, target, ridge, units=None):
    """Ridge least squares for ``layer``'s coefficients and bias (rows ``units`` only).

    A KAN layer is linear in its coefficients once its input map is fixed. Features are
    centred (the bias takes the mean) and each gets ``ridge`` times its own variance.
    ``target`` is a tensor or a function of the input rows.
    """
    size = _coefficients(layer).shape[1]
    gram = torch.zeros(size, size, dtype=torch.float64, device=x.device)
    cross, feature_sum, target_sum = None, torch.zeros(size, dtype=torch.float64, device=x.device), None
    for s in range(0, len(x), CHUNK):
        features = _features(layer, x[s : s + CHUNK])
        wanted = target(x[s : s + CHUNK]) if callable(target) else target[s : s + CHUNK]
        gram += (features.T @ features).double()
        step = (features.T @ wanted.float()).double()
        cross = step if cross is None else cross + step
        feature_sum += features.double().sum(0)
        target_sum = wanted.double().sum(0) if target_sum is None else target_sum + wanted.double().sum(0)
    n = len(x)
    feature_mean, target_mean = feature_sum / n, target_sum / n
    gram -= n * torch.outer(feature_mean, feature_mean)
    cross -= n * torch.outer(feature_mean, target_mean)
    variance = gram.diagonal().clamp_min(1e-12 * float(gram.diagonal().max()) + 1e-30)
    gram.diagonal().add_(ridge * variance)
    solution = torch.linalg.solve(gram, cross)
    bias = target_mean - feature_mean @ solution
    rows = slice(None) if units is None else units
    _set_coefficients(layer, rows, solution.T)
    if layer.bias is not None:
        layer.bias[rows] = bias.to(layer.bias.dtype)


def _make_step_unit(layers, x, outlier):
    """Turn hidden unit 0 (the output of ``layers[-2]``, input of ``layers[-1]``) into a step:
    -1 on ordinary rows and +1 on outlier rows. Its direction in feature space is the
    Fisher discriminant of the two groups (base branch inputs included); the step sits midway across the gap
    between them."""
    features = _features(layers[-2], x)
    normal_mean, outlier_mean = features[~outlier].mean(0), features[outlier].mean(0)
    centred = features[~outlier] - normal_mean
    scatter = (centred.T @ centred).double() / len(centred)
    scatter.diagonal().add_(1e-2 * float(scatter.diagonal().mean()) + 1e-12)
    direction = torch.linalg.solve(scatter, (outlier_mean - normal_mean).double()).float()
    _set_coefficients(layers[-2], slice(0, 1), direction[None])
    if layers[-2].bias is not None:
        layers[-2].bias[0] = 0.0
    h = features @ direction
    low, high = h[~outlier].max(), h[outlier].min()
    if high <= low:  # not separable: step between the group means instead
        low, high = h[~outlier].mean(), h[outlier].mean()
    half = ((high - low) / 2).clamp_min(1e-12)
    scale = (STEP_SHARPNESS / half).reshape(1)
    _set_map(layers, len(layers) - 1, scale, -scale * (low + high) / 2, units=slice(0, 1))


def _match_outliers(layer, x, y, outlier):
    """Move the outlier rows' mean residual onto the step unit's most separating feature."""
    features = _features(layer, x)
    residual = y - (features @ _coefficients(layer).float().T + (layer.bias.float() if layer.bias is not None else 0.0))
    width = layer.in_features
    columns = torch.arange(0, layer.weight.shape[1], width, device=x.device)  # unit 0's basis features
    gaps = features[outlier][:, columns].mean(0) - features[~outlier][:, columns].mean(0)
    best = int(gaps.abs().argmax())
    column, gap = int(columns[best]), gaps[best]
    if gap.abs() < 1e-6:
        return
    delta = (residual[outlier].mean(0) - residual[~outlier].mean(0)) / gap
    layer.weight[:, column] += delta.to(layer.weight.dtype)
    if layer.bias is not None:
        layer.bias -= (delta * features[~outlier][:, column].mean()).to(layer.bias.dtype)
