"""Model surgery: architecture adapters, retrofit, trainable policies."""

from .adapters import ADAPTERS, ArchitectureAdapter, supported_model_types
from .convert import ConversionReport, convert
from .kan_adapter import KANAdapterConfig, kan_adapter_config
from .lora import KANLoraLinear, load_adapter, lora_config, lora_targets, with_kan_lora
from .quantize import load_quantized, quantize, save_quantized
from .retrofit import retrofit, retrofitted_blocks, retrofitted_layers
from .shrink import shrink
from .trainable import PARAMETER_ROLES, POLICIES, parameter_groups, set_trainable, summary
