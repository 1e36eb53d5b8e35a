"""Fine-tuning on top of a retrofit, the PEFT way: LoRA on KAN layers (``lora``) and the KAN adapter, a small KAN
beside each projection (``kan_adapter``)."""

from .kan_adapter import KANAdapterConfig, kan_adapter_config
from .lora import KANLoraLinear, load_adapter, lora_config, lora_targets, with_kan_lora
