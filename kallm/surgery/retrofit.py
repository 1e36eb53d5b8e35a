"""``kallm.retrofit``: swap the feedforwards of chosen decoder blocks for KAN ones."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from ..core import KAN_CONFIG_CLASSES, KAN_SCHEMA_VERSION
from ..core.layers import KANFeedForward, intermediate_size_for_budget
from ..core.modeling_kallm import count_parameters, install_kan_feedforwards
from ..loading import public_source_name
from .adapters import ArchitectureAdapter, feedforward_sizes
from .checks import causal_lm_parts, check_weights, retrofitted_class, retrofitted_kan_config
from .fit import check_fit_arguments, fit_new_feedforwards

KINDS = ("kan", "linear")
#: by default a KAN feedforward gets this share of the parameters of the MLP it replaces
DEFAULT_PARAMETER_SHARE = 0.5


def retrofit(
    model: nn.Module,
    last_n: int | None = 5,
    basis: str = "cheby2",
    degree: int = 2,
    layers: list[int] | None = None,
    intermediate_size: int | None = None,
    kind: str = "kan",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    init: str = "random",
    calibration: list[str] | torch.Tensor | None = None,
    tokenizer=None,
    **layer_options,
) -> nn.Module:
    """Replace the feedforward of the last ``last_n`` decoder blocks (or of ``layers``).

    Args:
        model: a transformers causal LM of a supported family (``kallm.supported_model_types()``).
        last_n: how many final blocks to retrofit; ignored when ``layers`` is given.
        basis, degree, **layer_options: the KAN layers (see ``kallm.KANLinear``).
        layers: explicit block indices (negative ones count from the end).
        intermediate_size: inner size of each KAN feedforward; default: the largest that
            keeps it within half the parameters of the MLP it replaces.
        kind: ``"kan"``, or ``"linear"`` for the "linear restart" baseline: the same blocks
            keep an MLP of the original shape, freshly initialised.
        filter_fn: ``filter_fn(feedforward_module, qualified_name) -> bool`` narrows the chosen
            blocks further (e.g. to skip blocks by name).
        init: ``"random"`` (fresh weights) or ``"fit"``: function-preserving initialisation, each
            KAN feedforward fitted to the MLP it replaces on hidden states the original model
            produces over ``calibration`` (a list of texts, with ``tokenizer``, or a LongTensor
            of token ids; default: replies the model writes itself, which needs ``tokenizer``).
            The relative error per block lands in ``model.kallm_fit_report``. See docs/fit-init.md.

    Returns the same model object, now of the retrofitted class (``KALlamaForCausalLM``
    for a Llama model) with ``config.kan_config`` describing the change. Weights outside
    the retrofitted feedforwards are untouched.

    On an already retrofitted model it adds blocks with the same settings (an omitted
    ``intermediate_size`` keeps the one in use). Anything inconsistent (other settings,
    blocks already replaced, mixing ``kind``s, bad arguments) raises before the model is
    changed, and so does a model kallm cannot retrofit (bare or PEFT-wrapped, offloaded to
    the meta device, quantized) or a calibration too small to fit; a fit that ends with
    non-finite weights is undone before it raises. See docs/retrofitting.md.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid choices: {', '.join(KINDS)}")
    check_fit_arguments(init, calibration, tokenizer)
    if init == "fit" and kind != "kan":
        raise ValueError("init='fit' fits KAN feedforwards; use it with kind='kan'")
    base_type, adapter, blocks = causal_lm_parts(model, "retrofit")
    indices = _select_blocks(len(blocks), last_n, layers)
    if filter_fn is not None:
        indices = [
            i for i in indices
            if filter_fn(getattr(blocks[i], adapter.mlp_attribute), f"{adapter.blocks_path}.{i}.{adapter.mlp_attribute}")
        ]
    if not indices:
        raise ValueError("no decoder block selected: check last_n, layers and filter_fn")
    existing = retrofitted_kan_config(model, adapter, blocks)
    _check_kind_consistency(model, kind, indices)
    check_weights(model, adapter, blocks, indices, runs_model=init == "fit")

    if kind == "linear":
        _restart_feedforwards(model, adapter, indices)
        return model

    _check_layer_options(layer_options)
    hidden, _ = feedforward_sizes(model.config, adapter)
    if intermediate_size is None and existing:
        # Extending keeps the size already chosen, so that all KAN blocks stay alike.
        intermediate_size = existing["intermediate_size"]
    if intermediate_size is None:
        replaced = _feedforward_parameters(blocks[indices[0]], adapter)
        intermediate_size = intermediate_size_for_budget(
            hidden, int(replaced * DEFAULT_PARAMETER_SHARE), basis, degree, **layer_options
        )
    # Build one module first so that bad basis options fail before the model is touched.
    template = KANFeedForward(hidden, intermediate_size, basis, degree, **layer_options)

    new_config = {
        "schema_version": KAN_SCHEMA_VERSION,
        "base_model_type": base_type,
        "base_model": public_source_name(getattr(model.config, "_name_or_path", "")) or base_type,
        "layers": sorted(indices),
        "blocks_path": adapter.blocks_path,
        "mlp_attribute": adapter.mlp_attribute,
        "bypassed_attributes": list(adapter.bypassed_attributes),
        "hidden_size": hidden,
        "intermediate_size": intermediate_size,
        "basis": basis,
        "degree": degree,
        "layer_options": dict(layer_options),
    }
    if existing:
        new_config = _extend(existing, new_config)

    def install():
        if existing:
            install_kan_feedforwards(model, new_config, layers=sorted(set(indices)))
            model.config.kan_config = new_config
        else:
            _convert_class(model, base_type, new_config)
            install_kan_feedforwards(model, new_config)

    undo = _undo_point(model, adapter, indices)
    try:
        if init == "fit":
            fit_new_feedforwards(model, adapter, indices, install, template, calibration, tokenizer)
        else:
            install()
    except BaseException:
        # Whatever failed (a fit gone non-finite, an interrupt), the model is left as it was.
        undo()
        raise
    return model


