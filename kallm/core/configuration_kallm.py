"""Configs of retrofitted models: the base family's config plus a ``kan_config`` dict.

``kan_config`` is a ``RetrofitConfig`` (retrofit_config.py) as a JSON object: it describes the
retrofit completely, so that a model's ``__init__`` can rebuild it before weights are loaded. Its
schema, field by field, is the dataclass; docs/checkpoint-format.md lists it.

All checks of a ``kan_config`` live in the core: ``validate_kan_config`` (the schema, field by
field, run whenever a config is built or loaded) and ``check_kan_config_fits_model`` (what depends
on the built model, run by the model classes before they install the KAN feedforwards).

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

from .retrofit_config import SCHEMA_VERSION, RetrofitConfig, kan_config_blocks

KAN_SCHEMA_VERSION = SCHEMA_VERSION


def validate_kan_config(kan_config, base_model_type: str | None = None) -> RetrofitConfig | None:
    """The ``RetrofitConfig`` of a ``kan_config`` dict (None for None), refusing one this code cannot rebuild
    exactly with an error naming the field and what it must be.

    ``None`` (a retrofitted class without KAN blocks) passes. ``base_model_type``, when given,
    is the family the config class belongs to; such a class holds KAN feedforwards (a linear restart
    keeps its family's own class). What depends on the built model (``blocks_path``, the block
    attributes, ``hidden_size``) is checked by ``check_kan_config_fits_model``.
    """
    if kan_config is None:
        return None
    config = RetrofitConfig.from_dict(kan_config, base_model_type)
    if base_model_type is not None and config.kind != "kan":
        raise ValueError(
            f"kan_config.kind is {config.kind!r}, but a retrofitted config class holds KAN feedforwards; a linear "
            f"restart keeps the {base_model_type!r} family's own classes"
        )
    return config


def check_kan_config_fits_model(kan_config: dict, model) -> None:
    """Refuse a (schema-valid) ``kan_config`` that does not describe ``model``'s structure.

    ``blocks_path`` must name the block list, every listed block must exist and hold
    ``mlp_attribute`` and ``bypassed_attributes``, and ``hidden_size`` must be the model's.
    """
    config = validate_kan_config(kan_config)
    name = type(model).__name__
    path = blocks_path_in(model, config.blocks_path)
    try:
        blocks = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"kan_config.blocks_path {path!r} names no submodule of {name}") from None
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ValueError(
            f"kan_config.blocks_path {path!r} names a {type(blocks).__name__} in {name}, not a list of blocks"
        )
    too_high = [i for i in config.blocks if i >= len(blocks)]
    if too_high:
        raise ValueError(
            f"kan_config.blocks lists blocks {too_high}, but {name} has {len(blocks)} blocks (0..{len(blocks) - 1})"
        )
    for key in ("mlp_attribute", "bypassed_attributes"):
        names = config.bypassed_attributes if key == "bypassed_attributes" else [config.mlp_attribute]
        for index in config.blocks:
            absent = [attribute for attribute in names if not isinstance(getattr(blocks[index], attribute, None), nn.Module)]
            if absent:
                raise ValueError(f"kan_config.{key}: block {index} at {path!r} has no submodules {absent}")
    model_hidden = getattr(model.config, "hidden_size", None)
    if model_hidden is not None and config.hidden_size != model_hidden:
        raise ValueError(
            f"kan_config.hidden_size is {config.hidden_size}, but the model's hidden_size is {model_hidden}"
        )


def blocks_path_in(model, blocks_path: str) -> str:
    """``blocks_path`` (written from the causal LM) as seen from ``model``: a base model without a head
    (``LlamaModel``) lacks the causal LM's first name, its ``base_model_prefix`` ("model.layers" -> "layers")."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    if blocks_path.startswith(prefix) and not hasattr(model, prefix[:-1]):
        return blocks_path[len(prefix):]
    return blocks_path


class KANConfigMixin:
    """Validates ``kan_config`` as soon as a config is built or loaded (and upgrades an older schema version).

    Each retrofitted config class names the config class of the family it retrofits in ``base_config_class``.
    """

    def __post_init__(self, **kwargs):
        retrofit_config = validate_kan_config(self.kan_config, self.base_config_class.model_type)
        if retrofit_config is not None:
            # Configs saved by older kallm versions are read in today's schema, and saved in it again.
            self.kan_config = retrofit_config.to_dict()
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


def retrofitted_config(config):
    """The retrofitted config (``KALlamaConfig``, ...) of a base family's ``config`` that carries a ``kan_config``
    of KAN feedforwards, or None for any other config.

    Such a config is a kallm checkpoint's, re-saved by plain transformers (``model_type`` "llama"): loaded as
    the family's own model, its KAN blocks would get freshly initialised MLPs, with a missing-keys warning at
    most. A linear restart (``kind`` "linear") keeps its family's classes, so it is no such config.
    """
    if isinstance(config, KANConfigMixin) or not kan_config_blocks(config):
        return None
    config_class = KAN_CONFIG_CLASSES.get(config.model_type)
    if config_class is None:
        recorded = KAN_CONFIG_CLASSES.get(config.kan_config.get("base_model_type"))
        raise ValueError(
            f"this config carries a kan_config (KAN feedforwards in blocks {kan_config_blocks(config)}) but its "
            f"model_type {config.model_type!r} is no family kallm retrofits ({', '.join(KAN_CONFIG_CLASSES)}): "
            f"loaded as a plain model, its KAN blocks would be freshly initialised MLPs"
            + (f"; set model_type in config.json to {recorded.model_type!r}, as kallm saved it" if recorded else "")
        )
    return config_as(config, config_class, config.kan_config)


def config_as(config, config_class, kan_config: dict | None):
    """``config``'s values as a ``config_class`` with ``kan_config``, keeping what transformers holds beside the
    values (where the config was loaded from, the attention implementation chosen at load)."""
    dropped = ("model_type", "architectures", "auto_map", "kan_config")
    values = {key: value for key, value in config.to_dict().items() if key not in dropped}
    new_config = config_class(**values, kan_config=kan_config)
    new_config._name_or_path = config._name_or_path
    for attribute in ("_attn_implementation_internal", "_experts_implementation_internal"):
        if hasattr(config, attribute):
            setattr(new_config, attribute, getattr(config, attribute))
    return new_config
