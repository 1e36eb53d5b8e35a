"""Weight-only quantization of a retrofitted model's KAN layers (and, on request, its linear layers) with torchao.

A KAN layer's coefficients are one ``(out, K * in)`` matrix used by one matrix multiply, exactly like a Linear
weight, so torchao's weight-only int8 (symmetric) applies to it unchanged: the weight becomes a torchao
``Int8Tensor`` and the op multiplies through ``F.linear``, which torchao implements. The input map, the bias and
basis parameters (``rational``'s denominators) stay in floating point.

The scales are per group of ``group_size`` weights of a row by default, not per row. A fitted KAN layer holds a few
columns far larger than the rest (the hidden unit that carries the massive activations of attention-sink tokens,
about 28 standard deviations in most rows of SmolLM2's fitted layers); with one scale per row those columns leave
the others a handful of int8 levels, and a fit-init retrofit of SmolLM2 lost 35-43% perplexity. Groups of up to 32
confine each large column to its own group (+0.4%).

Save and load: ``save_quantized`` writes the config, ``kallm_quantized.pt`` (the state dict with torchao's
tensors, read back with ``torch.load(weights_only=True)``) and ``kallm_quantization.json`` (what was quantized);
``load_quantized`` rebuilds the model from the config and loads those tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.save import check_output_folder, non_finite_tensors, replacing_checkpoint
from ..core.kan_function import _is_quantized
from ..core.layers import is_kan_linear
from ..core.retrofit_config import read_retrofit_config
from .checks import causal_lm_parts

#: weight formats ``quantize`` offers (torchao weight-only configs that run on CPU)
WEIGHT_FORMATS = ("int8",)
#: which layers ``quantize`` touches: the KAN layers, the decoder blocks' nn.Linear layers, or both
MODULE_CHOICES = ("kan", "linear", "all")
#: the default largest group of weights of a row that shares one scale
DEFAULT_GROUP_SIZE = 32
WEIGHTS_FILE = "kallm_quantized.pt"
SETTINGS_FILE = "kallm_quantization.json"
FORMAT_VERSION = 1


def quantize(
    model: nn.Module, weights: str = "int8", modules: str = "kan", group_size: int | None = DEFAULT_GROUP_SIZE
) -> nn.Module:
    """Quantize the weights of ``model``'s KAN layers in place with torchao (weight-only) and return it.

    Args:
        model: a causal LM of a supported family, usually retrofitted.
        weights: ``"int8"``: symmetric int8 (torchao ``Int8WeightOnlyConfig``).
        modules: ``"kan"`` (the KAN layers), ``"linear"`` (the ``nn.Linear`` layers of the decoder blocks:
            attention, and the MLPs kept; the LM head and embeddings stay as they are) or ``"all"`` (both).
        group_size: how many consecutive weights of a row share one scale, at most: each layer uses the largest
            divisor of its row length up to this (torchao's groups must divide the row). ``None``: one scale per
            row, the smallest and the least accurate form (see the module's docstring).

    The quantized model serves inference (``torch.no_grad()``); save it with ``kallm.save_quantized``.
    Everything is checked before any weight changes.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weights {weights!r}; valid choices: {', '.join(WEIGHT_FORMATS)}")
    if modules not in MODULE_CHOICES:
        raise ValueError(f"unknown modules {modules!r}; valid choices: {', '.join(MODULE_CHOICES)}")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None (one scale per row), got {group_size!r}")
    _, architecture, _ = causal_lm_parts(model, "quantize")
    targets = _targets(model, architecture.blocks_path, modules)
    if not targets:
        if modules == "kan" and _retrofit_form(model) == "glu":
            raise ValueError(
                "this model was retrofitted with form='glu', which keeps the MLPs' nn.Linear projections and has no "
                "KAN layers: pass modules='linear' to quantize them (its functions stay in floating point)"
            )
        if modules == "kan":
            raise ValueError(
                "this model has no KAN layers to quantize (it is not retrofitted: kallm.retrofit it first, or pass "
                "modules='linear' to quantize its linear layers)"
            )
        raise ValueError(f"this model has no layers to quantize with modules={modules!r}")
    _check_quantizable(targets)
    _torchao_config(weights)  # torchao is installed

    from torchao.quantization import quantize_

    for _, module in targets:
        config = _torchao_config(weights, _group_for(module.weight.shape[1], group_size))
        quantize_(module, config, filter_fn=lambda candidate, name, module=module: candidate is module)
    previous = getattr(model, "_kallm_quantization", None) or {"weights": weights, "modules": []}
    _mark_quantized(model, {"weights": weights, "modules": sorted({*previous["modules"], modules}),
                            "group_size": group_size})
    return model


def _mark_quantized(model: nn.Module, settings: dict) -> None:
    """Record ``settings`` for ``save_quantized``, and make ``model.save_pretrained`` refuse: transformers cannot
    write torchao's tensors of a model it did not quantize itself (it would leave a folder without weights)."""
    model._kallm_quantization = settings
    model.save_pretrained = _refuse_save_pretrained


def _refuse_save_pretrained(*args, **kwargs):
    raise ValueError("this model is quantized by kallm.quantize, and save_pretrained cannot write its int8 weights; "
                     "save it with kallm.save_quantized(model, folder) and load it with kallm.load_quantized(folder)")


def _retrofit_form(model) -> str | None:
    """The form of the model's retrofit (``"kan"`` or ``"glu"``), None if it has none."""
    recorded = read_retrofit_config(model.config)
    return recorded.form if recorded is not None and recorded.kind == "kan" else None


def _group_for(row_length: int, group_size: int | None) -> int | None:
    """The largest divisor of ``row_length`` up to ``group_size`` (None: the whole row)."""
    if group_size is None or group_size >= row_length:
        return None
    return max(size for size in range(1, group_size + 1) if row_length % size == 0)


def save_quantized(model: nn.Module, folder: str | os.PathLike, tokenizer=None) -> Path:
    """Save a model quantized by ``kallm.quantize`` (and ``tokenizer``, if given) into ``folder``.

    Files: ``config.json`` (and ``generation_config.json``), ``kallm_quantized.pt`` (every tensor, torchao's
    quantized ones included; loads with ``weights_only=True``) and ``kallm_quantization.json``. Written into a
    temporary sibling folder first, so a failed save leaves a previous checkpoint in ``folder`` whole.
    """
    settings = getattr(model, "_kallm_quantization", None)
    if not settings:
        raise ValueError(
            "this model was not quantized by kallm.quantize; save an unquantized model with model.save_pretrained"
        )
    check_output_folder(folder, (model,))
    import torchao

    record = {"format_version": FORMAT_VERSION, **settings, "torchao_version": torchao.__version__,
              "quantized_tensors": sorted(name for name, p in model.named_parameters() if _is_quantized(p))}
    with replacing_checkpoint(folder, model) as staging:
        model.config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        torch.save(model.state_dict(), staging / WEIGHTS_FILE)
        (staging / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(folder)


def load_quantized(folder: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by ``kallm.save_quantized``, ready for inference (eval mode)."""
    folder = Path(folder)
    missing = [name for name in ("config.json", WEIGHTS_FILE, SETTINGS_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a quantized kallm checkpoint: it lacks {', '.join(missing)} (kallm.save_quantized "
            f"writes them; load an unquantized checkpoint with AutoModelForCausalLM.from_pretrained)"
        )
    settings = json.loads((folder / SETTINGS_FILE).read_text())
    if settings.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder / SETTINGS_FILE} has format version {settings.get('format_version')!r}; this kallm reads "
            f"version {FORMAT_VERSION}"
        )
    _torchao_config(settings["weights"])  # torchao is installed and knows the format
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import core  # noqa: F401  (kallm's classes registered with transformers' Auto classes)

    config = AutoConfig.from_pretrained(folder)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    state = torch.load(folder / WEIGHTS_FILE, map_location=device, weights_only=True)
    _check_loaded_state(state, settings, folder / WEIGHTS_FILE)
    model.load_state_dict(state, strict=True, assign=True)
    for parameter in model.parameters():
        if _is_quantized(parameter):
            parameter.requires_grad_(False)
    model.tie_weights()
    _mark_quantized(model, {"weights": settings["weights"], "modules": settings["modules"],
                            "group_size": settings.get("group_size")})
    return model.eval()


def _check_loaded_state(state: dict, settings: dict, path: Path) -> None:
    """Refuse weights that are not what ``save_quantized`` wrote: a tensor recorded as quantized that holds no
    int8 data (replaced by a float tensor, say), or NaN or infinity anywhere (scales included)."""
    for name in settings.get("quantized_tensors", []):
        tensor = state.get(name)
        data = getattr(tensor, "qdata", None)
        if tensor is None or not _is_quantized(tensor) or data is None or data.dtype != torch.int8:
            found = "nothing" if tensor is None else f"a {type(tensor).__name__} of {tensor.dtype}"
            raise ValueError(f"{path} is damaged: {name} should hold int8 quantized weights "
                             f"({SETTINGS_FILE} records it so) but holds {found}; quantize and save the model again")
    bad = non_finite_tensors(state)
    if bad:
        raise ValueError(f"{path} is damaged: {bad} hold NaN or infinite values; quantize and save the model again")


def _targets(model, blocks_path, modules):
    targets = []
    for name, module in model.named_modules():
        in_blocks = name.startswith(blocks_path + ".")
        if modules in ("kan", "all") and is_kan_linear(module):
            targets.append((name, module))
        elif modules in ("linear", "all") and in_blocks and type(module) is nn.Linear:
            targets.append((name, module))
    return targets


def _check_quantizable(targets):
    done = [f"{name} ({type(module.weight).__name__})" for name, module in targets if _is_quantized(module.weight)]
    if done:
        raise ValueError(f"{done[0]} is already quantized; quantize each layer once")
    not_float = [f"{name} ({module.weight.dtype})" for name, module in targets if not module.weight.is_floating_point()]
    if not_float:
        raise ValueError(f"{not_float[0]} does not hold floating point weights; torchao quantizes float weights")
    on_meta = [name for name, module in targets if module.weight.is_meta]
    if on_meta:
        raise ValueError(f"{on_meta[0]}'s weight is on the meta device (not loaded); load the weights first")


def _torchao_config(weights, group_size=None):
    try:
        from torchao.quantization import Int8WeightOnlyConfig
        from torchao.quantization.granularity import PerGroup, PerRow
    except ImportError as error:
        raise ImportError(
            f"kallm's quantization needs torchao ({error}); install it with pip install 'kallm[quant]'"
        ) from error
    if weights == "int8":
        # the inductor settings it would change serve torch.compile on GPUs; leave the user's as they are
        granularity = PerRow() if group_size is None else PerGroup(group_size)
        return Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)
    raise ValueError(f"unknown weights {weights!r}; valid choices: {', '.join(WEIGHT_FORMATS)}")

