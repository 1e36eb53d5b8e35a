"""kallm's portable core: bases, KAN layers, the fused op, config and model classes.

Every module in this folder imports only torch, transformers and its siblings, because
``save_pretrained`` copies these files next to each checkpoint so that
``trust_remote_code=True`` users can load it without kallm installed.
"""

from .bases import Basis, RecurrenceBasis, list_bases, make_basis, register_basis
from .configuration_kallm import KAN_CONFIG_CLASSES, KAN_SCHEMA_VERSION, validate_kan_config
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


# Importing kallm's core makes transformers' Auto classes know its model classes.
register_with_transformers()
