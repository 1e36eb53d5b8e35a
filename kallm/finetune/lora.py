"""LoRA on retrofitted models with PEFT: target names, and a LoRA layer for ``KANLinear``.

A ``KANLinear`` computes ``y = F(x) @ W.T + b`` where ``F(x)`` are the basis features of the mapped
input (``K * in`` of them) and ``W`` the ``out x K * in`` coefficient matrix. Its LoRA adapter is a
low-rank update of ``W``: ``y = F(x) @ (W + s * B A).T + b``, so it merges exactly into ``W``.

PEFT learns about the layer through ``LoraConfig._register_custom_module``, which holds per config
object and is not saved with the adapter. ``kallm.lora_config`` and ``kallm.with_kan_lora`` register it on a
config; and once this module is imported (``import kallm`` imports it as soon as PEFT is loaded),
``register_with_peft`` has every LoRA config take KAN layers, so that adapters loaded from disk
(``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``, transformers' ``load_adapter``) rebuild too.
"""

from __future__ import annotations

import os
import warnings

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.kan_function import base_branch, kan_linear
from ..core.layers import KANLinear, is_kan_linear
from ..surgery.checks import causal_lm_parts, check_adapter_fits_kan_blocks, target_names

LORA_TARGETS = ("kan", "attention", "mlp", "all")
#: the roles of an MLP layout (``Architecture.mlp_layout``) that are linear projections
PROJECTION_ROLES = ("gate", "up", "gate_up", "down")