def retrofitted_layers(model: nn.Module) -> list[int]:
    """Indices of the blocks kallm changed (KAN or linear restart); empty if none."""
    kan_config = getattr(model.config, "kan_config", None)
    if kan_config:
        return list(kan_config["layers"])
    return _restarted_layers(model)


def _restarted_layers(model) -> list[int]:
    return list(getattr(model.config, "kallm_restarted_layers", None) or [])


def _select_blocks(count, last_n, layers):
    if layers is not None:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise TypeError(f"layers must be a list of block indices, got {layers!r}")
        selected = []
        for index in layers:
            if not isinstance(index, int) or isinstance(index, bool):
                raise TypeError(f"layer indices must be integers, got {index!r}")
            if not -count <= index < count:
                raise ValueError(f"layer index {index!r} is out of range for a model with {count} blocks")
            selected.append(index % count)
        if len(set(selected)) != len(selected):
            raise ValueError(f"layers lists a block twice: {list(layers)}")
        return sorted(selected)
    if not isinstance(last_n, int) or isinstance(last_n, bool) or not 1 <= last_n <= count:
        raise ValueError(f"last_n must be an integer between 1 and {count} (the model's block count), got {last_n!r}")
    return list(range(count - last_n, count))


def _feedforward_parameters(block, adapter: ArchitectureAdapter) -> int:
    names = (adapter.mlp_attribute, *adapter.bypassed_attributes)
    return sum(count_parameters(getattr(block, name)) for name in names)


def _extend(old: dict, new: dict) -> dict:
    """Add blocks to an already retrofitted model, if the KAN settings agree."""
    overlap = sorted(set(old["layers"]) & set(new["layers"]))
    if overlap:
        raise ValueError(
            f"blocks {overlap} are already KAN feedforwards (retrofitted: {old['layers']}); choose other layers"
        )
    settings = ("basis", "degree", "intermediate_size", "layer_options", "hidden_size")
    differing = [key for key in settings if old[key] != new[key]]
    if differing:
        detail = ", ".join(f"{key}: {old[key]!r} -> {new[key]!r}" for key in differing)
        raise ValueError(
            f"this model is already retrofitted with other KAN settings ({detail}); a checkpoint holds one "
            f"setting for all its KAN blocks. Retrofit the original model instead, or pass the same settings"
        )
    return {**old, "layers": sorted(set(old["layers"]) | set(new["layers"]))}


