"""KAN layers: ``KANLinear`` and the MLP replacement ``KANFeedForward``.

Part of kallm's portable core: plain torch, sibling imports only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .bases import Basis, accepted_options, make_basis, route_options, standard_normal_quantiles
from .kan_function import BASE_BRANCHES, base_branch, kan_linear

INPUT_MAPS = ("affine", "tanh")
#: KANLinear arguments a KANFeedForward passes to every layer; the rest are basis options.
LAYER_OPTIONS = ("input_map", "bias", "base", "device", "dtype")
#: ``E[g(z)^2]``, ``z ~ N(0, 1)``, of each base branch's function ``g``: its share of the variance-preserving init
_BRANCH_MEAN_SQUARE = {
    "silu": float(torch.nn.functional.silu(standard_normal_quantiles()).pow(2).mean()),
    "linear": 1.0,
}


class KANLinear(nn.Module):
    """``y_o = b_o + sum_i sum_k w_oik * phi_k(t_i)``, a learnable univariate function per edge
    (plus ``sum_i v_oi * g(x_i)`` with a base branch).

    Args:
        in_features, out_features: sizes, like ``nn.Linear``.
        basis: a name from ``kallm.list_bases()`` or a parallel spec such as ``"cheby2+rbf"``.
        degree: polynomial degree (for ``bspline`` the spline order, for ``rbf`` the number
            of centres, for ``rational`` the numerator degree).
        input_map: how inputs reach the bounded domain of the basis, per token so that no
            output depends on other tokens: ``"affine"`` is ``t = tanh(scale * x + shift)``
            with a learnable scale and shift per input channel (initialised to 1 and 0, and
            set from data by function-preserving init); ``"tanh"`` is ``t = tanh(x)``.
        bias: whether the layer has a bias.
        base: None (the default: no branch, the research's form), or a base branch beside the basis
            functions, as in pykan and efficient-kan: ``"silu"`` adds ``base_weight @ silu(x)``, ``"linear"``
            adds ``base_weight @ x`` (``base_weight``: ``(out, in)``, on the raw input, not the mapped ``t``).
        **basis_options: options of the basis (``alpha``, ``beta``, ``grid_size``, ...).

    Parameters: ``out * in * K`` coefficients (``K = basis.num_features``; ``degree`` for
    the polynomial bases), ``out`` biases (the folded constant basis function), ``2 * in``
    for the affine input map, plus the basis' own (``rational``: ``m * in``), plus ``out * in`` for a base
    branch.

    Initialisation (variance preserving): coefficients ``~ N(0, 1 / (in * S))`` with
    ``S = sum_k E[phi_k(tanh z)^2]``, ``z ~ N(0, 1)``, and zero bias, so a unit-variance
    input gives an output of variance close to one. With a base branch the two parts share that
    variance equally (efficient-kan's ``scale_base`` and ``scale_spline`` in one rule): coefficients
    ``~ N(0, 1 / (2 * in * S))`` and ``base_weight ~ N(0, 1 / (2 * in * E[g(z)^2]))``, with ``E[silu(z)^2]``
    about 0.354 and ``E[z^2] = 1``; the basis coefficients are drawn first, so a seed gives them the same
    directions with or without the branch.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        basis: str = "cheby2",
        degree: int = 2,
        input_map: str = "affine",
        bias: bool = True,
        base: str | None = None,
        device=None,
        dtype=None,
        **basis_options,
    ):
        super().__init__()
        _check_layer_arguments(in_features, out_features, input_map, bias, base)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"KANLinear needs a floating point torch.dtype (torch.float32, ...), got {dtype!r}")
        self.in_features, self.out_features = in_features, out_features
        self.input_map, self.base = input_map, base
        self.basis: Basis = make_basis(basis, degree, **basis_options)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, self.basis.num_features * in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features, **factory)) if base is not None else None
        if input_map == "affine":
            self.input_scale = nn.Parameter(torch.empty(in_features, **factory))
            self.input_shift = nn.Parameter(torch.empty(in_features, **factory))
        else:
            self.input_scale = self.input_shift = None
        self.basis_parameters = nn.ParameterList(
            [nn.Parameter(torch.empty(shape, **factory)) for shape in self.basis.parameter_shapes(in_features)]
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # torch.nn.init is looked up at call time so that transformers' loading guard,
        # which patches it, never re-initialises weights it has just loaded.
        parts = 1 if self.base is None else 2  # a base branch takes half the output variance
        std = 1.0 / math.sqrt(self.in_features * self.basis.mean_square() * parts)
        nn.init.normal_(self.weight, mean=0.0, std=std)
        if self.base is not None:
            branch_std = 1.0 / math.sqrt(self.in_features * _BRANCH_MEAN_SQUARE[self.base] * parts)
            nn.init.normal_(self.base_weight, mean=0.0, std=branch_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.input_scale is not None:
            nn.init.ones_(self.input_scale)
            nn.init.zeros_(self.input_shift)
        for param, initial in zip(self.basis_parameters, self.basis.initial_parameters(self.in_features)):
            if not getattr(param, "_is_hf_initialized", False) and param.device.type != "meta":
                param.copy_(initial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"KANLinear expects inputs whose last dimension is in_features={self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"KANLinear needs a floating point input, got {x.dtype}")
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"KANLinear got input of dtype {x.dtype} but its weights are {self.weight.dtype}; "
                f"cast one to the other (module.to(dtype)) or run under torch.autocast"
            )
        leading = x.shape[:-1]
        y = kan_linear(
            x.reshape(-1, self.in_features),
            self.weight,
            self.bias,
            self.input_scale,
            self.input_shift,
            self.basis,
            list(self.basis_parameters),
        )
        if self.base_weight is not None:
            y = y + base_branch(x.reshape(-1, self.in_features), self.base_weight, self.base)
        return y.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.basis.describe().items() if k not in ("members",))
        branch = "" if self.base is None else f", base={self.base}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {options}, "
                f"input_map={self.input_map}{branch}")

    @staticmethod
    def count_parameters(
        in_features, out_features, basis="cheby2", degree=2, input_map="affine", bias=True, base=None, device=None,
        dtype=None, **options,
    ):
        """Parameter count of a ``KANLinear`` with these arguments, without building it
        (``device`` and ``dtype`` are accepted, and ignored, so that the same arguments work)."""
        _check_layer_arguments(in_features, out_features, input_map, bias, base)
        built = make_basis(basis, degree, **options)
        count = out_features * in_features * built.num_features + (out_features if bias else 0)
        count += out_features * in_features if base is not None else 0
        count += 2 * in_features if input_map == "affine" else 0
        count += sum(math.prod(shape) for shape in built.parameter_shapes(in_features))
        return count