def lora_targets(model: nn.Module, which: str = "kan") -> list[str]:
    """Module names for ``LoraConfig(target_modules=...)`` on ``model`` (call it before wrapping).

    ``"kan"``: every ``KANLinear`` of the retrofitted feedforwards; ``"attention"``: the linear
    projections inside each decoder block's attention module; ``"mlp"``: the projections of each block's MLP
    (gate, up, down), which ``form="glu"`` keeps; ``"all"``: attention and KAN layers.
    """
    if which not in LORA_TARGETS:
        raise ValueError(f"unknown LoRA targets {which!r}; valid choices: {', '.join(LORA_TARGETS)}")
    _, architecture, blocks = causal_lm_parts(model, "lora_targets")
    names = []
    if which in ("attention", "all"):
        for index, block in enumerate(blocks):
            prefix = f"{architecture.blocks_path}.{index}.{architecture.attention_attribute}"
            attention = getattr(block, architecture.attention_attribute)
            names += [f"{prefix}.{name}" for name, m in attention.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    if which == "mlp":
        # an MLP spread over its block (OPT) has its projections on the block itself
        holder_name = "" if architecture.bypassed_attributes else architecture.mlp_attribute
        for index, block in enumerate(blocks):
            holder = block.get_submodule(holder_name)
            prefix = ".".join(filter(None, (f"{architecture.blocks_path}.{index}", holder_name)))
            names += [f"{prefix}.{name}" for role, name in architecture.mlp_layout  # form="kan" blocks have none left
                      if role in PROJECTION_ROLES and isinstance(getattr(holder, name, None), (nn.Linear, Conv1D))]
    if which in ("kan", "all"):
        kan = [name for name, module in model.named_modules() if is_kan_linear(module)]
        if not kan:
            raise ValueError(
                f"{type(model).__name__} has no KAN layers to target; retrofit it first (kallm.retrofit), or ask for "
                f"which='attention'"
            )
        names += kan
    return names


def with_kan_lora(config: LoraConfig, model: nn.Module | None = None) -> LoraConfig:
    """Let ``config`` put LoRA on ``KANLinear`` layers (kallm's, and the checkpoint-code copies in
    ``model`` if given); returns the same config."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"with_kan_lora needs a peft.LoraConfig, got {type(config).__name__}")
    classes = {KANLinear} | {type(m) for m in (model.modules() if model is not None else ()) if is_kan_linear(m)}
    config._register_custom_module(dict.fromkeys(classes, KANLoraLinear))
    return config


def lora_config(model: nn.Module, which: str = "kan", r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                **options) -> LoraConfig:
    """A causal-LM ``LoraConfig`` targeting ``lora_targets(model, which)``, ready for KAN layers.

    ``options`` go to ``LoraConfig``. A rank above what a targeted layer allows (the smaller of
    its input and output widths, ``K * in`` for a KAN layer) and DoRA on KAN layers are refused
    here, before any model is wrapped.
    """
    targets = lora_targets(model, which)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    too_small = [(name, limit) for name in targets if r > (limit := _rank_limit(model.get_submodule(name)))]
    if too_small:
        name, limit = min(too_small, key=lambda item: item[1])
        raise ValueError(
            f"LoRA rank r={r} is too large for {len(too_small)} of the {len(targets)} targeted layers: {name} allows at "
            f"most {limit} (the smaller of its input and output widths); choose r <= {limit} or other targets"
        )
    if options.get("use_dora") and which != "attention":
        raise ValueError("DoRA (use_dora=True) is not supported on KAN layers; use plain LoRA, or which='attention'")
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=targets, r=r, lora_alpha=lora_alpha,
                        lora_dropout=lora_dropout, **options)
    return with_kan_lora(config, model)


def load_adapter(model: nn.Module, folder, is_trainable: bool = False, **kwargs) -> PeftModel:
    """``PeftModel.from_pretrained(model, folder)`` for an adapter that may hold KAN layers (LoRA on them), or a
    KAN adapter (``kallm.KANAdapterConfig``)."""
    config = PeftConfig.from_pretrained(folder)
    check_adapter_fits_kan_blocks(model, [*target_names(config), *_weight_names(folder)], folder)
    if isinstance(config, LoraConfig):
        config = with_kan_lora(config, model)
    return PeftModel.from_pretrained(model, folder, config=config, is_trainable=is_trainable, **kwargs)


def _weight_names(folder) -> list[str]:
    """The tensor names of the adapter saved in ``folder`` (none when it is no local folder with safetensors
    weights): they name every layer the adapter was trained on, even where PEFT shortened its target names."""
    path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(path):
        return []
    with safe_open(path, framework="pt") as weights:
        return list(weights.keys())


def register_with_peft() -> None:
    """Have PEFT put ``KANLoraLinear`` on every KAN layer (kallm's or a checkpoint's copy) that a LoRA config
    targets, registered on the config or not.

    PEFT keeps custom LoRA layers per config object and saves none of them, so a config read from an adapter
    folder knows no KAN layer, and PEFT has no registry of its own to add one to. kallm therefore wraps the
    step where PEFT picks the LoRA layer for a target: a KAN layer its config has no layer for is registered
    on that config first. Everything else goes to PEFT's own choice unchanged.

    It also wraps the step before PEFT adapts a model, so that a LoRA config naming KAN layers in blocks the
    model has none in is refused (see ``check_adapter_fits_kan_blocks``) rather than applied in part. Idempotent.
    """
    choose = LoraModel._create_new_module
    if getattr(choose, "kallm_knows_kan_layers", False):
        return
    prepare = LoraModel._prepare_model

    def prepare_model(self, peft_config, model):
        check_adapter_fits_kan_blocks(model, target_names(peft_config))
        return prepare(self, peft_config, model)

    def create_new_module(config, adapter_name, target, **kwargs):
        layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if is_kan_linear(layer) and not isinstance(layer, tuple(config._custom_modules or ())):
            config._register_custom_module({type(layer): KANLoraLinear})
        return choose(config, adapter_name, target, **kwargs)

    create_new_module.kallm_knows_kan_layers = True
    LoraModel._create_new_module = staticmethod(create_new_module)
    LoraModel._prepare_model = prepare_model


def _rank_limit(module: nn.Module) -> int:
    weight = module.weight
    return min(weight.shape)


class KANLoraLinear(nn.Module, LoraLayer):
    """PEFT LoRA on a ``KANLinear``: ``lora_A`` maps the ``K * in`` basis features to rank ``r``,
    ``lora_B`` to the outputs; ``s * B A`` has the shape of the coefficient matrix.

    Without dropout the update is added to the coefficients before the fused op runs, so the
    features are computed once and the result equals the merged layer's bit for bit. With LoRA
    dropout in training, the features are built once by plain torch ops and feed both paths. A base
    branch (``base="silu"``) is not adapted: it runs beside, as in the layer itself.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: float = 1, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module):
        out_features, feature_count = module.weight.shape
        return feature_count, out_features

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        limit = min(self.in_features, self.out_features)
        if r > limit:
            raise ValueError(
                f"LoRA rank r={r} is larger than a KAN layer of {self.out_features} outputs and {self.in_features} "
                f"basis features allows (at most {limit}); choose a smaller r"
            )
        if config.lora_bias and self.get_base_layer().bias is None:
            raise ValueError("lora_bias=True needs KAN layers with a bias; this one was built with bias=False")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``s * B A``, shaped like the coefficient matrix (in float32 for half-precision CPU weights)."""
        weight_a, weight_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dtype = weight_b.dtype
        if weight_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            weight_a, weight_b = weight_a.float(), weight_b.float()
        return ((weight_b @ weight_a) * self.scaling[adapter]).to(dtype)

    def _delta_bias(self, adapter: str) -> torch.Tensor:
        return self.lora_B[adapter].bias * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            weight = base.weight.data + self.get_delta_weight(adapter).to(base.weight.dtype)
            bias = base.bias.data + self._delta_bias(adapter).to(base.bias.dtype) if self.lora_bias[adapter] else None
            if safe_merge and not all(torch.isfinite(t).all() for t in (weight, bias) if t is not None):
                raise ValueError(f"NaNs or infinities in the merged weights: the adapter {adapter!r} seems broken")
            base.weight.data = weight
            if bias is not None:
                base.bias.data = bias
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            base.weight.data -= self.get_delta_weight(adapter).to(base.weight.dtype)
            if self.lora_bias[adapter]:
                base.bias.data -= self._delta_bias(adapter).to(base.bias.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise ValueError("LoRA on KAN layers does not take adapter_names (per-sample adapters); run one batch "
                             "per adapter, selecting it with set_adapter")
        if self.disable_adapters and self.merged:
            self.unmerge()
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            return self.base_layer(x)
        base = self.get_base_layer()
        with_dropout = [a for a in active if self.training and not isinstance(self.lora_dropout[a], nn.Identity)]
        if with_dropout:
            return self._forward_with_dropout(base, x, active)
        weight, bias = base.weight, base.bias
        for adapter in active:  # the same sums, in the same order, as merge()
            weight = weight + self.get_delta_weight(adapter).to(weight.dtype)
            if self.lora_bias[adapter]:
                bias = bias + self._delta_bias(adapter).to(bias.dtype)
        leading = x.shape[:-1]
        y = kan_linear(x.reshape(-1, base.in_features), weight, bias, base.input_scale, base.input_shift, base.basis,
                       list(base.basis_parameters))
        return _with_branch(base, x, y.reshape(*leading, base.out_features))

    def _forward_with_dropout(self, base, x, active):
        features = _features(base, x)
        result = nn.functional.linear(features.to(base.weight.dtype), base.weight, base.bias)
        for adapter in active:
            lora_input = self.lora_dropout[adapter](features).to(self.lora_A[adapter].weight.dtype)
            update = self.lora_B[adapter](self.lora_A[adapter](lora_input)) * self.scaling[adapter]
            result = result + update.to(result.dtype)
        return _with_branch(base, x, result)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _with_branch(layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` plus the layer's base branch on ``x``, if it has one (a checkpoint's older copy of the layer has none)."""
    branch_weight = getattr(layer, "base_weight", None)
    if branch_weight is None:
        return y
    return y + base_branch(x.reshape(-1, layer.in_features), branch_weight, layer.base).reshape(y.shape).to(y.dtype)


def _features(layer, x: torch.Tensor) -> torch.Tensor:
    """The ``(..., K * in)`` basis features a KAN layer multiplies by its coefficients, by plain
    differentiable torch ops, blocked by feature like the fused op's buffer."""
    math = x.to(torch.promote_types(x.dtype, torch.float32))
    t = torch.tanh(math if layer.input_scale is None else math * layer.input_scale + layer.input_shift)
    return torch.cat(layer.basis.values(t, [p.to(t.dtype) for p in layer.basis_parameters]), dim=-1)


register_with_peft()
