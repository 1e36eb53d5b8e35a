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
from .surgery import retrofit, set_trainable, summary, supported_model_types

register_with_transformers()

__version__ = "0.1.0"


def __getattr__(name):
    # kallm.heal pulls in the training stack (accelerate, datasets); imported on first use only.
    if name == "heal":
        from .train.heal import heal

        return heal
    raise AttributeError(f"module 'kallm' has no attribute {name!r}")


__all__ = [
    "Basis",
    "KANFeedForward",
    "KANLinear",
    "RecurrenceBasis",
    "intermediate_size_for_budget",
    "heal",
    "list_bases",
    "load_model",
    "push_to_hub",
    "register_basis",
    "retrofit",
    "set_trainable",
    "summary",
    "supported_model_types",
]