class KANFeedForward(nn.Module):
    """Drop-in replacement for a transformer MLP: ``hidden -> intermediate -> hidden``.

    ``basis`` names one basis for both layers, or chains stages with ``>``:
    ``"cheby2>legendre"`` maps hidden -> intermediate with Chebyshev-2 features and back
    with Legendre ones; ``"a>b>c"`` adds an intermediate -> intermediate stage. Each stage
    may itself be a parallel spec (``"cheby2+rbf"``). No activation sits between stages:
    every KAN layer is non-linear on its own. Works on any leading shape.

    ``gated=True`` (``form="gated"`` of a retrofit) adds a third KAN layer beside the first, ``gate``
    (hidden -> intermediate, the first stage's basis), and multiplies: ``silu(gate(x)) * layers[0](x)`` feeds
    the next stage, the product that a SwiGLU MLP computes and a sum of univariate functions cannot. With
    ``base="linear"`` it holds a SwiGLU MLP of ``intermediate`` channels exactly (basis coefficients zero), which
    is how fit init starts it (docs/kan-learning.md).

    ``options`` are ``KANLinear`` arguments: ``input_map``, ``bias``, ``base``, ``device`` and
    ``dtype`` reach every layer; basis options reach the stages whose basis takes them
    (``grid_size`` in ``"bspline>cheby2"``) and must be taken by at least one.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, basis: str = "cheby2", degree: int = 2,
                 gated: bool = False, **options):
        super().__init__()
        check_size("hidden_size", hidden_size)
        check_size("intermediate_size", intermediate_size)
        _check_gated(gated)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        plan = _plan(hidden_size, intermediate_size, basis, options)
        self.layers = nn.ModuleList(
            KANLinear(n_in, n_out, stage, degree, **stage_options) for stage, (n_in, n_out), stage_options in plan
        )
        first_stage, sizes, first_options = plan[0]
        self.gate = KANLinear(*sizes, first_stage, degree, **first_options) if gated else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        first, *rest = self.layers
        out = first(hidden_states)
        if self.gate is not None:
            out = nn.functional.silu(self.gate(hidden_states)) * out
        for layer in rest:
            out = layer(out)
        return out

    @staticmethod
    def count_parameters(hidden_size, intermediate_size, basis="cheby2", degree=2, gated=False, **options):
        _check_gated(gated)
        plan = _plan(hidden_size, intermediate_size, basis, options)
        stages = plan + plan[:1] if gated else plan
        return sum(
            KANLinear.count_parameters(n_in, n_out, stage, degree, **stage_options)
            for stage, (n_in, n_out), stage_options in stages
        )


def intermediate_size_for_budget(hidden_size: int, budget: int, basis: str = "cheby2", degree: int = 2,
                                 **options) -> int:
    """Largest intermediate size whose ``KANFeedForward`` has at most ``budget`` parameters.

    The count grows with the intermediate size (quadratically once a spec has three stages),
    so the answer is found by bisection on ``KANFeedForward.count_parameters``.
    """
    check_size("hidden_size", hidden_size)
    if not is_int(budget):
        raise TypeError(f"budget must be an integer number of parameters, got {budget!r}")

    def fits(size):
        return KANFeedForward.count_parameters(hidden_size, size, basis, degree, **options) <= budget

    if not fits(1):
        smallest = KANFeedForward.count_parameters(hidden_size, 1, basis, degree, **options)
        raise ValueError(
            f"a parameter budget of {budget} is too small: the smallest KANFeedForward "
            f"(intermediate_size=1) with basis {basis!r}, degree {degree} has {smallest}"
        )
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low) and not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``module`` (of those that train, with ``trainable_only``); ``Module.parameters`` yields a
    tied tensor once, so tied embeddings count once."""
    return sum(param.numel() for param in module.parameters() if param.requires_grad or not trainable_only)


