"""The ``form="glu"`` retrofit: an MLP keeps its projections and gains learnable univariate functions.

For a gated MLP (SwiGLU, GeGLU) ``down(act(g) * u)`` becomes ``down((act(g) + phi_g(g)) * (u + phi_u(u)))``,
for a plain one ``down(act(z))`` becomes ``down(act(z) + phi(z))``. Each ``phi`` is a sum of basis functions
(``kallm.list_bases()``) of a bounded map of its input, ``phi(z) = sum_k c_k B_k(tanh(a * z))``, one function per
channel or per group of channels, with every coefficient ``c_k`` zero at the start: a retrofitted model then
computes exactly what the original did, and training can only move it from there.

The functions add to the activation's output rather than bend its input (``act(g + phi(g))``): a correction
``phi`` keeps its gradient where the activation is flat (SiLU and GELU for very negative inputs, ReLU below zero),
and ``act(z) + phi(z)`` is the KAN paper's residual activation with the model's own activation as its base.

Part of kallm's portable core: plain torch, sibling imports only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .bases import Basis, make_basis
from .layers import check_size, is_kan_feedforward

#: the initial input map ``t = tanh(z / INITIAL_INPUT_RANGE)``: SmolLM2-135M's gate and up values have a per-channel
#: 99th percentile of |z| between 1.1 and 3 in most channels (docs/retrofitting.md), which this maps to
#: |t| of 0.5 to 0.9, inside the basis' domain [-1, 1] with room to spare; outliers (|z| up to ~80) saturate
#: towards +-1, where the bounded basis keeps their correction bounded. The scale ``a`` is learnable.
INITIAL_INPUT_RANGE = 2.0
#: the roles an MLP layout (``RetrofitConfig.mlp_layout``) may name: projections, the activation, a dropout
LAYOUT_ROLES = ("gate", "up", "gate_up", "down", "activation", "dropout")


class ChannelFunctions(nn.Module):
    """``phi(z)``: one learnable univariate function per channel of ``z``, or per group of channels.

    ``phi(z_c) = bias[g] + sum_k coefficients[k, g] * B_k(tanh(input_scale[g] * z_c))`` for channel ``c`` in group
    ``g = c % groups`` (channels ``g, g + groups, g + 2 * groups, ...`` share a function; the order of an MLP's
    channels carries no meaning). ``groups=None`` gives every channel its own function.

    Parameters: ``groups * (K + 2)`` (``K = basis.num_features`` coefficients, a bias, the basis' constant term, and
    an input scale per function), plus the basis' own (``rational``: ``denominator_degree * groups``). Coefficients
    and biases start at zero, so ``phi`` is exactly zero until they train (``check_zero_start`` refuses bases that
    would break this); the bias lets ``kallm.convert`` change bases exactly, as in ``KANLinear``.
    """

    def __init__(self, channels: int, basis: str = "cheby2", degree: int = 2, groups: int | None = None,
                 device=None, dtype=None, **basis_options):
        super().__init__()
        self.channels = check_size("channels", channels)
        self.groups = channels if groups is None else check_size("function_groups", groups)
        if channels % self.groups:
            raise ValueError(f"function_groups={groups} must divide the MLP's {channels} channels")
        self.basis: Basis = function_basis(basis, degree, **basis_options)
        factory = {"device": device, "dtype": dtype}
        self.coefficients = nn.Parameter(torch.empty(self.basis.num_features, self.groups, **factory))
        self.bias = nn.Parameter(torch.empty(self.groups, **factory))
        self.input_scale = nn.Parameter(torch.empty(self.groups, **factory))
        self.basis_parameters = nn.ParameterList(
            [nn.Parameter(torch.empty(shape, **factory)) for shape in self.basis.parameter_shapes(self.groups)]
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # torch.nn.init at call time, so that transformers' loading guard keeps weights it has just loaded.
        nn.init.zeros_(self.coefficients)
        nn.init.zeros_(self.bias)
        nn.init.constant_(self.input_scale, 1.0 / INITIAL_INPUT_RANGE)
        for param, initial in zip(self.basis_parameters, self.basis.initial_parameters(self.groups)):
            if param.device.type != "meta":
                param.copy_(initial)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # (..., channels) -> (..., channels / groups, groups): the last axis is the group, which the per-group
        # tensors (input_scale, coefficients, the basis' own parameters) broadcast along.
        grouped = z.reshape(*z.shape[:-1], self.channels // self.groups, self.groups)
        t = torch.tanh(grouped * self.input_scale)
        features = self.basis.values(t, list(self.basis_parameters))
        phi = self.bias + features[0] * self.coefficients[0]
        for feature, coefficient in zip(features[1:], self.coefficients[1:]):
            phi = phi + feature * coefficient
        return phi.reshape(z.shape)

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.basis.describe().items() if k != "members")
        return f"channels={self.channels}, groups={self.groups}, {options}"

    @staticmethod
    def count_parameters(channels: int, basis: str = "cheby2", degree: int = 2, groups: int | None = None,
                         **basis_options) -> int:
        """Parameters of a ``ChannelFunctions`` with these arguments, without building it."""
        built = function_basis(basis, degree, **basis_options)
        functions = channels if groups is None else groups
        return functions * (built.num_features + 2) + sum(
            math.prod(shape) for shape in built.parameter_shapes(functions)
        )


class FunctionActivation(nn.Module):
    """``activation(z) + phi(z)``: a model's own activation module plus ``ChannelFunctions``."""

    def __init__(self, activation: nn.Module, channels: int, basis: str = "cheby2", degree: int = 2,
                 groups: int | None = None, device=None, dtype=None, **basis_options):
        super().__init__()
        self.activation = activation
        self.function = ChannelFunctions(channels, basis, degree, groups, device=device, dtype=dtype, **basis_options)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.activation(z) + self.function(z)


