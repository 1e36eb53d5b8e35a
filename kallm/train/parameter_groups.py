"""Optimiser parameter groups by role: the basis coefficients, the base branch, the input maps... each at its own
learning rate (``parameter_groups``)."""

from __future__ import annotations

from torch import nn

from ..core.function_layers import is_channel_functions
from ..core.layers import is_kan_linear

#: what a parameter of a KAN layer (or of the functions of ``form="glu"``) does, by its name there; every other
#: parameter of a model is ``"other"``
KAN_PARAMETER_ROLES = {"weight": "coefficients", "coefficients": "coefficients", "base_weight": "base",
                       "bias": "bias", "input_scale": "input_maps", "input_shift": "input_maps"}
PARAMETER_ROLES = ("coefficients", "base", "bias", "input_maps", "basis", "other")


def parameter_groups(model: nn.Module, learning_rate: float, scales: dict[str, float] | None = None) -> list[dict]:
    """Optimiser parameter groups of ``model``'s trainable parameters by role, each at ``learning_rate`` times its
    scale in ``scales`` (default 1): ``torch.optim.AdamW(kallm.parameter_groups(model, 1e-3, {"base": 0.1}))``.

    Roles (``PARAMETER_ROLES``): a KAN layer's ``coefficients`` (its basis coefficients; the functions' of
    ``form="glu"`` too), ``base`` (the base branch's matrix), ``bias``, ``input_maps`` (the scale and shift that
    take inputs to the basis' domain), ``basis`` (a basis' own parameters, such as ``rational``'s denominator), and
    ``other``: every parameter outside KAN layers (attention, embeddings, norms, MLPs). Empty groups are left out;
    each group has a ``"role"`` key. Works on any module: a model, a ``KANFeedForward``, a ``PeftModel``.
    """
    scales = dict(scales or {})
    check_role_scales(scales)
    roles = {}
    for module in model.modules():
        if is_kan_linear(module) or is_channel_functions(module):
            for name, parameter in module.named_parameters(recurse=False):
                roles[parameter] = KAN_PARAMETER_ROLES.get(name, "other")
            for parameter in module.basis_parameters:
                roles[parameter] = "basis"
    groups = {role: [] for role in PARAMETER_ROLES}
    for parameter in model.parameters():
        if parameter.requires_grad:
            groups[roles.get(parameter, "other")].append(parameter)
    return [{"params": params, "lr": learning_rate * scales.get(role, 1.0), "role": role}
            for role, params in groups.items() if params]


def check_role_scales(scales, owner: str = "learning rate scales") -> None:
    """Refuse ``{role: scale}`` with a role outside ``PARAMETER_ROLES`` or a scale that is no finite number >= 0."""
    if not isinstance(scales, dict):
        raise ValueError(f"{owner} must be a mapping of parameter roles to numbers, such as {{'coefficients': 0.1}}; "
                         f"got {scales!r}")
    unknown = sorted(set(scales) - set(PARAMETER_ROLES))
    if unknown:
        raise ValueError(f"unknown parameter roles {unknown} in {owner}; valid roles: {', '.join(PARAMETER_ROLES)}")
    bad = {role: scale for role, scale in scales.items()
           if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < float("inf")}
    if bad:
        raise ValueError(f"{owner} must be finite numbers >= 0, got {bad}")
