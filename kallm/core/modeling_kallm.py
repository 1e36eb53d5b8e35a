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
import tempfile

import torch
from torch import nn
from transformers import (
    Gemma2ForCausalLM,
    GemmaForCausalLM,
    GPT2LMHeadModel,
    GPTNeoXForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    OPTForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from transformers.initialization import guard_torch_init_functions

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
    validate_kan_config,
)
from .layers import KANFeedForward, KANLinear


def build_kan_feedforward(kan_config: dict, device=None, dtype=None) -> KANFeedForward:
    """The ``KANFeedForward`` that ``kan_config`` prescribes (same for every listed block)."""
    return KANFeedForward(
        kan_config["hidden_size"],
        kan_config["intermediate_size"],
        basis=kan_config["basis"],
        degree=kan_config["degree"],
        device=device,
        dtype=dtype,
        **kan_config["layer_options"],
    )


def install_kan_feedforwards(model: nn.Module, kan_config: dict, layers=None) -> list[int]:
    """Replace the feedforward of ``layers`` (default: all of ``kan_config["layers"]``)."""
    blocks = model.get_submodule(kan_config["blocks_path"])
    indices = kan_config["layers"] if layers is None else layers
    replaced = (kan_config["mlp_attribute"], *kan_config["bypassed_attributes"])
    for index in indices:
        if not 0 <= index < len(blocks):
            raise ValueError(f"kan_config lists block {index}, but the model has {len(blocks)} blocks")
        block = blocks[index]
        device, dtype = _placement(model, [getattr(block, name) for name in replaced])
        feedforward = build_kan_feedforward(kan_config, device=device, dtype=dtype)
        setattr(block, kan_config["mlp_attribute"], feedforward)
        for name in kan_config["bypassed_attributes"]:
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


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    seen, total = set(), 0
    for param in module.parameters():
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def model_card(model: nn.Module, tags=(), location: str = "PATH_OR_REPO") -> str:
    """A README.md for a saved retrofitted model.

    ``tags`` add to kallm's Hub tags; ``location`` is the folder or repo id the load
    snippets name.
    """
    kan = model.config.kan_config
    # The Hub rejects a base_model that is not a repo id, e.g. a local path or kallm's bundled names.
    is_hub_id = _HUB_ID.fullmatch(kan["base_model"]) and not os.path.exists(kan["base_model"])
    base_model_line = f"base_model: {kan['base_model']}\n" if is_hub_id else ""
    kan_params = sum(count_parameters(m) for m in model.modules() if isinstance(m, KANFeedForward))
    options = ", ".join(f"{k}={v!r}" for k, v in kan["layer_options"].items()) or "defaults"
    name = model.__class__.__name__
    return f"""---
library_name: transformers
tags: {json.dumps(["kallm", "kan", "kolmogorov-arnold", *(tags or ())])}
{base_model_line}---
# {kan["base_model"]} with KAN feedforwards

This model is `{kan["base_model"]}` with the feedforward (MLP) of decoder blocks
{kan["layers"]} replaced by Kolmogorov-Arnold Network feedforwards, made with kallm.

| | |
|---|---|
| base model | `{kan["base_model"]}` ({kan["base_model_type"]}) |
| retrofitted blocks | {kan["layers"]} |
| basis | `{kan["basis"]}`, degree {kan["degree"]} |
| KAN feedforward sizes | {kan["hidden_size"]} -> {kan["intermediate_size"]} -> {kan["hidden_size"]} |
| layer options | {options} |
| parameters | {count_parameters(model):,} in all, {kan_params:,} in KAN feedforwards |

## Load it

With kallm installed (`pip install kallm`):

```python
import kallm  # registers the {name} class with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{location}")
tokenizer = AutoTokenizer.from_pretrained("{location}")
```

Without kallm, the modeling code saved next to the weights is used:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{location}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{location}", trust_remote_code=True)
```
"""


class KANModelMixin:
    """What every retrofitted causal LM class adds to its base class."""

    def _install_kan_from_config(self):
        validate_kan_config(self.config.kan_config)
        if self.config.kan_config is not None:
            install_kan_feedforwards(self, self.config.kan_config)

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

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        result = super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process and self.config.kan_config is not None:
            with open(os.path.join(save_directory, "README.md"), "w", encoding="utf-8") as card:
                card.write(model_card(self))
        return result

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                    create_pr: bool = False, max_shard_size: int | str | None = "50GB",
                    tags: list[str] | None = None):
        """Upload what ``save_pretrained`` writes (weights, config, code, model card) to ``repo_id``.

        transformers' own ``push_to_hub`` replaces README.md with a generic card after
        saving; this keeps the card that describes the retrofit.
        """
        # huggingface_hub always comes with transformers, so this stays portable.
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            if self.config.kan_config is not None:
                with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as card:
                    card.write(model_card(self, tags, location=repo_id))
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )


class KALlamaForCausalLM(KANModelMixin, LlamaForCausalLM):
    config_class = KALlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self._install_kan_from_config()


class KAMistralForCausalLM(KANModelMixin, MistralForCausalLM):
    config_class = KAMistralConfig

    def __init__(self, config):
        super().__init__(config)
        self._install_kan_from_config()


class KAQwen2ForCausalLM(KANModelMixin, Qwen2ForCausalLM):
    config_class = KAQwen2Config

    def __init__(self, config):
        super().__init__(config)
        self._install_kan_from_config()


class KAQwen3ForCausalLM(KANModelMixin, Qwen3ForCausalLM):
    config_class = KAQwen3Config

    def __init__(self, config):
        super().__init__(config)
        self._install_kan_from_config()


class KAGemmaForCausalLM(KANModelMixin, GemmaForCausalLM):
    config_class = KAGemmaConfig

    def __init__(self, config):
        super().__init__(config)
        self._install_kan_from_config()


class KAGemma2ForCausalLM(KANModelMixin, Gemma2ForCausalLM):
    config_class = KAGemma2Config

    def __init__(self, config):
        super().__init__(config)
        self._install_kan_from_config()


class KAPhi3ForCausalLM(KANModelMixin, Phi3ForCausalLM):
    config_class = KAPhi3Config

    def __init__(self, config):
        super().__init__(config)
        self._install_kan_from_config()


class KAGPT2LMHeadModel(KANModelMixin, GPT2LMHeadModel):
    config_class = KAGPT2Config

    def __init__(self, config):
        super().__init__(config)
        self._install_kan_from_config()


class KAGPTNeoXForCausalLM(KANModelMixin, GPTNeoXForCausalLM):
    config_class = KAGPTNeoXConfig

    def __init__(self, config):
        super().__init__(config)
        self._install_kan_from_config()


class KAOPTForCausalLM(KANModelMixin, OPTForCausalLM):
    config_class = KAOPTConfig

    def __init__(self, config):
        super().__init__(config)
        self._install_kan_from_config()


#: retrofitted config class -> retrofitted causal LM class
KAN_MODEL_CLASSES = {
    cls.config_class: cls
    for cls in (
        KALlamaForCausalLM, KAMistralForCausalLM, KAQwen2ForCausalLM, KAQwen3ForCausalLM,
        KAGemmaForCausalLM, KAGemma2ForCausalLM, KAPhi3ForCausalLM, KAGPT2LMHeadModel,
        KAGPTNeoXForCausalLM, KAOPTForCausalLM,
    )
}
