"""The KAN adapter, a PEFT method of kallm's: a small KAN in place of LoRA's low-rank product.

Beside a targeted layer (``nn.Linear``, GPT-2's ``Conv1D`` or a ``KANLinear``) of input width ``in`` and output
width ``out``, the adapter adds

    y = base(x) + s * up(kan(down(dropout(x))))      down: in -> r,  kan: KANLinear(r, r, basis, degree),
                                                     up: r -> out (zero-initialised),  s = alpha / r

so the adapted model starts equal to its base. The KAN layer makes the update nonlinear in ``x``: it cannot be
folded into the base weights, so merging is refused (``merge_and_unload``, ``merge_adapter``); ``unload`` and
``disable_adapter`` work.

It is a PEFT method of its own (``peft_type`` ``"KAN_ADAPTER"`` in ``adapter_config.json``), registered with
PEFT's ``register_peft_method`` when this module is imported (``import kallm`` imports it as soon as PEFT is
loaded), so ``get_peft_model``, ``save_pretrained``, ``PeftModel.from_pretrained`` and
``AutoPeftModelForCausalLM`` handle it like PEFT's own methods. A process without kallm refuses such a folder
(PEFT does not know the type) rather than loading something else.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.bases import make_basis
from ..core.layers import KANLinear, is_kan_linear
from ..surgery.checks import check_adapter_fits_kan_blocks, target_names

PEFT_METHOD = "kan_adapter"
#: what every parameter name of the adapter contains (PEFT finds an adapter's weights by it)
PREFIX = f"{PEFT_METHOD}_"
MERGE_REFUSAL = (
    "a KAN adapter cannot be merged into the model's weights: its KAN layer makes the update a nonlinear function "
    "of the input, not a change of any weight matrix. Keep it as an adapter (the PeftModel, or save_pretrained and "
    "load it with PeftModel.from_pretrained), use unload() for the base model without it, or train a LoRA adapter "
    "(kallm.lora_config) when a merged checkpoint is needed"
)


def _add_peft_type(name: str) -> None:
    """Add ``name`` to PEFT's ``PeftType``, which ``register_peft_method`` requires of a new method.

    ``PeftType`` is a closed enum that PEFT extends by editing its source, and Python offers no public way to add
    an enum member, so kallm adds it as ``enum`` itself stores members. Idempotent."""
    if name in PeftType.__members__:
        return
    member = str.__new__(PeftType, name)
    member._name_ = member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    setattr(PeftType, name, member)  # before the member map, whose names the enum refuses to reassign
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)


_add_peft_type(PEFT_METHOD.upper())


@dataclass
class KANAdapterConfig(PeftConfig):
    """Configuration of a KAN adapter (see the module docstring); the PEFT config of ``get_peft_model``.

    ``r``: the width of the adapter's KAN layer (its down-projection's output); ``alpha``: the update is
    scaled by ``alpha / r``, as LoRA's; ``dropout``: on the adapter's input; ``basis``, ``degree``: of the KAN
    layer (a ``kallm.list_bases()`` name); ``target_modules``: module names or a regular expression, as for
    LoRA (``kallm.lora_targets`` names them for a retrofitted model).
    """

    r: int = field(default=8, metadata={"help": "width of the adapter's KAN layer"})
    alpha: float = field(default=16.0, metadata={"help": "the update is scaled by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    basis: str = field(default="cheby2", metadata={"help": "basis of the adapter's KAN layer"})
    degree: int = field(default=2, metadata={"help": "degree of the adapter's KAN layer"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "names of the modules to adapt, or a regular expression matching them"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "names of modules not to adapt"})
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "indices of the blocks to adapt (with a list of target_modules)"})
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "name of the block list, with layers_to_transform"})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "modules besides the adapters that train and are saved"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.KAN_ADAPTER
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"KAN adapter rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"KAN adapter alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"KAN adapter dropout must be in [0, 1), got {self.dropout!r}")
        make_basis(self.basis, self.degree)  # an unknown basis or a bad degree fails here, naming the choices
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


def kan_adapter_config(model: nn.Module, which: str = "kan", r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                       **options) -> KANAdapterConfig:
    """A causal-LM ``KANAdapterConfig`` targeting ``kallm.lora_targets(model, which)`` (``"kan"``,
    ``"attention"`` or ``"all"``); ``options`` go to ``KANAdapterConfig`` (``basis``, ``degree``, ...). The
    config, the targets and the rank are checked here, before any model is wrapped."""
    # imported here: this module may load while .lora is still importing PEFT (see kallm._imports)
    from .lora import lora_targets

    config = KANAdapterConfig(task_type="CAUSAL_LM", target_modules=lora_targets(model, which), r=r, alpha=alpha,
                              dropout=dropout, **options)
    _check_targets(model, config, sorted(config.target_modules))
    return config


def _widths(layer: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a layer the adapter can sit beside, or None."""
    if isinstance(layer, Conv1D):
        return tuple(layer.weight.shape)
    if isinstance(layer, nn.Linear) or is_kan_linear(layer):
        return layer.in_features, layer.out_features
    return None


