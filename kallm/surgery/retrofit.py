"""``kallm.retrofit``: swap the feedforwards of chosen decoder blocks for KAN ones."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from ..checkpoints.load import public_source_name, untag_dequantized_gguf
from ..core import KAN_CONFIG_CLASSES
from ..core.configuration_kallm import config_as
from ..core.function_layers import ChannelFunctions, check_zero_start
from ..core.layers import KANFeedForward, count_parameters, intermediate_size_for_budget
from ..core.modeling_kallm import install_kan_feedforwards
from ..core.retrofit_config import (
    AUTO,
    BLOCK_SETTINGS,
    FORMS,
    KINDS,
    RetrofitConfig,
    read_retrofit_config,
    retrofitted_blocks,
)
from .architectures import EXACT_ACTIVATIONS, Architecture, supported_model_types
from .checks import causal_lm_parts, check_weights, retrofitted_class, retrofitted_kan_config
from .fit import check_fit_arguments, fit_new_feedforwards, minimum_calibration_tokens

__all__ = ["FORMS", "KINDS", "retrofit", "retrofitted_blocks"]

#: by default a KAN feedforward gets this share of the parameters of the MLP it replaces
DEFAULT_PARAMETER_SHARE = 0.5
#: what ``blocks="auto"`` ranks the candidate blocks by (see fit.py: massive-activation rows left out)
AUTO_RANKING = "ordinary_token_error"
#: the ``RetrofitConfig`` fields a caller may set as keywords of ``retrofit``
REQUEST_FIELDS = ("blocks", "last_n", "num_blocks", *BLOCK_SETTINGS, "kind", "form", "function_groups")


def retrofit(
    model: nn.Module,
    config: RetrofitConfig | None = None,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    init: str | None = None,
    calibration: list[str] | torch.Tensor | None = None,
    tokenizer=None,
    **fields,
) -> nn.Module:
    """Replace the feedforward of the last ``last_n`` decoder blocks (or of ``blocks``).

    Args:
        model: a transformers causal LM of a supported family (``kallm.supported_model_types()``).
        config: a ``kallm.RetrofitConfig`` saying what to do; ``**fields`` set or override its fields.
        **fields: ``RetrofitConfig`` fields as keywords (default: ``last_n=5, basis="cheby2", degree=2``):
            ``blocks`` (indices, negative ones from the end; ``{index: settings}`` for per-block settings;
            ``"auto"`` with ``num_blocks``), ``last_n``, ``basis``, ``degree``, ``intermediate_size``,
            ``input_map``, ``bias``, ``base`` (None, ``"silu"`` or ``"linear"``: a base branch beside the basis
            functions), ``basis_options``, ``kind`` (``"kan"`` or ``"linear"``, the linear-restart
            baseline), ``form`` (``"kan"``; ``"gated"``: a third KAN layer gates the first, like a SwiGLU MLP; or
            ``"glu"``: the MLP keeps its projections and gains learnable functions that start at zero, so the
            model starts exactly at the original) and ``function_groups``
            (``form="glu"``: channels per shared function; None: one function per channel). Any other keyword
            is a basis option (``alpha=0.5``). ``layers=`` is the deprecated name of ``blocks=``.
        filter_fn: ``filter_fn(feedforward_module, qualified_name) -> bool`` (torchao's ``quantize_`` convention)
            narrows the chosen blocks further (e.g. to skip blocks by name).
        init: ``"random"`` (fresh weights) or ``"fit"``: function-preserving initialisation, each
            KAN feedforward fitted to the MLP it replaces on hidden states the original model
            produces over ``calibration`` (a list of texts, with ``tokenizer``, or a LongTensor
            of token ids; default: replies the model writes itself, which needs ``tokenizer``).
            The relative error per block lands in ``model.kallm_fit_report``. See docs/fit-init.md.
            Default: the config's (``"random"``).

    ``blocks="auto", num_blocks=N`` (with ``init="fit"``) fits a KAN feedforward to every candidate block (all
    blocks that ``filter_fn`` keeps and that are not KAN feedforwards yet), keeps the ``N`` with the lowest
    fit error over ordinary tokens and gives the others their MLPs back; ``kan_config["selection"]`` and
    ``model.kallm_fit_report["selection"]`` record every candidate's errors and the choice.

    Returns the same model object, now of the retrofitted class (``KALlamaForCausalLM``
    for a Llama model) with ``config.kan_config`` (the completed ``RetrofitConfig`` as a dict)
    describing the change. Weights outside the retrofitted feedforwards are untouched. A linear
    restart keeps the model's class and records its ``RetrofitConfig`` (``kind="linear"``) as
    ``config.kan_config`` too.

    On an already retrofitted model it adds blocks with the same settings (an omitted
    ``intermediate_size`` keeps the one in use; per-block settings of the new blocks are kept). Anything
    inconsistent (other settings, blocks already replaced, mixing ``kind``s, bad arguments) raises before
    the model is changed, and so does a model kallm cannot retrofit (bare or PEFT-wrapped, offloaded to
    the meta device, quantized) or a calibration too small to fit; a fit that ends with
    non-finite weights is undone before it raises. See docs/retrofitting.md.
    """
    request = _request(config, init, fields)
    check_fit_arguments(request.init, calibration, tokenizer)
    if request.blocks == AUTO and request.init != "fit":
        raise ValueError("blocks='auto' ranks the blocks by the error of fit init: pass init='fit' (with "
                         "tokenizer= or calibration=), or choose the blocks yourself")
    base_type, architecture, blocks = causal_lm_parts(model, "retrofit")
    indices, own_settings = _select_blocks(len(blocks), request)
    if filter_fn is not None:
        mlp = architecture.mlp_attribute
        indices = [i for i in indices if filter_fn(getattr(blocks[i], mlp), f"{architecture.blocks_path}.{i}.{mlp}")]
    existing = retrofitted_kan_config(model, architecture, blocks)
    if request.blocks == AUTO and existing:
        indices = [i for i in indices if i not in existing.blocks]
    if not indices:
        raise ValueError("no decoder block selected: check last_n, blocks and filter_fn")
    if request.blocks == AUTO and request.num_blocks > len(indices):
        raise ValueError(f"num_blocks={request.num_blocks} but only {len(indices)} candidate blocks {indices} are "
                         f"left for blocks='auto'")
    _check_kind_consistency(model, request.kind, indices)
    check_weights(model, architecture, blocks, indices, runs_model=request.init == "fit")

    hidden = getattr(model.config, architecture.hidden_size)
    structure = {"mlp_attribute": architecture.mlp_attribute,
                 "bypassed_attributes": list(architecture.bypassed_attributes)}
    if request.form == "glu":
        structure = _function_form_structure(model, base_type, architecture, blocks, indices, request)
    resolved = dataclasses.replace(
        request, blocks=sorted(indices), last_n=None, num_blocks=None, selection=None,
        block_settings={i: settings for i, settings in own_settings.items() if i in indices and settings},
        base_model_type=base_type,
        base_model=public_source_name(getattr(model.config, "_name_or_path", "")) or base_type,
        blocks_path=architecture.blocks_path, hidden_size=hidden, **structure,
    )
    if request.kind == "linear":
        previous = read_retrofit_config(model.config)
        resolved = dataclasses.replace(resolved, blocks=sorted(set(previous.blocks if previous else ()) | set(indices)))
        _restart_feedforwards(model, architecture, indices)
        _record(model.config, resolved)
        untag_dequantized_gguf(model)
        return model

    if request.form != "glu":
        resolved = _resolve_sizes(resolved, existing, blocks, architecture)
    # Build one module per distinct setting first so that bad basis options fail before the model is touched.
    templates = {}
    for index in indices:
        if request.form == "glu":
            arguments = resolved.function_arguments(index)
            key = repr(sorted(arguments.items()))
            if key not in templates:
                templates[key] = ChannelFunctions(**arguments, device="meta")
                settings = resolved.settings(index)
                check_zero_start(settings["basis"], settings["degree"], _compute_dtype(model),
                                 **settings["basis_options"])
            continue
        arguments = resolved.feedforward_arguments(index)
        key = repr(sorted(arguments.items()))
        if key not in templates:
            templates[key] = KANFeedForward(**arguments)
    new_config = _extend(existing, resolved) if existing else resolved
    new_config.check_complete(base_type)

    def install():
        if existing:
            install_kan_feedforwards(model, new_config.to_dict(), blocks=sorted(set(indices)))
            model.config.kan_config = new_config.to_dict()
        else:
            _convert_class(model, base_type, new_config.to_dict())
            install_kan_feedforwards(model, new_config.to_dict())

    saved = _SavedState(model, architecture, indices)
    try:
        if request.init == "fit":
            template = max(templates.values(), key=minimum_calibration_tokens)
            report = fit_new_feedforwards(model, architecture, indices, install, template, calibration, tokenizer)
            if request.blocks == AUTO:
                _keep_the_best_fits(model, new_config, report, request.num_blocks, saved)
        else:
            install()
            if request.form == "glu":
                _check_exact_start(model, saved, indices[0])
    except BaseException:
        # Whatever failed (a fit gone non-finite, an interrupt), the model is left as it was.
        saved.undo()
        raise
    # a model transformers unpacked from a GGUF file to float: it keeps no tag that would refuse save and training
    untag_dequantized_gguf(model)
    return model


def retrofitted_layers(model: nn.Module) -> list[int]:
    """Deprecated name of ``retrofitted_blocks``."""
    warnings.warn("kallm.surgery.retrofitted_layers is deprecated: use retrofitted_blocks", FutureWarning,
                  stacklevel=2)
    return retrofitted_blocks(model)


def _request(config, init, fields) -> RetrofitConfig:
    """The ``RetrofitConfig`` a call asks for: ``config`` (default: ``RetrofitConfig()``) with ``fields`` and
    ``init`` on top, checked field by field."""
    if config is not None and not isinstance(config, RetrofitConfig):
        raise TypeError(f"config must be a kallm.RetrofitConfig, got {type(config).__name__}; pass settings such "
                        f"as last_n= or basis= as keywords")
    fields = dict(fields)
    if "layers" in fields:
        layers = fields.pop("layers")
        if layers is not None:
            warnings.warn("retrofit(layers=...) is deprecated: the decoder block indices are now blocks=...",
                          FutureWarning, stacklevel=3)
            if fields.get("blocks") is not None:
                raise ValueError("give blocks= or its deprecated name layers=, not both")
            fields["blocks"] = layers
    placement = sorted({"device", "dtype"} & set(fields))
    if placement:
        raise ValueError(
            f"retrofit does not take {placement}: KAN feedforwards get the device and dtype of the MLP they "
            f"replace; move or cast the model itself (model.to(...))"
        )
    known = {f.name for f in dataclasses.fields(RetrofitConfig)}
    completed = sorted(name for name in fields if name in known and name not in REQUEST_FIELDS)
    if completed:
        raise ValueError(f"retrofit fills in {completed} itself; it takes these settings: {', '.join(REQUEST_FIELDS)}"
                         f", and basis options")
    base = config if config is not None else RetrofitConfig()
    basis_options = {name: fields.pop(name) for name in list(fields) if name not in known}
    if basis_options:
        fields["basis_options"] = {**fields.get("basis_options", base.basis_options), **basis_options}
    if init is not None:
        fields["init"] = init
    return dataclasses.replace(base, **fields) if fields else base


def _select_blocks(count, request: RetrofitConfig) -> tuple[list[int], dict[int, dict]]:
    """The block indices a request names (negative ones resolved) and their own settings."""
    if request.blocks == AUTO:
        return list(range(count)), {}
    if request.blocks is not None:
        resolved = {}
        for index in request.blocks:
            if not -count <= index < count:
                raise ValueError(f"block index {index!r} is out of range for a model with {count} blocks")
            resolved[index] = index % count
        if len(set(resolved.values())) != len(request.blocks):
            raise ValueError(f"blocks lists a block twice: {list(request.blocks)}")
        unlisted = sorted(set(request.block_settings) - set(resolved))
        if unlisted:
            raise ValueError(f"block_settings has settings for blocks {unlisted}, which blocks does not list")
        settings = {resolved[index]: own for index, own in request.block_settings.items()}
        return sorted(resolved.values()), settings
    last_n = request.last_n
    if request.block_settings:
        raise ValueError("block_settings needs the blocks listed: blocks={index: settings, ...}")
    if not isinstance(last_n, int) or isinstance(last_n, bool) or not 1 <= last_n <= count:
        raise ValueError(f"last_n must be an integer between 1 and {count} (the model's block count), got {last_n!r}")
    return list(range(count - last_n, count)), {}


def _resolve_sizes(config: RetrofitConfig, existing: RetrofitConfig | None, blocks, architecture) -> RetrofitConfig:
    """``config`` with every intermediate size decided: given; else, when extending, the one in use (so that
    all KAN blocks stay alike); else the largest within ``DEFAULT_PARAMETER_SHARE`` of the MLP it replaces,
    computed for each block with settings of its own."""
    def budget_size(index, settings):
        replaced = _feedforward_parameters(blocks[index], architecture)
        return intermediate_size_for_budget(
            config.hidden_size, int(replaced * DEFAULT_PARAMETER_SHARE), settings["basis"], settings["degree"],
            input_map=settings["input_map"], bias=settings["bias"], base=settings["base"],
            gated=config.form == "gated", **settings["basis_options"],
        )

    explicit = config.intermediate_size is not None
    size = config.intermediate_size
    if size is None and existing:
        size = existing.intermediate_size
    if size is None:
        size = budget_size(config.blocks[0], {name: getattr(config, name) for name in BLOCK_SETTINGS})
    own_settings = {}
    for index, own in config.block_settings.items():
        own = dict(own)
        if "intermediate_size" not in own and not explicit and set(own) - {"intermediate_size"}:
            own_size = budget_size(index, {**config.settings(index), "intermediate_size": size})
            if own_size != size:
                own["intermediate_size"] = own_size
        own_settings[index] = own
    return dataclasses.replace(config, intermediate_size=size, block_settings=own_settings)


def _function_form_structure(model, base_type, architecture: Architecture, blocks, indices, request) -> dict:
    """``form="glu"``: the ``RetrofitConfig`` fields saying where the functions go (``mlp_attribute``, the MLP's
    ``mlp_layout``, its channel count as ``intermediate_size``); refuses an MLP kallm cannot rebuild exactly."""
    if request.intermediate_size is not None:
        raise ValueError(f"form='glu' keeps the MLP's {request.intermediate_size!r} channels as they are, so it takes "
                         f"no intermediate_size")
    activation = getattr(model.config, architecture.activation_config, None)
    if activation not in EXACT_ACTIVATIONS:
        raise ValueError(
            f"form='glu' adds its functions to the output of the MLP's own activation, which is exact only for "
            f"activations that act on each value alone; this {base_type} model's {architecture.activation_config} is "
            f"{activation!r}. Supported activations: {', '.join(EXACT_ACTIVATIONS)}; supported families: "
            f"{', '.join(supported_model_types())}"
        )
    layout = dict(architecture.mlp_layout)
    spread = bool(architecture.bypassed_attributes)  # the MLP's parts are the block's own attributes (OPT)
    holders = {index: blocks[index] if spread else getattr(blocks[index], architecture.mlp_attribute)
               for index in indices}
    for index, holder in holders.items():
        missing = [name for name in layout.values() if not isinstance(getattr(holder, name, None), nn.Module)]
        if missing:
            raise ValueError(
                f"form='glu' rebuilds the {base_type} MLP from its parts {layout}, but block {index}'s "
                f"{type(holder).__name__} has no {missing}, so kallm cannot express it exactly; supported families: "
                f"{', '.join(supported_model_types())}"
            )
    down = getattr(holders[indices[0]], layout["down"])
    channels = getattr(down, "in_features", None) or down.nx  # nn.Linear, or transformers' Conv1D (GPT-2)
    if spread:  # only the activation is replaced; the projections stay where they are
        return {"mlp_attribute": layout["activation"], "bypassed_attributes": [], "mlp_layout": {},
                "intermediate_size": channels}
    return {"mlp_attribute": architecture.mlp_attribute, "bypassed_attributes": [], "mlp_layout": layout,
            "intermediate_size": channels}


def _compute_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def _check_exact_start(model, saved: _SavedState, index: int) -> None:
    """``form="glu"`` must compute what the original did: compare block ``index``'s new module with the one it
    replaced on random inputs (in eval mode, so that no dropout draws differ)."""
    config = read_retrofit_config(model.config)
    new = getattr(model.get_submodule(config.blocks_path)[index], config.mlp_attribute)
    original = next(module for _, name, module in saved.feedforwards[index] if name == config.mlp_attribute)
    parameter = next(new.parameters())
    if parameter.is_meta:  # a shape-only model computes nothing
        return
    width = config.hidden_size if config.mlp_layout else config.intermediate_size
    inputs = torch.randn(3, width, generator=torch.Generator().manual_seed(0)).to(parameter.device, parameter.dtype)
    modes = {module: module.training for module in (*new.modules(), *original.modules())}
    new.eval(), original.eval()
    try:
        expected, got = original(inputs), new(inputs)
    finally:
        for module, training in modes.items():
            module.training = training
    if not torch.equal(expected, got):
        raise ValueError(
            f"form='glu' did not reproduce block {index}'s MLP exactly (largest difference "
            f"{(expected - got).abs().max().item():.3g}): this {config.base_model_type} model's MLP computes something "
            f"else than its layout {config.mlp_layout} says; the model was left unchanged"
        )


def _feedforward_parameters(block, architecture: Architecture) -> int:
    names = (architecture.mlp_attribute, *architecture.bypassed_attributes)
    return sum(count_parameters(getattr(block, name)) for name in names)


def _extend(old: RetrofitConfig, new: RetrofitConfig) -> RetrofitConfig:
    """Add blocks to an already retrofitted model, if the config-wide KAN settings agree."""
    overlap = sorted(set(old.blocks) & set(new.blocks))
    if overlap:
        raise ValueError(
            f"blocks {overlap} are already KAN feedforwards (retrofitted: {old.blocks}); choose other blocks"
        )
    differing = [key for key in (*BLOCK_SETTINGS, "hidden_size", "form", "function_groups")
                 if getattr(old, key) != getattr(new, key)]
    if differing:
        detail = ", ".join(f"{key}: {getattr(old, key)!r} -> {getattr(new, key)!r}" for key in differing)
        raise ValueError(
            f"this model is already retrofitted with other KAN settings ({detail}); new blocks take the model's "
            f"settings, or settings of their own as blocks={{index: settings}}. Retrofit the original model "
            f"instead, or pass the same settings"
        )
    return dataclasses.replace(
        old, blocks=sorted(set(old.blocks) | set(new.blocks)),
        block_settings={**old.block_settings, **new.block_settings},
        # init records how the blocks started; None once they started differently
        init=old.init if old.init == new.init else None,
    )


def _check_kind_consistency(model, kind, indices):
    """One model is one experimental arm: KAN blocks and restarted MLPs never mix."""
    recorded = read_retrofit_config(model.config)
    if recorded is None:
        return
    if kind == "linear" and recorded.kind == "kan":
        raise ValueError(
            f"this model already has KAN feedforwards in blocks {recorded.blocks}; the linear restart is the "
            f"baseline arm, so apply kind='linear' to the original model instead"
        )
    if recorded.kind == "linear":
        if kind == "kan":
            raise ValueError(
                f"blocks {recorded.blocks} of this model were linear-restarted (kind='linear'); apply kind='kan' to "
                f"the original model instead of mixing both arms in one model"
            )
        overlap = sorted(set(recorded.blocks) & set(indices))
        if overlap:
            raise ValueError(f"blocks {overlap} were already linear-restarted; choose other blocks")


def _record(config: PretrainedConfig, retrofit_config: RetrofitConfig) -> None:
    """Store a linear restart's ``RetrofitConfig`` in the model's own (family) config as ``kan_config``."""
    config.kan_config = retrofit_config.to_dict()
    if hasattr(config, "kallm_restarted_layers"):  # kallm before schema version 2 recorded restarts there
        del config.kallm_restarted_layers


class _SavedState:
    """The class, configs and feedforwards ``model`` has now, to put back in whole (``undo``) or for some
    blocks (``restore_feedforwards``)."""

    def __init__(self, model, architecture: Architecture, indices):
        self.model, self.model_class = model, type(model)
        self.kan_config = getattr(model.config, "kan_config", None)
        self.configs = [(module, module.config) for module in model.modules()
                        if isinstance(getattr(module, "config", None), PretrainedConfig)]
        blocks = model.get_submodule(architecture.blocks_path)
        names = (architecture.mlp_attribute, *architecture.bypassed_attributes)
        self.feedforwards = {i: [(blocks[i], name, getattr(blocks[i], name)) for name in names] for i in indices}

    def restore_feedforwards(self, indices):
        for index in indices:
            for block, name, module in self.feedforwards[index]:
                setattr(block, name, module)

    def undo(self):
        self.restore_feedforwards(self.feedforwards)
        for module, config in self.configs:
            module.config = config
        if hasattr(self.model.config, "kan_config"):
            self.model.config.kan_config = self.kan_config
        self.model.__class__ = self.model_class


def _keep_the_best_fits(model, config: RetrofitConfig, report: dict, count: int, saved: _SavedState) -> None:
    """``blocks="auto"``: keep the ``count`` fitted candidates with the lowest ``AUTO_RANKING`` error, give the
    others their MLPs back, and record the errors and the choice in ``kan_config`` and the fit report."""
    errors = report[AUTO_RANKING]
    candidates = sorted(errors)
    chosen = sorted(sorted(candidates, key=lambda index: (errors[index], index))[:count])
    saved.restore_feedforwards([index for index in candidates if index not in chosen])
    selection = {
        "method": "lowest fit error", "ranked_by": AUTO_RANKING, "num_blocks": count, "candidates": candidates,
        "chosen": chosen, "calibration_tokens": report["calibration_tokens"],
        **{key: {str(index): round(float(value), 6) for index, value in report[key].items()}
           for key in ("relative_error", "ordinary_token_error")},
    }
    kept = [index for index in config.blocks if index not in candidates or index in chosen]
    model.config.kan_config = dataclasses.replace(config, blocks=kept, selection=selection).to_dict()
    report["selection"] = selection


def _convert_class(model, base_type, kan_config):
    """Turn a base-family model into its retrofitted class, in place, keeping every tensor."""
    new_config = config_as(model.config, KAN_CONFIG_CLASSES[base_type], kan_config)
    old_config = model.config
    for module in model.modules():
        if getattr(module, "config", None) is old_config:
            module.config = new_config
    model.__class__ = retrofitted_class(model, base_type)


@torch.no_grad()
def _restart_feedforwards(model, architecture, indices):
    """The research's "linear restart": fresh weights in the original MLP shape."""
    std = getattr(model.config, "initializer_range", None) or 0.02
    blocks = model.get_submodule(architecture.blocks_path)
    for index in indices:
        for name in (architecture.mlp_attribute, *architecture.bypassed_attributes):
            for module in getattr(blocks[index], name).modules():
                weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
                if isinstance(weight, torch.Tensor):
                    weight.normal_(0.0, std)
                if isinstance(bias, torch.Tensor):
                    bias.zero_()