class FunctionFeedForward(nn.Module):
    """An MLP rebuilt around its own projections, with ``ChannelFunctions`` on its activation (and up channel).

    ``mlp`` is the model's MLP module and ``layout`` names its parts by role (``LAYOUT_ROLES``): ``gate``, ``up``
    and ``down`` projections, or a fused ``gate_up`` (Phi-3: gate first, then up) and ``down``, or ``up`` and
    ``down`` alone for an ungated MLP; its ``activation``; an optional ``dropout`` after ``down`` (GPT-2). The
    parts keep their attribute names, so the projections' parameter names (``mlp.gate_proj.weight``) and LoRA
    targets are the original model's; the activation becomes a ``FunctionActivation`` under its own name and a
    gated MLP's up channel gets ``up_function``.
    """

    def __init__(self, mlp: nn.Module, layout: dict, channels: int, basis: str = "cheby2", degree: int = 2,
                 groups: int | None = None, device=None, dtype=None, **basis_options):
        super().__init__()
        check_layout(layout)
        self.layout = dict(layout)
        arguments = dict(channels=channels, basis=basis, degree=degree, groups=groups, device=device, dtype=dtype,
                         **basis_options)
        for role, name in layout.items():
            part = getattr(mlp, name)
            setattr(self, name, FunctionActivation(part, **arguments) if role == "activation" else part)
        self.gated = "gate" in layout or "gate_up" in layout
        self.up_function = ChannelFunctions(**arguments) if self.gated else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if "gate_up" in self.layout:
            gate, up = self._part("gate_up")(hidden_states).chunk(2, dim=-1)
        elif self.gated:
            gate, up = self._part("gate")(hidden_states), self._part("up")(hidden_states)
        else:
            gate, up = self._part("up")(hidden_states), None
        activation = self._part("activation")
        inner = activation(gate) if up is None else activation(gate) * (up + self.up_function(up))
        output = self._part("down")(inner)
        return self._part("dropout")(output) if "dropout" in self.layout else output

    def _part(self, role: str) -> nn.Module:
        return getattr(self, self.layout[role])


