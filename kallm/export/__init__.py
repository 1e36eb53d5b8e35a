"""Export to other runtimes: ONNX with its KV cache, checked against PyTorch (``onnx``)."""

from .onnx import OnnxCheck, check_onnx, export_onnx
