"""kallm: retrofit Hugging Face causal LMs with Kolmogorov-Arnold Network feedforwards.

``import kallm`` is light: each name below loads its module (and torch, transformers) on first use, so that
``kallm --help`` answers at once. kallm's model classes still register with transformers' Auto classes at
``import kallm``, and its LoRA layer for KAN layers with PEFT: at once when the library is loaded, otherwise as
soon as it is (see ``_imports``).
"""

import importlib

from ._imports import install_moved_module_finder, register_when_libraries_load

__version__ = "0.1.0"

#: public name -> the kallm module defining it, imported on first use
_EXPORTS = {
    "Basis": "core",
    "KANFeedForward": "core",
    "KANLinear": "core",
    "RecurrenceBasis": "core",
    "RetrofitConfig": "core",
    "intermediate_size_for_budget": "core",
    "list_bases": "core",
    "register_basis": "core",
    "register_with_transformers": "core",
    "load_delta": "checkpoints",
    "save_delta": "checkpoints",
    "load_model": "checkpoints",
    "OnnxCheck": "export",
    "check_onnx": "export",
    "export_onnx": "export",
    "push_to_hub": "checkpoints",
    "HealConfig": "healing",
    "heal": "healing",
    "ConversionReport": "surgery",
    "KANAdapterConfig": "finetune",
    "kan_adapter_config": "finetune",
    "convert": "surgery",
    "load_adapter": "finetune",
    "lora_config": "finetune",
    "lora_targets": "finetune",
    "load_quantized": "surgery",
    "quantize": "surgery",
    "retrofit": "surgery",
    "save_quantized": "surgery",
    "parameter_groups": "train.parameter_groups",
    "set_trainable": "surgery",
    "shrink": "surgery",
    "summary": "surgery",
    "supported_model_types": "surgery",
    "with_kan_lora": "finetune",
}

__all__ = [name for name in _EXPORTS if name != "register_with_transformers"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    else:  # a submodule, such as kallm.core, that an eager import used to load as a side effect
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


install_moved_module_finder()
register_when_libraries_load()