def build_function_form(module: nn.Module, layout: dict, channels: int, basis: str = "cheby2", degree: int = 2,
                        groups: int | None = None, device=None, dtype=None, **basis_options) -> nn.Module:
    """What ``form="glu"`` puts in place of ``module``: a ``FunctionFeedForward`` around an MLP of ``layout``, or, for an
    empty layout (an MLP spread over its block's attributes, as in OPT), a ``FunctionActivation`` around the
    activation ``module`` itself."""
    arguments = dict(channels=channels, basis=basis, degree=degree, groups=groups, device=device, dtype=dtype,
                     **basis_options)
    return FunctionFeedForward(module, layout, **arguments) if layout else FunctionActivation(module, **arguments)


def function_basis(basis: str, degree: int, **basis_options) -> Basis:
    """The basis of a ``ChannelFunctions``: any basis or parallel spec (``"cheby2+rbf"``), but no chain of stages."""
    if isinstance(basis, str) and ">" in basis:
        raise ValueError(f"basis {basis!r} chains stages with '>', which only form='kan' has: form='glu' learns one "
                         f"function per channel; use a single basis or a parallel one ('cheby2+rbf')")
    return make_basis(basis, degree, **basis_options)


def check_layout(layout) -> None:
    """Refuse an MLP layout that is not ``role -> attribute name`` for a gated, fused or plain MLP."""
    if not isinstance(layout, dict) or not all(isinstance(name, str) and name for name in layout.values()):
        raise ValueError(f"mlp_layout must map roles to attribute names, got {layout!r}")
    unknown = sorted(set(layout) - set(LAYOUT_ROLES))
    if unknown:
        raise ValueError(f"mlp_layout has unknown roles {unknown}; valid roles: {', '.join(LAYOUT_ROLES)}")
    shapes = ({"gate", "up", "down", "activation"}, {"gate_up", "down", "activation"}, {"up", "down", "activation"})
    if set(layout) - {"dropout"} not in shapes:
        raise ValueError(f"mlp_layout {layout!r} describes no MLP: it needs gate, up, down and activation; or "
                         f"gate_up, down and activation; or up, down and activation")


def check_zero_start(basis: str, degree: int, dtype: torch.dtype, **basis_options) -> None:
    """Refuse a basis whose functions are not exactly zero at zero coefficients in ``dtype``: a feature that
    overflows to infinity there (a high degree in float16) turns ``0 * feature`` into NaN."""
    built = function_basis(basis, degree, **basis_options)
    with torch.device("cpu"):
        t = torch.linspace(-1.0, 1.0, 2001).to(dtype).unsqueeze(-1)
        params = [p.to(dtype) for p in built.initial_parameters(1)]
        overflowing = [k + 1 for k, value in enumerate(built.values(t, params)) if not torch.isfinite(value).all()]
    if overflowing:
        raise ValueError(f"basis {basis!r} at degree {degree} overflows in {dtype} (features {overflowing} are not "
                         f"finite on [-1, 1]), so its functions would not start at exactly zero; lower the degree or "
                         f"retrofit the model in float32 or bfloat16")


def is_function_form(module: nn.Module) -> bool:
    """Whether ``module`` is what ``form="glu"`` put in place of an MLP (or of its activation), kallm's class or a
    checkpoint's copy of it (see ``layers.is_kan_feedforward``)."""
    return any(cls.__name__ in ("FunctionFeedForward", "FunctionActivation")
               and cls.__module__.rpartition(".")[2] == "function_layers" for cls in type(module).__mro__)


def is_retrofitted_feedforward(module: nn.Module) -> bool:
    """Whether ``module`` is a feedforward kallm's retrofit installed, of either form."""
    return is_kan_feedforward(module) or is_function_form(module)


def is_channel_functions(module: nn.Module) -> bool:
    """Whether ``module`` is a ``ChannelFunctions``, kallm's or a checkpoint's copy."""
    return any(cls.__name__ == "ChannelFunctions" and cls.__module__.rpartition(".")[2] == "function_layers"
               for cls in type(module).__mro__)

