"""kallm's portable core: bases, KAN layers, the fused op, config and model classes, the model card.

Every module in this folder imports only torch, transformers and its siblings, because
``save_pretrained`` copies these files next to each checkpoint so that
``trust_remote_code=True`` users can load it without kallm installed.
"""

from .bases import Basis, RecurrenceBasis, list_bases, make_basis, register_basis
from .configuration_kallm import KAN_CONFIG_CLASSES, KAN_SCHEMA_VERSION, retrofitted_config, validate_kan_config
from .kan_function import KANLinearFunction, kan_linear
from .layers import KANFeedForward, KANLinear, intermediate_size_for_budget
from .modeling_kallm import (
    KAN_AUTO_CLASSES,
    KAN_BASE_MODEL_CLASSES,
    KAN_MODEL_CLASSES,
    KAN_SEQUENCE_CLASSIFICATION_CLASSES,
    KANModelMixin,
)
from .retrofit_config import RetrofitConfig, kan_config_blocks, read_retrofit_config


def register_with_transformers() -> None:
    """Make ``AutoConfig``, ``AutoModelForCausalLM``, ``AutoModelForSequenceClassification`` and ``AutoModel``
    know the retrofitted families, and make ``save_pretrained`` write ``auto_map`` plus this folder's code next
    to the weights."""
    import transformers

    for config_class in KAN_MODEL_CLASSES:
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class()
    for auto_class, classes in KAN_AUTO_CLASSES.items():
        for config_class, model_class in classes.items():
            getattr(transformers, auto_class).register(config_class, model_class, exist_ok=True)
            model_class.register_for_auto_class(auto_class)
    _read_retrofitted_configs_as_such(transformers.AutoConfig)


def _read_retrofitted_configs_as_such(auto_config) -> None:
    """Have ``AutoConfig`` (and so every Auto model class) read a kallm checkpoint's config that plain transformers
    re-saved as its base family's (``model_type`` "llama", ``kan_config`` kept) as the retrofitted config, so that
    the KAN model loads rather than the family's own with fresh MLPs in the KAN blocks (``retrofitted_config``).
    transformers picks the config class by ``model_type`` alone, so kallm wraps its ``from_pretrained``.
    Idempotent."""
    read = auto_config.from_pretrained.__func__
    if getattr(read, "kallm_reads_retrofitted_configs", False):
        return

    def from_pretrained(cls, *args, **kwargs):
        result = read(cls, *args, **kwargs)
        config, *unused = result if isinstance(result, tuple) else (result,)
        converted = retrofitted_config(config)
        if converted is None:
            return result
        return (converted, *unused) if unused else converted

    from_pretrained.kallm_reads_retrofitted_configs = True
    from_pretrained.__doc__ = read.__doc__
    auto_config.from_pretrained = classmethod(from_pretrained)


# Importing kallm's core makes transformers' Auto classes know its model classes.
register_with_transformers()
