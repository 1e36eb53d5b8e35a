"""Model surgery: the architecture descriptions, retrofit, fit init, convert, shrink, quantize, trainable policies."""

from .._imports import moved_name
from .architectures import ARCHITECTURES, Architecture, supported_model_types
from .convert import ConversionReport, convert
from .quantize import load_quantized, quantize, save_quantized
from .retrofit import retrofit, retrofitted_blocks, retrofitted_layers
from .shrink import shrink
from .trainable import POLICIES, set_trainable, summary


def __getattr__(name: str):
    return moved_name(__name__, name)
