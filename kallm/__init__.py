"""kallm: retrofit Hugging Face causal LMs with Kolmogorov-Arnold Network feedforwards."""

from .core import (
    Basis,
    KANFeedForward,
    KANLinear,
    RecurrenceBasis,
    intermediate_size_for_budget,
    list_bases,
    register_basis,
    register_with_transformers,
)
from .loading import load_model, push_to_hub
from .surgery import (
    ConversionReport,
    convert,
    load_adapter,
    lora_config,
    lora_targets,
    retrofit,
    set_trainable,
    summary,
    supported_model_types,
    with_kan_lora,
)

register_with_transformers()

__version__ = "0.1.0"

__all__ = [
    "Basis",
    "ConversionReport",
    "KANFeedForward",
    "KANLinear",
    "RecurrenceBasis",
    "convert",
    "intermediate_size_for_budget",
    "list_bases",
    "load_adapter",
    "load_model",
    "lora_config",
    "lora_targets",
    "push_to_hub",
    "register_basis",
    "retrofit",
    "set_trainable",
    "summary",
    "supported_model_types",
    "with_kan_lora",
]
