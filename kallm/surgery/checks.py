"""What kallm's surgery checks about a model before it touches it.

Every check raises before anything changes, with a message naming the problem and the way
out; docs/retrofitting.md ("What retrofit refuses, and why") explains each one.
"""

from __future__ import annotations

import re
import sys

from torch import nn

from ..checkpoints.load import is_dequantized_gguf, quantization_method
from ..core import KAN_CONFIG_CLASSES, KAN_MODEL_CLASSES, KAN_SEQUENCE_CLASSIFICATION_CLASSES, KANModelMixin
from ..core.function_layers import is_retrofitted_feedforward
from ..core.layers import is_kan_feedforward
from ..core.retrofit_config import RetrofitConfig, read_retrofit_config
from .architectures import Architecture, architecture_for

#: parts of the class names of quantized linear layers: bitsandbytes (Linear4bit, Linear8bitLt),
#: GPTQ (QuantLinear and its kernels' variants), AWQ (WQLinear_GEMM, ...), HQQ, optimum-quanto, fp8, GGUF blocks
QUANTIZED_LAYER_MARKERS = ("Linear4bit", "Linear8bitLt", "QuantLinear", "WQLinear", "HQQLinear", "QLinear", "FP8Linear",
                           "GgufLinear")
#: how many tensor names an error message lists before it just counts the rest
LISTED_NAMES = 4


def causal_lm_parts(
    model: nn.Module, action: str, allow_adapters: bool = False
) -> tuple[str, Architecture, nn.ModuleList]:
    """``(base model_type, architecture, decoder blocks)`` of a supported causal LM or sequence classifier.

    ``action`` names the caller in error messages ("retrofit", "set_trainable", ...). Models with
    PEFT adapters inside are refused unless ``allow_adapters`` (callers that unwrap a PeftModel).
    """
    if not allow_adapters:
        _refuse_peft(model, action)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(f"{action} needs a transformers causal LM, got {type(model).__name__}")
    base_type = base_model_type(config)
    architecture = architecture_for(base_type)
    family_classes = retrofittable_classes(base_type)
    if not isinstance(model, tuple(family_classes)):
        names = " or ".join(cls.__name__ for cls in family_classes)
        raise TypeError(
            f"{action} needs a causal LM or a sequence classifier ({names} for model_type {base_type!r}), got "
            f"{type(model).__name__}; load the model with AutoModelForCausalLM or AutoModelForSequenceClassification, "
            f"not AutoModel or another task's class"
        )
    return base_type, architecture, model.get_submodule(architecture.blocks_path)


def base_model_type(config) -> str:
    """The model_type of the family a (possibly retrofitted) config belongs to."""
    kan_config = getattr(config, "kan_config", None)
    if kan_config:
        return kan_config["base_model_type"]
    # A retrofitted class without KAN blocks yet (built from a config whose kan_config is None).
    bases = [base for base, config_class in KAN_CONFIG_CLASSES.items() if config_class.model_type == config.model_type]
    return bases[0] if bases else config.model_type


def retrofittable_classes(base_type: str) -> dict[type, type]:
    """The family's classes kallm retrofits (its causal LM and sequence classifier) -> their retrofitted classes."""
    config_class = KAN_CONFIG_CLASSES[base_type]
    family_classes = {}
    for classes in (KAN_MODEL_CLASSES, KAN_SEQUENCE_CLASSIFICATION_CLASSES):
        kan_class = classes[config_class]
        family_classes[next(cls for cls in kan_class.__bases__ if cls is not KANModelMixin)] = kan_class
    return family_classes


def retrofitted_class(model, base_type: str) -> type:
    """The retrofitted class ``model`` (a causal LM or classifier of family ``base_type``) becomes."""
    return next(kan_class for family_class, kan_class in retrofittable_classes(base_type).items()
                if isinstance(model, family_class))


def _refuse_peft(model, action):
    wrapped = [name for name, module in model.named_modules() if _is_peft_module(module)]
    if wrapped:
        where = type(model).__name__ if wrapped[0] == "" else f"{wrapped[0]} ({type(model.get_submodule(wrapped[0])).__name__})"
        raise TypeError(
            f"{action} got a model with PEFT adapters ({where}); kallm works on the plain causal LM: apply it "
            f"before wrapping the model with peft, or merge the adapters first (model = model.merge_and_unload())"
        )


def _is_peft_module(module: nn.Module) -> bool:
    """A PEFT wrapper or adapter layer, PEFT's own or one of kallm's (LoRA on KAN layers, KAN adapters)."""
    if type(module).__module__.split(".")[0] == "peft":
        return True
    tuners = sys.modules.get("peft.tuners.tuners_utils")  # without PEFT loaded, no model holds its layers
    return tuners is not None and isinstance(module, tuners.BaseTunerLayer)


def retrofitted_kan_config(model, architecture: Architecture, blocks) -> RetrofitConfig | None:
    """The model's ``RetrofitConfig`` if it has KAN blocks (else None), checked against the blocks
    that actually hold KAN feedforwards, whoever built or loaded the model."""
    recorded = read_retrofit_config(model.config)
    kan_config = recorded if recorded is not None and recorded.kind == "kan" else None
    listed = sorted(kan_config.blocks) if kan_config else []
    attribute = kan_config.mlp_attribute if kan_config else architecture.mlp_attribute  # form="glu" may take another
    found = [i for i, block in enumerate(blocks) if is_retrofitted_feedforward(getattr(block, attribute, None))]
    if listed != found:
        raise ValueError(
            f"config.kan_config lists KAN feedforwards in blocks {listed}, but blocks {found} hold them: the model "
            f"and its config disagree, so kallm cannot tell which blocks are retrofitted; reload the model from its "
            f"checkpoint"
        )
    return kan_config


