"""Causal LM classes of retrofitted models.

Each class subclasses its base family's class unchanged and, after the base model is
built, swaps the feedforward of the blocks listed in ``config.kan_config`` for
``KANFeedForward`` modules. ``from_pretrained`` therefore rebuilds the exact architecture
before it loads weights, with or without kallm installed (``trust_remote_code=True``
loads this folder's copy, which ``save_pretrained`` writes next to the weights).

Part of kallm's portable core: plain torch + transformers, sibling imports only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModel,
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    Gemma2Model,
    GemmaForCausalLM,
    GemmaForSequenceClassification,
    GemmaModel,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPTNeoXForCausalLM,
    GPTNeoXForSequenceClassification,
    GPTNeoXModel,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    MistralForCausalLM,
    MistralForSequenceClassification,
    MistralModel,
    OPTForCausalLM,
    OPTForSequenceClassification,
    OPTModel,
    Phi3ForCausalLM,
    Phi3ForSequenceClassification,
    Phi3Model,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen2Model,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
    Qwen3Model,
)
from transformers.initialization import guard_torch_init_functions
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .configuration_kallm import (
    KAGemma2Config,
    KAGemmaConfig,
    KAGPT2Config,
    KAGPTNeoXConfig,
    KALlamaConfig,
    KAMistralConfig,
    KAOPTConfig,
    KAPhi3Config,
    KAQwen2Config,
    KAQwen3Config,
    blocks_path_in,
    check_kan_config_fits_model,
)
from .delta_checkpoint import (
    DELTA_MANIFEST,
    DELTA_WEIGHTS,
    HUB_OPTIONS,
    check_base,
    delta_file,
    load_base_model,
    load_into,
    read_delta_manifest,
)
from .function_layers import build_function_form, is_retrofitted_feedforward
from .layers import KANFeedForward, KANLinear
from .model_card import warn_if_custom_basis, write_model_card
from .retrofit_config import RetrofitConfig


def install_kan_feedforwards(model: nn.Module, kan_config: dict, blocks=None) -> list[int]:
    """Replace the feedforward of ``blocks`` (default: all of ``kan_config["blocks"]``), each built from its
    own settings (``RetrofitConfig.settings``); ``form="glu"`` builds it around the MLP it replaces."""
    config = RetrofitConfig.from_dict(kan_config)
    block_list = model.get_submodule(blocks_path_in(model, config.blocks_path))
    indices = config.blocks if blocks is None else blocks
    replaced = (config.mlp_attribute, *config.bypassed_attributes)
    for index in indices:
        if not 0 <= index < len(block_list):
            raise ValueError(f"kan_config lists block {index}, but the model has {len(block_list)} blocks")
        block = block_list[index]
        device, dtype = _placement(model, [getattr(block, name) for name in replaced])
        if config.form == "glu":
            feedforward = build_function_form(getattr(block, config.mlp_attribute), config.mlp_layout, device=device,
                                              dtype=dtype, **config.function_arguments(index))
        else:
            feedforward = KANFeedForward(**config.feedforward_arguments(index), device=device, dtype=dtype)
        setattr(block, config.mlp_attribute, feedforward)
        for name in config.bypassed_attributes:
            setattr(block, name, nn.Identity())
    return list(indices)


def _placement(model: nn.Module, replaced: list[nn.Module]):
    """``(device, dtype)`` for a KAN feedforward: where the modules it replaces live (the meta
    device inside from_pretrained), in the model's compute dtype: that of their floating
    tensors, else the model's own (their weights may be stored in an integer format)."""
    tensors = [t for module in replaced for t in (*module.parameters(), *module.buffers())]
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
    if dtype is None:
        model_dtype = getattr(model, "dtype", None)
        dtype = model_dtype if isinstance(model_dtype, torch.dtype) and model_dtype.is_floating_point else None
    device = tensors[0].device if tensors else getattr(model, "device", None)
    return device, dtype


#: ``from_pretrained`` keywords about how a call reached the class (remote code, a PEFT adapter the Auto classes
#: look for), not about the model; transformers' private ones (``_from_auto``, ``_from_pipeline``...) likewise
CALL_ROUTING = ("trust_remote_code", "code_revision", "adapter_kwargs", "adapter_name")

