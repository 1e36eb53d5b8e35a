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

Part of kallm's portable core: plain torch + transformers, sibling imports only.
"""

from __future__ import annotations

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

KAN_SCHEMA_VERSION = 1
KAN_CONFIG_KEYS = (
    "schema_version", "base_model_type", "base_model", "layers", "blocks_path", "mlp_attribute",
    "bypassed_attributes", "hidden_size", "intermediate_size", "basis", "degree", "layer_options",
)


def validate_kan_config(kan_config) -> None:
    """Refuse a ``kan_config`` this code cannot rebuild exactly."""
    if kan_config is None:
        return
    if not isinstance(kan_config, dict):
        raise TypeError(f"kan_config must be a dict, got {type(kan_config).__name__}")
    version = kan_config.get("schema_version")
    if not isinstance(version, int):
        raise ValueError(f"kan_config has no integer schema_version (got {version!r}); it was not written by kallm")
    if version > KAN_SCHEMA_VERSION:
        raise ValueError(
            f"this checkpoint's kan_config schema_version is {version}, but the installed kallm code only "
            f"understands versions up to {KAN_SCHEMA_VERSION}; upgrade kallm (pip install -U kallm) to load it"
        )
    missing = [key for key in KAN_CONFIG_KEYS if key not in kan_config]
    if missing:
        raise ValueError(f"kan_config is missing {missing}; expected keys: {', '.join(KAN_CONFIG_KEYS)}")


class KANConfigMixin:
    """Validates ``kan_config`` as soon as a config is built or loaded."""

    def __post_init__(self, **kwargs):
        validate_kan_config(self.kan_config)
        super().__post_init__(**kwargs)


class KALlamaConfig(KANConfigMixin, LlamaConfig):
    model_type = "kallama"
    kan_config: dict | None = None


class KAMistralConfig(KANConfigMixin, MistralConfig):
    model_type = "kamistral"
    kan_config: dict | None = None


class KAQwen2Config(KANConfigMixin, Qwen2Config):
    model_type = "kaqwen2"
    kan_config: dict | None = None


class KAQwen3Config(KANConfigMixin, Qwen3Config):
    model_type = "kaqwen3"
    kan_config: dict | None = None


class KAGemmaConfig(KANConfigMixin, GemmaConfig):
    model_type = "kagemma"
    kan_config: dict | None = None


class KAGemma2Config(KANConfigMixin, Gemma2Config):
    model_type = "kagemma2"
    kan_config: dict | None = None


class KAPhi3Config(KANConfigMixin, Phi3Config):
    model_type = "kaphi3"
    kan_config: dict | None = None


class KAGPT2Config(KANConfigMixin, GPT2Config):
    model_type = "kagpt2"
    kan_config: dict | None = None


class KAGPTNeoXConfig(KANConfigMixin, GPTNeoXConfig):
    model_type = "kagpt_neox"
    kan_config: dict | None = None


class KAOPTConfig(KANConfigMixin, OPTConfig):
    model_type = "kaopt"
    kan_config: dict | None = None


#: base model_type -> retrofitted config class
KAN_CONFIG_CLASSES = {
    cls.__mro__[2].model_type: cls
    for cls in (
        KALlamaConfig, KAMistralConfig, KAQwen2Config, KAQwen3Config, KAGemmaConfig,
        KAGemma2Config, KAPhi3Config, KAGPT2Config, KAGPTNeoXConfig, KAOPTConfig,
    )
}
