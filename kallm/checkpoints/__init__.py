"""Checkpoints: load a model from a folder, a hub id, a GGUF file or a delta folder; save it atomically; save only what
a retrofit changed (delta checkpoints)."""

from .delta import save_delta
from .load import DEFAULT_MODEL, load_delta, load_model, push_to_hub
from .save import save_checkpoint
