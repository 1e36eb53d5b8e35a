"""Basis families for KAN layers.

A basis turns one bounded input ``t`` (in [-1, 1], see ``layers.py``) into ``K`` feature
values ``phi_1(t) .. phi_K(t)``. A KAN layer learns one coefficient per (input, output,
feature), so each edge function is ``f_io(t) = sum_k w_iok * phi_k(t)``.

A basis answers three questions, the first required, the others optional speed-ups:

- ``values(t, params)``: the ``K`` features as a list of tensors shaped like ``t``, built
  by plain differentiable torch ops. The textbook formulation and the fused op's autograd
  fallback use it.
- ``write_values(t, params, out)``: the same values written into ``out``, ``K`` views of
  the fused op's feature buffer, so that no list is concatenated (by default: ``values``
  copied in).
- ``input_gradient(t, values, grads)``: ``dL/dt = sum_k dL/dphi_k * phi_k'(t)``, which
  lets the fused op's backward skip autograd. Bases that set ``has_derivatives`` provide
  it, usually by giving ``derivatives(t, values)`` (the ``phi_k'``).

A constant feature (``P_0 = 1`` and its kin) is never returned: it would cost
``in * out`` coefficients to express what one bias per output already does.

This file is part of kallm's portable core: plain torch, sibling imports only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

#: the largest ``degree`` (and ``grid_size``, ``denominator_degree``) a basis accepts unless it sets a lower
#: ``max_degree``: beyond it the feature buffer, the init quadrature and the range check below cost more than
#: any use has shown to be worth.
MAX_DEGREE = 100
#: the largest ``|phi_k(t)|`` on [-1, 1] a basis may reach: float32 (max 3.4e38) then keeps a margin of 1e14 for
#: the sums over tokens and the derivatives of the backward pass, so a fresh layer stays finite.
FEATURE_LIMIT = 1e24
#: the smallest mean square ``S`` a basis may have: below it the features are numerically zero and the
#: variance-preserving init (std ``1 / sqrt(in * S)``) would overflow.
MIN_MEAN_SQUARE = 1e-24


def check_integer(owner: str, name: str, value, minimum: int = 1, maximum: int | None = MAX_DEGREE) -> int:
    """``value`` as an int, or a ``ValueError`` naming ``owner``, the option, its range and the value.

    A bool is refused although Python counts it as an int: ``degree=True`` is a mistake, not 1.
    """
    in_range = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    in_range = in_range and (maximum is None or value <= maximum)
    if not in_range:
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}{upper}, got {value!r}")
    return int(value)


def check_real(owner: str, name: str, value, valid: str, accepts: Callable[[float], bool]) -> float:
    """``value`` as a float if it is a finite real number that ``accepts``; else a ``ValueError`` saying ``valid``."""
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and accepts(float(value))):
        raise ValueError(f"{owner}: {name} must be {valid} (a finite number), got {value!r}")
    return float(value)


class Basis:
    """A family of univariate feature functions; subclass it to add your own.

    Subclasses set ``name`` (and ``option_names`` when their constructor takes options
    besides ``degree``) and implement ``values``. Setting ``has_derivatives`` and
    implementing ``derivatives`` (or ``input_gradient``) lets the fused op differentiate
    without autograd; bases without it (or with learnable parameters) are differentiated by
    a local autograd recompute in the op's backward, which is slower but still saves only
    the layer input.
    """

    name: str = ""
    #: options the constructor accepts besides ``degree``; used to reject unknown ones.
    option_names: tuple[str, ...] = ()
    has_derivatives = False
    #: the largest degree the family accepts
    max_degree: int = MAX_DEGREE

    def __init__(self, degree: int):
        self.degree = check_integer(f"basis {self.name!r}", "degree", degree, maximum=self.max_degree)

    @property
    def num_features(self) -> int:
        """Features per input (``K``)."""
        return self.degree

    def parameter_shapes(self, in_features: int) -> list[tuple[int, ...]]:
        """Shapes of the basis' own learnable tensors (most bases have none)."""
        return []

    def initial_parameters(self, in_features: int) -> list[torch.Tensor]:
        return [torch.zeros(shape) for shape in self.parameter_shapes(in_features)]

    def values(self, t: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ``num_features`` features of ``t``, each shaped like ``t``."""
        raise NotImplementedError(f"basis {self.name!r} must implement values(t, params)")

    def write_values(self, t: torch.Tensor, params: list[torch.Tensor], out: list[torch.Tensor]) -> None:
        """Write the features into ``out`` (one view per feature, shaped like ``t``)."""
        values = self.values(t, params)
        if len(values) != len(out):
            raise ValueError(
                f"basis {self.name!r} returned {len(values)} features but its num_features is {len(out)}"
            )
        for slot, value in zip(out, values):
            slot.copy_(value)

    def derivatives(self, t: torch.Tensor, values: list[torch.Tensor]) -> list[torch.Tensor | float]:
        """``d phi_k / dt`` given the ``values``; a number where it is constant."""
        raise NotImplementedError(f"basis {self.name!r} has no closed-form derivatives")

    def input_gradient(self, t: torch.Tensor, values: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
        """``sum_k grads[k] * phi_k'(t)``, the gradient reaching ``t``; may overwrite ``grads``."""
        grad_t = None
        for grad, derivative in zip(grads, self.derivatives(t, values)):
            if grad_t is None:
                grad_t = grad * derivative
            elif isinstance(derivative, torch.Tensor):
                grad_t.addcmul_(grad, derivative)
            else:
                grad_t.add_(grad, alpha=derivative)
        return grad_t

    def describe(self) -> dict:
        """The constructor arguments, for configs and model cards."""
        return {"basis": self.name, "degree": self.degree}

    def mean_square(self) -> float:
        """``sum_k E[phi_k(tanh z)^2]`` for ``z ~ N(0, 1)``: drives the variance-preserving init."""
        # On CPU even inside a meta-device context (transformers builds models under one in
        # from_pretrained), since the result must be a real number.
        with torch.device("cpu"):
            t = torch.tanh(standard_normal_quantiles()).unsqueeze(-1)
            params = [p.to(torch.float64) for p in self.initial_parameters(1)]
            return float(sum(v.pow(2).mean() for v in self.values(t, params)))


def standard_normal_quantiles() -> torch.Tensor:
    """4001 evenly spaced quantiles of ``N(0, 1)`` (float64, on CPU): the mean of ``f`` over them is ``E[f(z)]``
    to the precision the variance-preserving inits need."""
    with torch.device("cpu"):
        return math.sqrt(2.0) * torch.erfinv(torch.linspace(-1.0, 1.0, 4003, dtype=torch.float64)[1:-1])


# --------------------------------------------------------------------------- polynomials


class RecurrenceBasis(Basis):
    """Polynomials ``P_1 .. P_degree`` from a three-term recurrence.

    ``P_0 = p0`` (a constant, folded into the layer bias), ``P_1 = a0 * t + b0`` and
    ``P_{n+1} = (a_n t + b_n) P_n - c_n P_{n-1}``; subclasses give ``first`` and ``step``.
    No trigonometric function is involved, so nothing has an infinite derivative at the
    ends of the domain (``cos(n acos t)`` does).

    The backward pass runs the recurrence in reverse (its adjoint): with ``g_n = dL/dP_n``,
    step ``n`` (from the top degree down) adds ``(a_n t + b_n) g_{n+1}`` to ``g_n``,
    ``-c_n g_{n+1}`` to ``g_{n-1}`` and ``a_n P_n g_{n+1}`` to ``dL/dt``, and finally
    ``dL/dt += a0 g_1``. That is the chain rule through
    ``P'_{n+1} = a_n P_n + (a_n t + b_n) P'_n - c_n P'_{n-1}`` (``P'_1 = a0``, ``P'_0 = 0``)
    without forming any ``P'_n``.
    """

    has_derivatives = True

    def first(self) -> tuple[float, float, float]:
        """``(p0, a0, b0)``: ``P_0 = p0`` and ``P_1 = a0 * t + b0``."""
        raise NotImplementedError

    def step(self, n: int) -> tuple[float, float, float]:
        """``(a_n, b_n, c_n)`` producing ``P_{n+1}`` from ``P_n`` and ``P_{n-1}``."""
        raise NotImplementedError

    def values(self, t, params):
        p0, a0, b0 = self.first()
        lower, current = p0, a0 * t + b0
        values = [current]
        for n in range(1, self.degree):
            a, b, c = self.step(n)
            lower, current = current, (a * t + b) * current - c * lower
            values.append(current)
        return values

    def write_values(self, t, params, out):
        # The same recurrence as ``values``, written in place into the op's buffer.
        p0, a0, b0 = self.first()
        torch.mul(t, a0, out=out[0])
        if b0:
            out[0].add_(b0)
        for n in range(1, self.degree):
            a, b, c = self.step(n)
            current, slot = out[n - 1], out[n]
            if n == 1:  # P_0 is the constant p0
                torch.addcmul(t.new_full((), -c * p0), t, current, value=a, out=slot)
            else:
                torch.mul(out[n - 2], -c, out=slot).addcmul_(t, current, value=a)
            if b:
                slot.add_(current, alpha=b)

    def input_gradient(self, t, values, grads):
        # Shapes: t, every values[k] = P_{k+1} and every grads[k] = g_{k+1} = dL/dP_{k+1} are (N, I), the
        # fused op's rows by inputs; all updates are elementwise and in place, so nothing else is allocated.
        # Accumulates dL/dt / a0 in grads[0] alongside g_1, then scales once: no extra buffer.
        _, a0, b0 = self.first()
        for n in range(self.degree - 1, 1, -1):
            a, b, c = self.step(n)
            upper = grads[n]  # g_{n+1}: (N, I), final once every higher step has run
            grads[n - 1].addcmul_(t, upper, value=a)  # g_n += a_n t g_{n+1}
            if b:
                grads[n - 1].add_(upper, alpha=b)  # g_n += b_n g_{n+1}
            grads[n - 2].add_(upper, alpha=-c)  # g_{n-1} -= c_n g_{n+1}
            grads[0].addcmul_(values[n - 1], upper, value=a / a0)  # dL/dt / a0 += a_n P_n g_{n+1} / a0
        if self.degree >= 2:
            # Step 1 adds (a t + b) g_2 to g_1 and a P_1 g_2 / a0 to dL/dt / a0; as P_1 = a0 t + b0
            # both are linear in t and merge into one pass.
            a, b, _ = self.step(1)
            grads[0].addcmul_(t, grads[1], value=2 * a)
            if b + a * b0 / a0:
                grads[0].add_(grads[1], alpha=b + a * b0 / a0)
        return grads[0].mul_(a0)  # a0 g_1 plus the a_n P_n g_{n+1} terms = dL/dt: (N, I), as P'_1 = a0


class Chebyshev1(RecurrenceBasis):
    """Chebyshev, first kind: ``T_1 = t``, ``T_{n+1} = 2t T_n - T_{n-1}``."""

    name = "cheby1"

    def first(self):
        return 1.0, 1.0, 0.0

    def step(self, n):
        return 2.0, 0.0, 1.0


class Chebyshev2(RecurrenceBasis):
    """Chebyshev, second kind: ``U_1 = 2t``, ``U_{n+1} = 2t U_n - U_{n-1}``."""

    name = "cheby2"

    def first(self):
        return 1.0, 2.0, 0.0

    def step(self, n):
        return 2.0, 0.0, 1.0


class Legendre(RecurrenceBasis):
    """Legendre: ``P_1 = t``, ``(n+1) P_{n+1} = (2n+1) t P_n - n P_{n-1}``."""

    name = "legendre"

    def first(self):
        return 1.0, 1.0, 0.0

    def step(self, n):
        return (2 * n + 1) / (n + 1), 0.0, n / (n + 1)


class Gegenbauer(RecurrenceBasis):
    """Gegenbauer ``C^(alpha)``: ``C_1 = 2 alpha t``,
    ``(n+1) C_{n+1} = 2 (n + alpha) t C_n - (n + 2 alpha - 1) C_{n-1}``; alpha > -1/2, != 0."""

    name = "gegenbauer"
    option_names = ("alpha",)

    def __init__(self, degree, alpha: float = 1.5):
        super().__init__(degree)
        self.alpha = check_real("basis 'gegenbauer'", "alpha", alpha, "> -0.5 and != 0", lambda a: a > -0.5 and a != 0)

    def first(self):
        return 1.0, 2.0 * self.alpha, 0.0

    def step(self, n):
        return 2 * (n + self.alpha) / (n + 1), 0.0, (n + 2 * self.alpha - 1) / (n + 1)

    def describe(self):
        return {**super().describe(), "alpha": self.alpha}


class Jacobi(RecurrenceBasis):
    """Jacobi ``P^(alpha, beta)``, alpha, beta > -1:
    ``P_1 = (alpha + 1) + (alpha + beta + 2) (t - 1) / 2`` and, with ``m = n + 1`` and
    ``s = alpha + beta``,
    ``2m (m+s) (2m+s-2) P_m = (2m+s-1) [(2m+s)(2m+s-2) t + alpha^2 - beta^2] P_{m-1}
    - 2 (m+alpha-1)(m+beta-1)(2m+s) P_{m-2}``."""

    name = "jacobi"
    option_names = ("alpha", "beta")

    def __init__(self, degree, alpha: float = 1.0, beta: float = 1.0):
        super().__init__(degree)
        self.alpha = check_real("basis 'jacobi'", "alpha", alpha, "> -1", lambda a: a > -1)
        self.beta = check_real("basis 'jacobi'", "beta", beta, "> -1", lambda b: b > -1)

    def first(self):
        a, b = self.alpha, self.beta
        return 1.0, (a + b + 2) / 2, (a - b) / 2

    def step(self, n):
        a, b = self.alpha, self.beta
        m, s = n + 1, self.alpha + self.beta
        denominator = 2 * m * (m + s) * (2 * m + s - 2)
        slope = (2 * m + s - 1) * (2 * m + s) * (2 * m + s - 2) / denominator
        offset = (2 * m + s - 1) * (a * a - b * b) / denominator
        lower = 2 * (m + a - 1) * (m + b - 1) * (2 * m + s) / denominator
        return slope, offset, lower

    def describe(self):
        return {**super().describe(), "alpha": self.alpha, "beta": self.beta}


class Hermite(RecurrenceBasis):
    """Hermite (physicists'): ``H_1 = 2t``, ``H_{n+1} = 2t H_n - 2n H_{n-1}``."""

    name = "hermite"

    def first(self):
        return 1.0, 2.0, 0.0

    def step(self, n):
        return 2.0, 0.0, 2.0 * n


class Laguerre(RecurrenceBasis):
    """Laguerre: ``L_1 = 1 - t``, ``(n+1) L_{n+1} = (2n + 1 - t) L_n - n L_{n-1}``."""

    name = "laguerre"

    def first(self):
        return 1.0, -1.0, 1.0

    def step(self, n):
        return -1.0 / (n + 1), (2 * n + 1) / (n + 1), n / (n + 1)


class Bessel(RecurrenceBasis):
    """Bessel polynomials: ``y_1 = 1 + t``, ``y_{n+1} = (2n + 1) t y_n + y_{n-1}``."""

    name = "bessel"

    def first(self):
        return 1.0, 1.0, 1.0

    def step(self, n):
        return 2.0 * n + 1, 0.0, -1.0


class Fibonacci(RecurrenceBasis):
    """Fibonacci polynomials by degree: ``P_0 = 1, P_1 = t``, ``P_{n+1} = t P_n + P_{n-1}``."""

    name = "fibonacci"

    def first(self):
        return 1.0, 1.0, 0.0

    def step(self, n):
        return 1.0, 0.0, -1.0


class Lucas(RecurrenceBasis):
    """Lucas polynomials: ``L_0 = 2, L_1 = t``, ``L_{n+1} = t L_n + L_{n-1}``."""

    name = "lucas"

    def first(self):
        return 2.0, 1.0, 0.0

    def step(self, n):
        return 1.0, 0.0, -1.0


# ---------------------------------------------------------------- local bases


class BSpline(Basis):
    """Uniform B-splines of order ``degree`` (piecewise polynomials of that degree) on
    ``grid_size`` equal intervals covering [-1, 1], extended by ``degree`` knots each side.

    ``K = grid_size + degree`` features. Cox-de Boor recursion with spacing ``h``:
    ``B_{j,p} = ((t - k_j) B_{j,p-1} + (k_{j+p+1} - t) B_{j+1,p-1}) / (p h)`` and
    ``B'_{j,p} = (B_{j,p-1} - B_{j+1,p-1}) / h``. The splines sum to one on the domain, but
    none is constant, so nothing is folded.
    """

    name = "bspline"
    option_names = ("grid_size",)
    has_derivatives = True
    # Cox-de Boor costs grow with the square of the order; orders above 20 serve no use seen so far.
    max_degree = 20

    def __init__(self, degree, grid_size: int = 5):
        super().__init__(degree)
        self.grid_size = check_integer("basis 'bspline'", "grid_size", grid_size)
        self.spacing = 2.0 / grid_size

    @property
    def num_features(self):
        return self.grid_size + self.degree

    def _splines(self, t, order):
        """All splines of ``order`` at once, shaped ``(*t.shape, grid_size + 2 * degree - order)``."""
        count = self.grid_size + 2 * self.degree
        knots = torch.arange(count + 1, dtype=t.dtype, device=t.device) * self.spacing
        knots = knots - (1.0 + self.degree * self.spacing)
        u = t.unsqueeze(-1)
        splines = ((u >= knots[:-1]) & (u < knots[1:])).to(t.dtype)
        for p in range(1, order + 1):
            rising = (u - knots[: -(p + 1)]) * splines[..., :-1]
            falling = (knots[p + 1 :] - u) * splines[..., 1:]
            splines = (rising + falling) * (1.0 / (p * self.spacing))
        return splines

    def values(self, t, params):
        return list(self._splines(t, self.degree).unbind(-1))

    def derivatives(self, t, values):
        lower = self._splines(t, self.degree - 1)
        return list(((lower[..., :-1] - lower[..., 1:]) * (1.0 / self.spacing)).unbind(-1))

    def describe(self):
        return {**super().describe(), "grid_size": self.grid_size}


class RadialBasis(Basis):
    """Gaussian radial basis functions: ``degree`` centres ``c_j`` evenly spaced on
    [-1, 1], ``phi_j(t) = exp(-((t - c_j) / w)^2)`` with ``w = width * spacing``;
    ``phi'_j = -2 (t - c_j) / w^2 * phi_j``."""

    name = "rbf"
    option_names = ("width",)
    has_derivatives = True

    def __init__(self, degree, width: float = 1.0):
        super().__init__(degree)
        self.width = check_real("basis 'rbf'", "width", width, "> 0", lambda w: w > 0)
        self.spacing = 2.0 / (self.degree - 1) if self.degree > 1 else 2.0
        self.first_centre = -1.0 if self.degree > 1 else 0.0
        self.scale = self.width * self.spacing

    def _offsets(self, t):
        """``(t - c_j) / w`` for all centres, shaped ``(*t.shape, degree)``."""
        centres = torch.arange(self.degree, dtype=t.dtype, device=t.device) * self.spacing + self.first_centre
        return (t.unsqueeze(-1) - centres) * (1.0 / self.scale)

    def values(self, t, params):
        return list(torch.exp(-self._offsets(t).square()).unbind(-1))

    def derivatives(self, t, values):
        return list((self._offsets(t) * torch.stack(values, -1) * (-2.0 / self.scale)).unbind(-1))

    def describe(self):
        return {**super().describe(), "width": self.width}


class Rational(Basis):
    """Safe Pade-style rational functions: ``phi_k(t) = t^k / Q(t)`` for ``k = 0..degree``
    with one learnable denominator per input channel,
    ``Q(t) = 1 + |sum_{j=1..m} b_j t^j|`` (``m = denominator_degree``, default ``degree``).
    ``Q >= 1`` everywhere, so the denominator can never reach zero. ``b`` starts at zero
    (plain polynomials); ``K = degree + 1`` features (``1/Q`` is not constant once ``b``
    moves, so it is kept). Differentiated by the fused op's local autograd recompute.
    """

    name = "rational"
    option_names = ("denominator_degree",)

    def __init__(self, degree, denominator_degree: int | None = None):
        super().__init__(degree)
        m = self.degree if denominator_degree is None else denominator_degree
        self.denominator_degree = check_integer("basis 'rational'", "denominator_degree", m)

    @property
    def num_features(self):
        return self.degree + 1

    def parameter_shapes(self, in_features):
        return [(self.denominator_degree, in_features)]

    def values(self, t, params):
        (b,) = params
        power, denominator_poly = t, torch.zeros_like(t)
        for j in range(self.denominator_degree):
            denominator_poly = denominator_poly + b[j] * power
            power = power * t
        inverse_q = 1.0 / (1.0 + denominator_poly.abs())
        features, power = [inverse_q], inverse_q
        for _ in range(self.degree):
            power = power * t
            features.append(power)
        return features

    def describe(self):
        return {**super().describe(), "denominator_degree": self.denominator_degree}


# ------------------------------------------------------------------ composition


class ParallelBasis(Basis):
    """Several bases side by side on the same input. Their features are concatenated, so
    the layer output is the sum of one KAN layer per basis, computed by one matrix multiply."""

    name = "parallel"

    def __init__(self, members: list[Basis]):
        if len(members) < 2:
            raise ValueError("a parallel basis needs at least two members")
        self.members = members
        self.degree = max(m.degree for m in members)
        self.has_derivatives = all(m.has_derivatives and not m.parameter_shapes(1) for m in members)

    @property
    def num_features(self):
        return sum(m.num_features for m in self.members)

    def parameter_shapes(self, in_features):
        return [shape for m in self.members for shape in m.parameter_shapes(in_features)]

    def initial_parameters(self, in_features):
        return [p for m in self.members for p in m.initial_parameters(in_features)]

    def _split(self, params):
        start = 0
        for m in self.members:
            count = len(m.parameter_shapes(1))
            yield m, params[start : start + count]
            start += count

    def values(self, t, params):
        return [v for m, own in self._split(params) for v in m.values(t, own)]

    def _split_features(self, features):
        start = 0
        for m in self.members:
            yield m, features[start : start + m.num_features]
            start += m.num_features

    def write_values(self, t, params, out):
        for (m, own), (_, slots) in zip(self._split(params), self._split_features(out)):
            m.write_values(t, own, slots)

    def input_gradient(self, t, values, grads):
        grad_t = None
        for (m, own), (_, own_grads) in zip(self._split_features(values), self._split_features(grads)):
            part = m.input_gradient(t, own, own_grads)
            grad_t = part if grad_t is None else grad_t.add_(part)
        return grad_t

    def describe(self):
        return {"basis": "+".join(m.name for m in self.members), "members": [m.describe() for m in self.members]}


# --------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Basis]] = {}


def register_basis(name: str, factory: Callable[..., Basis], *, overwrite: bool = False) -> None:
    """Make ``factory(degree, **options)`` selectable as ``basis=name``.

    ``factory`` is usually a ``Basis`` subclass. Names may not contain ``+`` or ``>``
    (they compose bases: ``"cheby2+rbf"`` runs both side by side, ``"cheby2>legendre"``
    chains layers in a ``KANFeedForward``).
    """
    if not isinstance(name, str) or not name or any(ch in name for ch in "+> "):
        raise ValueError(f"basis name must be a non-empty string without '+', '>' or spaces, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"basis {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(factory):
        raise TypeError(f"basis factory for {name!r} must be callable, got {type(factory).__name__}")
    _REGISTRY[name] = factory


def list_bases() -> list[str]:
    """Names accepted by ``basis=``."""
    return list(_REGISTRY)


def make_basis(spec: str, degree: int = 2, **options) -> Basis:
    """Build a basis from a name such as ``"cheby2"`` or a parallel spec ``"cheby2+rbf"``.

    Options a member does not take are ignored for parallel specs (so ``grid_size`` can
    ride along with ``"bspline+cheby2"``) but must be taken by at least one member; single
    bases reject options they do not take.
    """
    names = _split_spec(spec)
    if len(names) == 1:
        return _build(names[0], degree, options)
    routed = route_options(f"basis in {spec!r}", [getattr(_REGISTRY[name], "option_names", None) for name in names],
                           options)
    return ParallelBasis([_build(name, degree, member_options) for name, member_options in zip(names, routed)])


def route_options(where: str, accepted: list, options: dict, shared=()) -> list[dict]:
    """The options for each part of a composed basis (the members of ``"a+b"``, the stages of ``"a>b"``).

    ``accepted`` holds the option names each part takes (None: its factory does not say, and it gets every
    option); each part gets those it takes, plus the ``shared`` ones, which go to every part. An option no part
    takes is refused, naming ``where`` (``"basis in 'cheby2+rbf'"``) and the valid options.
    """
    own = {name: value for name, value in options.items() if name not in shared}
    if None not in accepted:
        unused = set(own).difference(*accepted)
        if unused:
            valid = sorted(set(shared).union(*accepted))
            raise ValueError(f"options {sorted(unused)} are not taken by any {where}; "
                             f"valid options: {', '.join(valid) or 'none besides degree'}")
    common = {name: value for name, value in options.items() if name in shared}
    return [{**common, **{name: value for name, value in own.items() if taken is None or name in taken}}
            for taken in accepted]


def accepted_options(spec: str) -> set[str] | None:
    """Options (besides ``degree``) that some basis in ``spec`` takes; None if a factory does not say."""
    accepted = [getattr(_REGISTRY[name], "option_names", None) for name in _split_spec(spec)]
    return None if None in accepted else set().union(*accepted)


def _split_spec(spec):
    if not isinstance(spec, str):
        raise TypeError(f"basis must be a string, got {type(spec).__name__}")
    names = spec.split("+")
    for name in names:
        if name not in _REGISTRY:
            raise ValueError(f"unknown basis {name!r} in {spec!r}; valid choices: {', '.join(list_bases())}")
    return names


def _build(name, degree, options):
    factory = _REGISTRY[name]
    accepted = getattr(factory, "option_names", None)
    unknown = set(options) - set(accepted) if accepted is not None else set()
    if unknown:
        raise ValueError(
            f"basis {name!r} does not take options {sorted(unknown)}; "
            f"valid options: {', '.join(accepted) if accepted else 'none besides degree'}"
        )
    basis = factory(degree, **options)
    if not isinstance(basis, Basis):
        raise TypeError(f"the factory registered as basis {name!r} returned {type(basis).__name__}, not a Basis")
    # The registered name is what rebuilds this basis from a config.
    basis.name = name
    check_float32_range(basis)
    return basis


def check_float32_range(basis: Basis) -> None:
    """Refuse a basis whose freshly initialised KAN layer would not stay finite in float32.

    Every feature must stay within ``FEATURE_LIMIT`` on [-1, 1] (high degrees of hermite, bessel,
    fibonacci, lucas and laguerre grow past it, as do gegenbauer and jacobi with large alpha or
    beta), and the features together must not vanish (mean square at least ``MIN_MEAN_SQUARE``).
    """
    options = {k: v for k, v in basis.describe().items() if k not in ("basis", "degree")}
    described = f"basis {basis.name!r} at degree {basis.degree}" + "".join(f", {k}={v!r}" for k, v in options.items())
    with torch.device("cpu"):  # real numbers even inside the meta-device context of from_pretrained
        t = torch.linspace(-1.0, 1.0, 2001, dtype=torch.float64).unsqueeze(-1)
        params = [p.to(torch.float64) for p in basis.initial_parameters(1)]
        peaks = [float(value.abs().max()) for value in basis.values(t, params)]
    first_too_large = next((k for k, peak in enumerate(peaks) if not peak <= FEATURE_LIMIT), None)
    if first_too_large is not None:
        if not isinstance(basis, RecurrenceBasis):
            advice = "lower the degree or change the options"
        elif first_too_large == 0:
            advice = "no degree stays within it with these options; choose smaller option values"
        else:
            advice = f"the largest degree that stays within it with these options is {first_too_large}"
        raise ValueError(
            f"{described}: feature {first_too_large + 1} reaches {peaks[first_too_large]:.3g} on [-1, 1], above "
            f"the {FEATURE_LIMIT:.0e} a KAN layer allows so that it stays finite in float32; {advice} "
            f"(limits per basis: docs/layers.md)"
        )
    mean_square = basis.mean_square()
    if not mean_square >= MIN_MEAN_SQUARE:
        raise ValueError(
            f"{described}: its features nearly vanish on [-1, 1] (mean square {mean_square:.3g}, below "
            f"{MIN_MEAN_SQUARE:.0e}), so the layer could not be initialised; choose options that keep them away "
            f"from zero"
        )


for _cls in (Chebyshev1, Chebyshev2, Legendre, Jacobi, Gegenbauer, Hermite, Laguerre, Bessel,
             Fibonacci, Lucas, BSpline, RadialBasis, Rational):
    register_basis(_cls.name, _cls)
_BUILTIN_FACTORIES = dict(_REGISTRY)


def custom_bases(spec: str) -> list[str]:
    """The names in a basis spec (``"a+b>c"``) that a user registered rather than kallm: the code
    saved next to a checkpoint does not hold them."""
    names = {name for stage in spec.split(">") for name in stage.split("+")}
    return sorted(name for name in names if _REGISTRY.get(name) is not _BUILTIN_FACTORIES.get(name))