#: names of KANLinear tensors inside a block's feedforward: ``<block>.<attribute>.layers.<j>.<tensor>``
_KAN_TENSOR = re.compile(r"\.\d+\.\w+\.layers\.\d+\.(weight|bias|input_scale|input_shift|basis_parameters\.\d+)$")


def check_weights_match_kan_config(model: nn.Module, loading_info: dict, source) -> None:
    """Refuse a loaded checkpoint whose weights lack tensors of, or hold tensors outside, the
    feedforwards its ``kan_config`` describes (``loading_info`` as ``from_pretrained`` reports it).

    transformers would initialise the missing ones and drop the unexpected ones with a log line,
    leaving a model other than the one saved.
    """
    kan_config = model.config.kan_config
    prefixes = ()
    if kan_config is not None:
        path = blocks_path_in(model, kan_config["blocks_path"])
        block_count = len(model.get_submodule(path))
        attributes = (kan_config["mlp_attribute"], *kan_config["bypassed_attributes"])
        prefixes = tuple(f"{path}.{i}.{name}." for i in range(block_count) for name in attributes)

    def in_a_feedforward(key):
        return key.startswith(prefixes) or _KAN_TENSOR.search(key) is not None

    missing = sorted(key for key in loading_info["missing_keys"] if in_a_feedforward(key))
    unexpected = sorted(key for key in loading_info["unexpected_keys"] if in_a_feedforward(key))
    if not (missing or unexpected):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors the config describes are missing from the weights: {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors in the weights are not in the model the config describes: "
                        f"{_some(unexpected)}")
    described = f"KAN blocks {kan_config['blocks']}" if kan_config is not None else "no KAN blocks (kan_config is null)"
    raise ValueError(
        f"the weights of {source} do not match its config, which describes {described}: {'; '.join(problems)}. "
        f"kallm does not initialise or drop KAN tensors of a checkpoint silently: the config.json and the weights "
        f"come from different models, or one of them was edited (from_config builds a fresh model instead)"
    )


def _some(keys, shown=6):
    listed = ", ".join(keys[:shown])
    return listed + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")


#: key of the safetensors metadata that records the settings each block's KAN weights were made for
KAN_SETTINGS_METADATA = "kallm_kan_settings"


def _kan_settings(kan_config: dict) -> dict[str, dict]:
    """``{block: settings}`` (``RetrofitConfig.settings``: basis, degree, options, ...) as JSON would read it back."""
    config = RetrofitConfig.from_dict(kan_config)
    return json.loads(json.dumps({str(index): config.settings(index) for index in config.blocks}))


def _safetensors_files(source, hub_options: dict) -> list[str]:
    """The local paths of a checkpoint's safetensors weights (one file, or the shards its index names)."""
    index = delta_file(source, SAFE_WEIGHTS_INDEX_NAME, hub_options)
    if index is None:
        single = delta_file(source, SAFE_WEIGHTS_NAME, hub_options)
        return [single] if single else []
    with open(index, encoding="utf-8") as file:
        shards = sorted(set(json.load(file)["weight_map"].values()))
    return [path for shard in shards if (path := delta_file(source, shard, hub_options))]


def record_kan_settings(kan_config: dict, folder) -> None:
    """Write the settings each block's KAN weights were made for into the metadata of every safetensors file in
    ``folder`` that holds KAN tensors, where ``check_kan_settings`` finds them at load.

    The config records them too, but a config can be edited apart from its weights: another basis with as many
    features loads into the same tensors and computes another function. transformers' ``save_pretrained``
    takes no metadata, so each such file's header is rewritten after it is saved."""
    settings = json.dumps(_kan_settings(kan_config), sort_keys=True)
    for path in _safetensors_files(os.fspath(folder), {}):
        partial = path + ".partial"
        try:
            with open(path, "rb") as weights:
                header_size = int.from_bytes(weights.read(8), "little")
                header = json.loads(weights.read(header_size))
                if not any(_KAN_TENSOR.search(name) for name in header if name != "__metadata__"):
                    continue
                header["__metadata__"] = {**header.get("__metadata__", {}), KAN_SETTINGS_METADATA: settings}
                encoded = json.dumps(header, separators=(",", ":")).encode()
                encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the tensor data to 8 bytes
                with open(partial, "wb") as rewritten:
                    rewritten.write(len(encoded).to_bytes(8, "little") + encoded)
                    shutil.copyfileobj(weights, rewritten, 16 * 2**20)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)