def _check_kind_consistency(model, kind, indices):
    """One model is one experimental arm: KAN blocks and restarted MLPs never mix."""
    kan_config = getattr(model.config, "kan_config", None)
    restarted = _restarted_layers(model)
    if kind == "linear" and kan_config:
        raise ValueError(
            f"this model already has KAN feedforwards in blocks {kan_config['layers']}; the linear restart is the "
            f"baseline arm, so apply kind='linear' to the original model instead"
        )
    if kind == "kan" and restarted:
        raise ValueError(
            f"blocks {restarted} of this model were linear-restarted (kind='linear'); apply kind='kan' to the "
            f"original model instead of mixing both arms in one model"
        )
    overlap = sorted(set(restarted) & set(indices))
    if overlap:
        raise ValueError(f"blocks {overlap} were already linear-restarted; choose other layers")


def _check_layer_options(layer_options):
    placement = sorted({"device", "dtype"} & set(layer_options))
    if placement:
        raise ValueError(
            f"retrofit does not take {placement}: KAN feedforwards get the device and dtype of the MLP they "
            f"replace; move or cast the model itself (model.to(...))"
        )
    # kan_config travels in config.json, so options must survive a JSON round trip unchanged.
    try:
        same = json.loads(json.dumps(layer_options)) == layer_options
    except (TypeError, ValueError):
        same = False
    if not same:
        raise TypeError(
            f"layer options must be plain JSON values (str, int, float, bool, lists), got {layer_options!r}"
        )


def _undo_point(model, adapter, indices) -> Callable[[], None]:
    """A function that puts back the class, config and feedforwards ``model`` has now."""
    model_class, kan_config = type(model), getattr(model.config, "kan_config", None)
    configs = [(module, module.config) for module in model.modules()
               if isinstance(getattr(module, "config", None), PretrainedConfig)]
    blocks = model.get_submodule(adapter.blocks_path)
    feedforwards = [(blocks[i], name, getattr(blocks[i], name))
                    for i in indices for name in (adapter.mlp_attribute, *adapter.bypassed_attributes)]

    def undo():
        for block, name, module in feedforwards:
            setattr(block, name, module)
        for module, config in configs:
            module.config = config
        if hasattr(model.config, "kan_config"):
            model.config.kan_config = kan_config
        model.__class__ = model_class

    return undo


def _convert_class(model, base_type, kan_config):
    """Turn a base-family model into its retrofitted class, in place, keeping every tensor."""
    config_class = KAN_CONFIG_CLASSES[base_type]
    dropped = ("model_type", "architectures", "auto_map", "kan_config")
    values = {k: v for k, v in model.config.to_dict().items() if k not in dropped}
    new_config = config_class(**values, kan_config=kan_config)
    new_config._name_or_path = model.config._name_or_path
    for attribute in ("_attn_implementation_internal", "_experts_implementation_internal"):
        if hasattr(model.config, attribute):
            setattr(new_config, attribute, getattr(model.config, attribute))
    old_config = model.config
    for module in model.modules():
        if getattr(module, "config", None) is old_config:
            module.config = new_config
    model.__class__ = retrofitted_class(model, base_type)


@torch.no_grad()
def _restart_feedforwards(model, adapter, indices):
    """The research's "linear restart": fresh weights in the original MLP shape."""
    std = getattr(model.config, "initializer_range", None) or 0.02
    blocks = model.get_submodule(adapter.blocks_path)
    for index in indices:
        for name in (adapter.mlp_attribute, *adapter.bypassed_attributes):
            for module in getattr(blocks[index], name).modules():
                weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
                if isinstance(weight, torch.Tensor):
                    weight.normal_(0.0, std)
                if isinstance(bias, torch.Tensor):
                    bias.zero_()
    # kept in the config, so a saved restarted model still says which blocks start from scratch
    model.config.kallm_restarted_layers = sorted(set(retrofitted_layers(model)) | set(indices))