def _check_targets(model: nn.Module, config: KANAdapterConfig, names: list[str]) -> None:
    """Refuse target layers of another kind, and a rank above what a target allows."""
    layers = {name: model.get_submodule(name) for name in names}
    layers = {name: layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
              for name, layer in layers.items()}
    unsupported = [f"{name} ({type(layer).__name__})" for name, layer in layers.items() if _widths(layer) is None]
    if unsupported:
        raise TypeError(
            f"a KAN adapter goes beside nn.Linear, Conv1D and KANLinear layers; {len(unsupported)} targeted module(s) "
            f"are none of these: {', '.join(unsupported[:3])}{' ...' if len(unsupported) > 3 else ''}"
        )
    too_small = [(name, min(_widths(layer))) for name, layer in layers.items() if config.r > min(_widths(layer))]
    if too_small:
        name, limit = min(too_small, key=lambda item: item[1])
        raise ValueError(
            f"KAN adapter rank r={config.r} is too large for {len(too_small)} of the {len(layers)} targeted layers: "
            f"{name} allows at most {limit} (the smaller of its input and output widths); choose r <= {limit} or "
            f"other targets"
        )


class KANAdapterLayer(nn.Module, BaseTunerLayer):
    """A targeted layer with KAN adapters beside it: ``base(x) + sum over active adapters of s * up(kan(down(x)))``."""

    adapter_layer_names = (f"{PREFIX}down", f"{PREFIX}kan", f"{PREFIX}up")
    other_param_names = ("r", "scaling", f"{PREFIX}dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: KANAdapterConfig):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.scaling = {}, {}
        self.kan_adapter_down, self.kan_adapter_kan = nn.ModuleDict(), nn.ModuleDict()
        self.kan_adapter_up, self.kan_adapter_dropout = nn.ModuleDict(), nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = _widths(self.get_base_layer())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: KANAdapterConfig) -> None:
        r = config.r  # checked against the layer's widths by KANAdapterModel._prepare_model
        self.r[adapter_name], self.scaling[adapter_name] = r, config.alpha / r
        down = nn.Linear(self.in_features, r, bias=False)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))  # LoRA's initialisation of its down-projection
        up = nn.Linear(r, self.out_features, bias=False)
        nn.init.zeros_(up.weight)  # the adapted layer starts equal to its base
        self.kan_adapter_down[adapter_name] = down
        self.kan_adapter_kan[adapter_name] = KANLinear(r, r, config.basis, config.degree)
        self.kan_adapter_up[adapter_name] = up
        self.kan_adapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_REFUSAL)

    def unmerge(self) -> None:
        warnings.warn("Already unmerged. Nothing to do (a KAN adapter is never merged).", stacklevel=2)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("KAN adapters do not take adapter_names (per-sample adapters); run one batch per "
                             "adapter, selecting it with set_adapter")
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.kan_adapter_down:
                continue
            down = self.kan_adapter_down[adapter]
            hidden = down(self.kan_adapter_dropout[adapter](x.to(down.weight.dtype)))
            update = self.kan_adapter_up[adapter](self.kan_adapter_kan[adapter](hidden)) * self.scaling[adapter]
            result = result + update.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "kan_adapter." + super().__repr__()


class KANAdapterModel(BaseTuner):
    """PEFT's tuner for KAN adapters: puts a ``KANAdapterLayer`` on every targeted layer."""

    prefix: str = PREFIX
    tuner_layer_cls = KANAdapterLayer
    target_module_mapping: dict = {}  # no default targets: target_modules must name them

    def _prepare_model(self, peft_config: KANAdapterConfig, model: nn.Module) -> None:
        # runs before any layer is replaced: a bad target or rank leaves the model as it was
        check_adapter_fits_kan_blocks(model, target_names(peft_config))
        names = [name for name, _ in model.named_modules() if self._check_target_module_exists(peft_config, name)]
        _check_targets(model, peft_config, names)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, KANAdapterLayer):
            target.update_layer(adapter_name, peft_config)
            return
        layer = KANAdapterLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)  # an added adapter does not train until it is made active
        self._replace_module(parent, target_name, layer, target)

    def _check_merge_allowed(self):
        raise ValueError(MERGE_REFUSAL)


if PeftType.KAN_ADAPTER not in PEFT_TYPE_TO_TUNER_MAPPING:  # importing this module again registers nothing
    register_peft_method(name=PEFT_METHOD, config_cls=KANAdapterConfig, model_cls=KANAdapterModel, prefix=PREFIX)