def _plan(hidden_size, intermediate_size, basis, options):
    """``(stage spec, (in, out), KANLinear options)`` for each layer of a ``KANFeedForward``.

    Layer options go to every layer. With stages of different bases, a basis option goes
    to the stages that take it (``grid_size`` in ``"bspline>cheby2"``) and must be taken by
    at least one; with one basis throughout, that basis checks the options itself.
    """
    if not isinstance(basis, str):
        raise TypeError(f"basis must be a string, got {type(basis).__name__}")
    stages = basis.split(">")
    if any(not s for s in stages):
        raise ValueError(f"malformed basis spec {basis!r}: empty stage around '>'")
    if len(stages) == 1:
        stages = stages * 2
    sizes = [hidden_size] + [intermediate_size] * (len(stages) - 1) + [hidden_size]
    per_stage = [options] * len(stages)
    if len(set(stages)) > 1:
        per_stage = route_options(f"stage of {basis!r}", [accepted_options(stage) for stage in stages], options,
                                  shared=LAYER_OPTIONS)
    return list(zip(stages, zip(sizes[:-1], sizes[1:]), per_stage))


def is_int(value) -> bool:
    """An integer and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_size(name: str, value) -> int:
    """``value``, refused unless it is a positive integer (a size or a count named ``name`` in the error)."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_base(base, owner: str = "base") -> None:
    """Refuse a base branch name other than None, ``"silu"`` or ``"linear"``."""
    if base is not None and (not isinstance(base, str) or base not in BASE_BRANCHES):
        raise ValueError(f"unknown {owner} {base!r}; valid choices: None (no base branch), "
                         f"{', '.join(repr(name) for name in BASE_BRANCHES)}")


def _check_gated(gated):
    if not isinstance(gated, bool):
        raise ValueError(f"gated must be True or False, got {gated!r}")


def _check_layer_arguments(in_features, out_features, input_map, bias, base):
    check_size("in_features", in_features)
    check_size("out_features", out_features)
    if not isinstance(input_map, str) or input_map not in INPUT_MAPS:
        raise ValueError(f"unknown input_map {input_map!r}; valid choices: {', '.join(INPUT_MAPS)}")
    if not isinstance(bias, bool):
        raise ValueError(f"bias must be True or False, got {bias!r}")
    check_base(base)


def is_kan_feedforward(module: nn.Module) -> bool:
    """Whether ``module`` is a KAN feedforward: this class, or the copy of it that a checkpoint's
    code defines when the model was loaded with ``trust_remote_code=True`` before kallm was
    imported (same name and file, another class object)."""
    return _is_kallm_class(module, KANFeedForward)


def is_kan_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a ``KANLinear``, kallm's or a checkpoint's copy (see ``is_kan_feedforward``)."""
    return _is_kallm_class(module, KANLinear)


def _is_kallm_class(module, kallm_class):
    return any(
        cls.__name__ == kallm_class.__name__ and cls.__module__.rpartition(".")[2] == "layers"
        for cls in type(module).__mro__
    )