def check_kan_settings(model: nn.Module, source, hub_options: dict) -> None:
    """Refuse a checkpoint whose ``kan_config`` gives a block other settings (basis, degree, options, ...) than
    its weights record (``record_kan_settings``): the KAN layers would compute another function. Weights saved
    before kallm recorded them are not checked."""
    kan_config = model.config.kan_config
    if kan_config is None or source is None:
        return
    recorded = None
    for path in _safetensors_files(os.fspath(source), hub_options):
        with safe_open(path, framework="pt") as weights:
            recorded = (weights.metadata() or {}).get(KAN_SETTINGS_METADATA)
        if recorded is not None:
            break
    if recorded is None:
        return
    recorded, described = json.loads(recorded), _kan_settings(kan_config)
    differences = [
        f"block {block}'s {name} is {value!r} in the weights but {described[block].get(name)!r} in kan_config"
        for block, settings in recorded.items() if block in described
        for name, value in settings.items() if described[block].get(name) != value
    ]
    if differences:
        raise ValueError(
            f"the config of {source} gives its KAN blocks other settings than its weights were made for: "
            f"{'; '.join(differences[:4])}{' ...' if len(differences) > 4 else ''}. The KAN layers would compute "
            f"another function; restore kan_config in config.json to what the weights record"
        )


