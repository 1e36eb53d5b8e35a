"""Configs of retrofitted models: the base family's config plus a ``kan_config`` dict.

``kan_config`` (schema version 1) describes the retrofit completely, so that a model's
``__init__`` can rebuild it before weights are loaded:

    schema_version      int, 1
    base_model_type     the base family's model_type ("llama", "gpt2", ...)
    base_model          where the base weights came from (informational)
    layers              sorted list of retrofitted decoder block indices
    blocks_path         dotted path of the decoder block list ("model.layers")
    mlp_attribute       attribute of a block that holds the feedforward ("mlp", "fc1")
    bypassed_attributes attributes replaced by identities (OPT's "activation_fn", "fc2")
    hidden_size         feedforward input/output size
    intermediate_size   KAN feedforward inner size
    basis, degree       basis spec and degree (see bases.py)
    layer_options       further KANLinear options (input_map, alpha, grid_size, ...)

All checks of a ``kan_config`` live here: ``validate_kan_config`` (the schema, field by field,
run whenever a config is built or loaded) and ``check_kan_config_fits_model`` (what depends on
the built model, run by the model classes before they install the KAN feedforwards).

Part of kallm's portable core: plain torch + transformers, sibling imports only.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from .layers import KANFeedForward

KAN_SCHEMA_VERSION = 1
KAN_CONFIG_KEYS = (
    "schema_version", "base_model_type", "base_model", "layers", "blocks_path", "mlp_attribute",
    "bypassed_attributes", "hidden_size", "intermediate_size", "basis", "degree", "layer_options",
)
#: KANLinear arguments that place tensors; a config never carries them (the model's dtype and device rule).
_PLACEMENT_OPTIONS = ("device", "dtype")


def validate_kan_config(kan_config, base_model_type: str | None = None) -> None:
    """Refuse a ``kan_config`` this code cannot rebuild exactly, naming the field and what it must be.

    ``None`` (a retrofitted class without KAN blocks) passes. ``base_model_type``, when given,
    is the family the config class belongs to. What depends on the built model (``blocks_path``,
    the block attributes, ``hidden_size``) is checked by ``check_kan_config_fits_model``.
    """
    if kan_config is None:
        return
    if not isinstance(kan_config, dict):
        raise ValueError(f"kan_config must be a dict (a JSON object) or null, got {kan_config!r}")
    version = kan_config.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(
            f"kan_config has no integer schema_version >= 1 (got {version!r}); it was not written by kallm"
        )
    if version > KAN_SCHEMA_VERSION:
        raise ValueError(
            f"this checkpoint's kan_config schema_version is {version}, but the installed kallm code only "
            f"understands versions up to {KAN_SCHEMA_VERSION}; upgrade kallm (pip install -U kallm) to load it"
        )
    missing = [key for key in KAN_CONFIG_KEYS if key not in kan_config]
    if missing:
        raise ValueError(f"kan_config is missing {missing}; expected keys: {', '.join(KAN_CONFIG_KEYS)}")
    unknown = sorted(str(key) for key in kan_config if key not in KAN_CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"kan_config has unknown keys {unknown} for schema_version {version}; expected keys: "
            f"{', '.join(KAN_CONFIG_KEYS)}"
        )
    for key in ("base_model_type", "base_model", "blocks_path", "mlp_attribute", "basis"):
        _check_text(key, kan_config[key])
    if base_model_type is not None and kan_config["base_model_type"] != base_model_type:
        raise ValueError(
            f"kan_config.base_model_type is {kan_config['base_model_type']!r}, but this config class retrofits "
            f"{base_model_type!r} models"
        )
    layers = kan_config["layers"]
    valid_layers = isinstance(layers, list) and layers and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
    )
    if not valid_layers or layers != sorted(set(layers)):
        raise ValueError(
            f"kan_config.layers must be a non-empty, sorted list of distinct non-negative block indices, got {layers!r}"
        )
    bypassed = kan_config["bypassed_attributes"]
    if not isinstance(bypassed, list) or len(set(map(repr, bypassed))) != len(bypassed):
        raise ValueError(f"kan_config.bypassed_attributes must be a list of distinct attribute names, got {bypassed!r}")
    for name in bypassed:
        _check_text("bypassed_attributes", name)
    for key in ("hidden_size", "intermediate_size", "degree"):
        value = kan_config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"kan_config.{key} must be a positive integer, got {value!r}")
    options = kan_config["layer_options"]
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise ValueError(f"kan_config.layer_options must be a dict of KANLinear options (a JSON object), got {options!r}")
    placement = sorted(set(_PLACEMENT_OPTIONS) & set(options))
    if placement:
        raise ValueError(f"kan_config.layer_options may not hold {placement}: the model's own device and dtype rule")
    try:
        # Counting builds every basis with every option, running all of their checks, and allocates nothing.
        KANFeedForward.count_parameters(
            kan_config["hidden_size"], kan_config["intermediate_size"], kan_config["basis"], kan_config["degree"],
            **options,
        )
    except (TypeError, ValueError) as error:
        hint = ""
        if "unknown basis" in str(error):
            hint = "; a basis added with kallm.register_basis must be registered before the checkpoint is loaded"
        raise ValueError(f"kan_config's basis, degree and layer_options do not build a KAN feedforward: {error}{hint}") \
            from error


def check_kan_config_fits_model(kan_config: dict, model) -> None:
    """Refuse a (schema-valid) ``kan_config`` that does not describe ``model``'s structure.

    ``blocks_path`` must name the block list, every listed block must exist and hold
    ``mlp_attribute`` and ``bypassed_attributes``, and ``hidden_size`` must be the model's.
    """
    validate_kan_config(kan_config)
    name = type(model).__name__
    path = blocks_path_in(model, kan_config["blocks_path"])
    try:
        blocks = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"kan_config.blocks_path {path!r} names no submodule of {name}") from None
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ValueError(
            f"kan_config.blocks_path {path!r} names a {type(blocks).__name__} in {name}, not a list of blocks"
        )
    too_high = [i for i in kan_config["layers"] if i >= len(blocks)]
    if too_high:
        raise ValueError(f"kan_config.layers lists blocks {too_high}, but {name} has {len(blocks)} blocks (0..{len(blocks) - 1})")
    for key in ("mlp_attribute", "bypassed_attributes"):
        names = kan_config[key] if key == "bypassed_attributes" else [kan_config[key]]
        for index in kan_config["layers"]:
            absent = [attribute for attribute in names if not isinstance(getattr(blocks[index], attribute, None), nn.Module)]
            if absent:
                raise ValueError(f"kan_config.{key}: block {index} at {path!r} has no submodules {absent}")
    model_hidden = getattr(model.config, "hidden_size", None)
    if model_hidden is not None and kan_config["hidden_size"] != model_hidden:
        raise ValueError(
            f"kan_config.hidden_size is {kan_config['hidden_size']}, but the model's hidden_size is {model_hidden}"
        )


def blocks_path_in(model, blocks_path: str) -> str:
    """``blocks_path`` (written from the causal LM) as seen from ``model``: a base model without a head
    (``LlamaModel``) lacks the causal LM's first name, its ``base_model_prefix`` ("model.layers" -> "layers")."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    if blocks_path.startswith(prefix) and not hasattr(model, prefix[:-1]):
        return blocks_path[len(prefix):]
    return blocks_path