def feedforward_attributes(model, architecture: Architecture) -> tuple[str, ...]:
    """The block attributes a retrofit replaced, as the model's config records them (``form="glu"`` replaces OPT's
    activation alone), else the architecture's."""
    recorded = read_retrofit_config(model.config)
    if recorded is not None and recorded.kind == "kan":
        return (recorded.mlp_attribute, *recorded.bypassed_attributes)
    return (architecture.mlp_attribute, *architecture.bypassed_attributes)


def check_weights(model, architecture: Architecture, blocks, indices: list[int], runs_model: bool) -> None:
    """Refuse offloaded (meta-device) and quantized weights, which retrofit cannot replace.

    A model whose every tensor is on the meta device is a shape-only skeleton (parameter
    counts); it is accepted unless the retrofit has to run it (``runs_model``, init="fit").
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    on_meta = [name for name, tensor in tensors if tensor.is_meta]
    if on_meta and len(on_meta) < len(tensors):
        prefix = re.escape(architecture.blocks_path) + r"\.(\d+)\."
        meta_blocks = sorted({int(m.group(1)) for name in on_meta if (m := re.match(prefix, name))})
        raise ValueError(
            f"{len(on_meta)} of this model's tensors are on the meta device ({_some(on_meta)}"
            + (f"; decoder blocks {meta_blocks}" if meta_blocks else "")
            + "): their weights were offloaded (device_map with CPU or disk offload) or never loaded, so kallm "
            "cannot replace its feedforwards. Load the model fully first, e.g. from_pretrained(...) without "
            "device_map offload, on one device with enough memory"
        )
    if on_meta and runs_model:
        raise ValueError(
            "init='fit' runs the model on calibration text, but all its weights are on the meta device (a "
            "shape-only model); load the weights first, or use init='random'"
        )
    _refuse_quantized(model, architecture, blocks, indices)


def _refuse_quantized(model, architecture, blocks, indices):
    way_out = (
        "kallm replaces float feedforwards by float KAN layers and cannot retrofit quantized weights: load the "
        "model unquantized (without quantization_config, load_in_4bit or load_in_8bit), or dequantize it first "
        "(model.dequantize())"
    )
    tagged = getattr(model.config, "quantization_config", None) is not None or getattr(model, "hf_quantizer", None)
    # transformers tags a GGUF load as quantized also when it unpacked every weight to float: those it retrofits
    if tagged and not is_dequantized_gguf(model):
        raise ValueError(f"this model is quantized (quantization_config, method {quantization_method(model)!r}); "
                         f"{way_out}")
    for index in indices:
        for attribute in (architecture.mlp_attribute, *architecture.bypassed_attributes):
            feedforward = getattr(blocks[index], attribute)
            prefix = f"{architecture.blocks_path}.{index}.{attribute}"
            for name, module in feedforward.named_modules(prefix=prefix):
                layer_class = type(module).__name__
                if any(marker in layer_class for marker in QUANTIZED_LAYER_MARKERS):
                    raise ValueError(f"{name} is a quantized layer ({layer_class}); {way_out}")
            integer = [
                f"{prefix}.{name} ({tensor.dtype})"
                for name, tensor in [*feedforward.named_parameters(), *feedforward.named_buffers()]
                if not tensor.is_floating_point()
            ]
            if integer:
                raise ValueError(f"{_some(integer)} hold non-float (quantized) weights; {way_out}")


def check_adapter_fits_kan_blocks(model: nn.Module, names, source=None) -> None:
    """Refuse a PEFT adapter (LoRA or KAN adapter) that holds parts for KAN layers in blocks where ``model`` has
    no KAN feedforward: PEFT would apply the rest and drop those parts without a word.

    ``names``: the adapter's weight names or its target module names; a name without a block index (a suffix
    such as ``mlp.layers.0`` or ``mlp.gate``) tells nothing and is skipped. A model of a family kallm does not
    retrofit has no KAN layers of kallm's, so nothing is checked.
    """
    try:
        _, architecture, blocks = causal_lm_parts(model, "load_adapter", allow_adapters=True)
    except (TypeError, KeyError, ValueError):
        return
    kan_layer = re.compile(rf"(?:^|\.)(\d+)\.{re.escape(architecture.mlp_attribute)}\.(?:layers\.\d+|gate)(?:\.|$)")
    adapted = sorted({int(match.group(1)) for name in names if (match := kan_layer.search(name))})
    retrofitted = [i for i, block in enumerate(blocks)
                   if is_kan_feedforward(getattr(block, architecture.mlp_attribute))]
    lost = [i for i in adapted if i not in retrofitted]
    if lost:
        named = f"the adapter in {source}" if source else "the adapter"
        raise ValueError(
            f"{named} holds parts for KAN layers in blocks {adapted}, but this model has KAN feedforwards in blocks "
            f"{retrofitted or 'none'}: the parts for blocks {lost} would be dropped and the "
            f"adapter applied only in part; load it into a model retrofitted on blocks {adapted}, as the one it was "
            f"trained on"
        )


def target_names(peft_config) -> list[str]:
    """The module names a PEFT config targets, as listed (none for a regular expression)."""
    targets = getattr(peft_config, "target_modules", None)
    return [] if targets is None or isinstance(targets, str) else list(targets)


def _some(names: list[str]) -> str:
    listed = ", ".join(names[:LISTED_NAMES])
    return listed + (f" and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else "")