class KANModelMixin:
    """What every retrofitted class (causal LM, sequence classifier, base model) adds to its base class (the
    mixin comes first in the bases, so that its methods run around the base class's)."""

    def __init__(self, config, *args, **kwargs):
        # Most families' sequence classifiers build their base model with AutoModel.from_config(config), which
        # must find the retrofitted base model for this config's class: through trust_remote_code that class
        # comes from another copy of configuration_kallm.py than this file's, unknown to transformers.
        AutoModel.register(type(config), KAN_BASE_MODEL_CLASSES[self.config_class], exist_ok=True)
        super().__init__(config, *args, **kwargs)
        kan_config = self.config.kan_config
        if kan_config is not None:
            check_kan_config_fits_model(kan_config, self)
            blocks = self.get_submodule(blocks_path_in(self, kan_config["blocks_path"]))
            # A classifier whose base model AutoModel built is retrofitted already (as KA<Family>Model).
            missing = [i for i in kan_config["blocks"]
                       if not is_retrofitted_feedforward(getattr(blocks[i], kan_config["mlp_attribute"]))]
            install_kan_feedforwards(self, kan_config, blocks=missing)

    @property
    def kan_auto_class(self) -> str:
        """The Auto class that loads this model (the model card's load snippets name it)."""
        return next((auto for auto, classes in KAN_AUTO_CLASSES.items() if type(self) in classes.values()),
                    "AutoModelForCausalLM")

    def _record_auto_classes(self):
        """Name this family's causal LM, classifier and base model in ``auto_map``, whichever of them is saved, so
        that every Auto class loads the checkpoint through trust_remote_code."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        for auto_class, classes in KAN_AUTO_CLASSES.items():
            auto_map[auto_class] = f"{__name__.split('.')[-1]}.{classes[self.config_class].__name__}"
        self.config.auto_map = auto_map

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, output_loading_info: bool = False, **kwargs):
        """transformers' ``from_pretrained``, refusing weights that do not match ``kan_config``
        (see ``check_weights_match_kan_config``). ``from_config`` still builds fresh KAN layers.

        A delta checkpoint (``kallm.save_delta``) is rebuilt on its base: the one its manifest records (a hub id, a
        folder or a ``.gguf`` file), or ``base_model=`` (a loaded model or a path) when that is not loadable here;
        the base's weights must hash to the recorded SHA-256."""
        hub_options = {key: kwargs[key] for key in HUB_OPTIONS if kwargs.get(key) is not None}
        manifest = read_delta_manifest(pretrained_model_name_or_path, hub_options)
        if manifest is not None:
            return cls._from_delta(pretrained_model_name_or_path, manifest, hub_options, output_loading_info, kwargs)
        if kwargs.get("base_model") is not None:
            raise ValueError(f"base_model= is for delta checkpoints; {pretrained_model_name_or_path} is none "
                             f"(it has no {DELTA_MANIFEST})")
        kwargs.pop("base_model", None)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        check_weights_match_kan_config(model, loading_info, pretrained_model_name_or_path)
        check_kan_settings(model, pretrained_model_name_or_path, hub_options)
        return (model, loading_info) if output_loading_info else model

    @classmethod
    def _from_delta(cls, source, manifest: dict, hub_options: dict, output_loading_info: bool, options: dict):
        """The model of the delta checkpoint ``source``: its config's architecture with the base's tensors and the
        delta's over them, on CPU in the dtype it was saved in (or ``dtype=``)."""
        # Taken out: the delta's own hub options, and what says how the call got here (the Auto classes' and
        # pipelines' private keywords, such as _from_auto and _from_pipeline, and remote-code settings).
        options = {key: value for key, value in options.items()
                   if not key.startswith("_") and key not in (*HUB_OPTIONS, *CALL_ROUTING) and value is not None}
        config, base, dtype = options.pop("config", None), options.pop("base_model", None), options.pop("dtype", None)
        attn_implementation, device_map = options.pop("attn_implementation", None), options.pop("device_map", None)
        if device_map is not None and not isinstance(device_map, (str, torch.device)):
            options["device_map"] = device_map
        unsupported = sorted(options)
        if unsupported:
            raise ValueError(f"{source} is a delta checkpoint, rebuilt on its base; from_pretrained got "
                             f"{', '.join(unsupported)}, which it cannot honour there (it takes config, base_model, "
                             f"dtype, attn_implementation and a single-device device_map): load it first, then "
                             f"convert it")
        if config is None:
            config = cls.config_class.from_pretrained(source, **hub_options)
        if base is None:
            base = load_base_model(manifest["base_model"], manifest.get("base_revision"), manifest["dtype"], source)
        elif isinstance(base, (str, os.PathLike)):
            base = load_base_model(os.fspath(base), None, manifest["dtype"], source)
        check_base(base, manifest, source, getattr(base, "name_or_path", "") or manifest["base_model"])
        build = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = cls._from_config(config, dtype=getattr(torch, manifest["dtype"]), **build)
        model = load_into(model, base, manifest, delta_file(source, DELTA_WEIGHTS, hub_options), source)
        if dtype not in (None, "auto"):
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if device_map is not None:
            model = model.to(device_map)
        loading_info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return (model, loading_info) if output_loading_info else model

    def initialize_weights(self):
        # transformers initialises the tensors a checkpoint lacks by handing each module to
        # the _init_weights of the innermost PreTrainedModel holding it (LlamaModel, ...),
        # which knows no KAN layers. Their own reset runs first; under the guard it skips
        # every tensor already loaded (marked _is_hf_initialized).
        with torch.no_grad(), guard_torch_init_functions():
            for module in self.modules():
                if isinstance(module, KANLinear) and not getattr(module, "_is_hf_initialized", False):
                    module.reset_parameters()
        super().initialize_weights()

    def save_pretrained(self, save_directory, is_main_process: bool = True, push_to_hub: bool = False, **kwargs):
        """transformers' ``save_pretrained`` plus kallm's model card, merged into a README.md already
        in the folder. With ``push_to_hub=True`` (``repo_id=``, ``commit_message=``, ``create_pr=``,
        ``private=``, ``token=`` as in transformers) it uploads what the save wrote, kallm's card
        included, where transformers would upload its generic card."""
        self._record_auto_classes()
        if self.config.kan_config is None:
            return super().save_pretrained(save_directory, is_main_process=is_main_process, push_to_hub=push_to_hub,
                                           **kwargs)
        hub = None
        if push_to_hub:
            hub = {key: kwargs.pop(key) for key in ("commit_message", "create_pr", "private", "token") if key in kwargs}
            hub["repo_id"] = kwargs.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
        return self._save(save_directory, is_main_process, hub, kwargs)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                    create_pr: bool = False, max_shard_size: int | str | None = "50GB",
                    tags: list[str] | None = None, tokenizer=None):
        """Upload what ``save_pretrained`` writes (weights, config, code, model card) to ``repo_id``, in one commit
        with ``tokenizer``'s files when one is given.

        transformers' own ``push_to_hub`` replaces README.md with a generic card after
        saving; this uploads kallm's card, which describes the retrofit.
        """
        self._record_auto_classes()
        if self.config.kan_config is None:
            if tokenizer is not None:
                raise ValueError("tokenizer= is kallm's addition for retrofitted models; this model has no KAN "
                                 "feedforwards: push the tokenizer with tokenizer.push_to_hub")
            return super().push_to_hub(
                repo_id, commit_message=commit_message, commit_description=commit_description, private=private,
                token=token, revision=revision, create_pr=create_pr, max_shard_size=max_shard_size, tags=tags,
            )
        hub = {"repo_id": repo_id, "commit_message": commit_message, "commit_description": commit_description,
               "private": private, "token": token, "revision": revision, "create_pr": create_pr, "tags": tags}
        with tempfile.TemporaryDirectory() as folder:
            return self._save(folder, True, hub, {"max_shard_size": max_shard_size}, tokenizer)

    def _save(self, folder, is_main_process, hub, save_options, tokenizer=None):
        """Save to ``folder`` (and ``tokenizer`` beside the model) with kallm's card; with ``hub`` options, then
        upload the files this save wrote or changed (as transformers does) and return the commit."""
        warn_if_custom_basis(self.config.kan_config)
        hub = dict(hub or {})
        repo_id = token = timestamps = None
        if hub and is_main_process:
            # transformers' own Hub client and upload step, so that both push paths behave like its own.
            from transformers.utils.hub import hf_api

            token = hub.pop("token", None)
            repo_id = hf_api().create_repo(hub.pop("repo_id"), private=hub.pop("private", None), token=token,
                                           exist_ok=True).repo_id
            timestamps = self._get_files_timestamps(folder) if os.path.isdir(folder) else {}
        super().save_pretrained(folder, is_main_process=is_main_process, **save_options)
        if not is_main_process:
            return None
        record_kan_settings(self.config.kan_config, folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        write_model_card(self, folder, hub.pop("tags", None) or (), location=repo_id or "PATH_OR_REPO")
        if repo_id is None:
            return None
        return self._upload_modified_files(folder, repo_id, timestamps, token=token, **hub)


class KALlamaForCausalLM(KANModelMixin, LlamaForCausalLM):
    config_class = KALlamaConfig


class KALlamaForSequenceClassification(KANModelMixin, LlamaForSequenceClassification):
    config_class = KALlamaConfig


class KALlamaModel(KANModelMixin, LlamaModel):
    config_class = KALlamaConfig


class KAMistralForCausalLM(KANModelMixin, MistralForCausalLM):
    config_class = KAMistralConfig


class KAMistralForSequenceClassification(KANModelMixin, MistralForSequenceClassification):
    config_class = KAMistralConfig


class KAMistralModel(KANModelMixin, MistralModel):
    config_class = KAMistralConfig


class KAQwen2ForCausalLM(KANModelMixin, Qwen2ForCausalLM):
    config_class = KAQwen2Config


class KAQwen2ForSequenceClassification(KANModelMixin, Qwen2ForSequenceClassification):
    config_class = KAQwen2Config


class KAQwen2Model(KANModelMixin, Qwen2Model):
    config_class = KAQwen2Config


class KAQwen3ForCausalLM(KANModelMixin, Qwen3ForCausalLM):
    config_class = KAQwen3Config


class KAQwen3ForSequenceClassification(KANModelMixin, Qwen3ForSequenceClassification):
    config_class = KAQwen3Config


class KAQwen3Model(KANModelMixin, Qwen3Model):
    config_class = KAQwen3Config


class KAGemmaForCausalLM(KANModelMixin, GemmaForCausalLM):
    config_class = KAGemmaConfig


class KAGemmaForSequenceClassification(KANModelMixin, GemmaForSequenceClassification):
    config_class = KAGemmaConfig


class KAGemmaModel(KANModelMixin, GemmaModel):
    config_class = KAGemmaConfig


class KAGemma2ForCausalLM(KANModelMixin, Gemma2ForCausalLM):
    config_class = KAGemma2Config


class KAGemma2ForSequenceClassification(KANModelMixin, Gemma2ForSequenceClassification):
    config_class = KAGemma2Config


class KAGemma2Model(KANModelMixin, Gemma2Model):
    config_class = KAGemma2Config


class KAPhi3ForCausalLM(KANModelMixin, Phi3ForCausalLM):
    config_class = KAPhi3Config


class KAPhi3ForSequenceClassification(KANModelMixin, Phi3ForSequenceClassification):
    config_class = KAPhi3Config


class KAPhi3Model(KANModelMixin, Phi3Model):
    config_class = KAPhi3Config


class KAGPT2LMHeadModel(KANModelMixin, GPT2LMHeadModel):
    config_class = KAGPT2Config


class KAGPT2ForSequenceClassification(KANModelMixin, GPT2ForSequenceClassification):
    config_class = KAGPT2Config


class KAGPT2Model(KANModelMixin, GPT2Model):
    config_class = KAGPT2Config


class KAGPTNeoXForCausalLM(KANModelMixin, GPTNeoXForCausalLM):
    config_class = KAGPTNeoXConfig


class KAGPTNeoXForSequenceClassification(KANModelMixin, GPTNeoXForSequenceClassification):
    config_class = KAGPTNeoXConfig


class KAGPTNeoXModel(KANModelMixin, GPTNeoXModel):
    config_class = KAGPTNeoXConfig


class KAOPTForCausalLM(KANModelMixin, OPTForCausalLM):
    config_class = KAOPTConfig


class KAOPTForSequenceClassification(KANModelMixin, OPTForSequenceClassification):
    config_class = KAOPTConfig


class KAOPTModel(KANModelMixin, OPTModel):
    config_class = KAOPTConfig


#: retrofitted config class -> retrofitted causal LM class
KAN_MODEL_CLASSES = {
    cls.config_class: cls
    for cls in (
        KALlamaForCausalLM, KAMistralForCausalLM, KAQwen2ForCausalLM, KAQwen3ForCausalLM, KAGemmaForCausalLM,
        KAGemma2ForCausalLM, KAPhi3ForCausalLM, KAGPT2LMHeadModel, KAGPTNeoXForCausalLM, KAOPTForCausalLM,
    )
}

#: retrofitted config class -> retrofitted sequence classification class
KAN_SEQUENCE_CLASSIFICATION_CLASSES = {
    cls.config_class: cls
    for cls in (
        KALlamaForSequenceClassification, KAMistralForSequenceClassification, KAQwen2ForSequenceClassification,
        KAQwen3ForSequenceClassification, KAGemmaForSequenceClassification, KAGemma2ForSequenceClassification,
        KAPhi3ForSequenceClassification, KAGPT2ForSequenceClassification, KAGPTNeoXForSequenceClassification,
        KAOPTForSequenceClassification,
    )
}

#: retrofitted config class -> retrofitted base model class (the blocks without a head)
KAN_BASE_MODEL_CLASSES = {
    cls.config_class: cls
    for cls in (
        KALlamaModel, KAMistralModel, KAQwen2Model, KAQwen3Model, KAGemmaModel, KAGemma2Model, KAPhi3Model,
        KAGPT2Model, KAGPTNeoXModel, KAOPTModel,
    )
}

#: Auto class name -> its retrofitted classes by config class; each saved config's auto_map names all of them
KAN_AUTO_CLASSES = {
    "AutoModelForCausalLM": KAN_MODEL_CLASSES,
    "AutoModelForSequenceClassification": KAN_SEQUENCE_CLASSIFICATION_CLASSES,
    "AutoModel": KAN_BASE_MODEL_CLASSES,
}