def _check_text(key, value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"kan_config.{key} must be a non-empty string, got {value!r}")


class KANConfigMixin:
    """Validates ``kan_config`` as soon as a config is built or loaded.

    Each retrofitted config class names the config class of the family it retrofits in ``base_config_class``.
    """

    def __post_init__(self, **kwargs):
        validate_kan_config(self.kan_config, self.base_config_class.model_type)
        super().__post_init__(**kwargs)


class KALlamaConfig(KANConfigMixin, LlamaConfig):
    model_type = "kallama"
    base_config_class = LlamaConfig
    kan_config: dict | None = None


class KAMistralConfig(KANConfigMixin, MistralConfig):
    model_type = "kamistral"
    base_config_class = MistralConfig
    kan_config: dict | None = None


class KAQwen2Config(KANConfigMixin, Qwen2Config):
    model_type = "kaqwen2"
    base_config_class = Qwen2Config
    kan_config: dict | None = None


class KAQwen3Config(KANConfigMixin, Qwen3Config):
    model_type = "kaqwen3"
    base_config_class = Qwen3Config
    kan_config: dict | None = None


class KAGemmaConfig(KANConfigMixin, GemmaConfig):
    model_type = "kagemma"
    base_config_class = GemmaConfig
    kan_config: dict | None = None


class KAGemma2Config(KANConfigMixin, Gemma2Config):
    model_type = "kagemma2"
    base_config_class = Gemma2Config
    kan_config: dict | None = None


class KAPhi3Config(KANConfigMixin, Phi3Config):
    model_type = "kaphi3"
    base_config_class = Phi3Config
    kan_config: dict | None = None


class KAGPT2Config(KANConfigMixin, GPT2Config):
    model_type = "kagpt2"
    base_config_class = GPT2Config
    kan_config: dict | None = None


class KAGPTNeoXConfig(KANConfigMixin, GPTNeoXConfig):
    model_type = "kagpt_neox"
    base_config_class = GPTNeoXConfig
    kan_config: dict | None = None


class KAOPTConfig(KANConfigMixin, OPTConfig):
    model_type = "kaopt"
    base_config_class = OPTConfig
    kan_config: dict | None = None


#: base model_type -> retrofitted config class
KAN_CONFIG_CLASSES = {
    cls.base_config_class.model_type: cls
    for cls in (
        KALlamaConfig, KAMistralConfig, KAQwen2Config, KAQwen3Config, KAGemmaConfig,
        KAGemma2Config, KAPhi3Config, KAGPT2Config, KAGPTNeoXConfig, KAOPTConfig,
    )
}
