"""Where each supported architecture keeps its decoder blocks and feedforwards, and how its MLP is laid out.

The descriptions are data: adding an architecture is one entry here plus a config/model class
pair in ``kallm/core`` (see docs/adding-an-architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._imports import moved_name


@dataclass(frozen=True)
class Architecture:
    """How to find the pieces kallm touches in one model family.

    blocks_path: dotted path from the causal LM to the list of decoder blocks.
    mlp_attribute: attribute of a block holding the feedforward; it is replaced by a
        ``KANFeedForward``, called as ``feedforward(hidden_states)``.
    bypassed_attributes: block attributes the forward calls after ``mlp_attribute`` as
        part of the same feedforward (OPT runs ``fc1``, ``activation_fn``, ``fc2`` inline);
        they become identities.
    hidden_size: the config attribute holding the feedforward's input/output size (the KAN
        feedforward's inner size follows from the parameters of the MLP it replaces, counted on the
        module itself, so no intermediate size is read from the config).
    final_norm_path: dotted path of the final norm (trained by the "tail+embeddings" policy).
    attention_attribute: attribute of a block holding its attention module, whose linear
        projections ``kallm.lora_targets(model, "attention")`` lists.
    mlp_layout: the MLP's parts by role (``gate``, ``up``, ``down``, ``activation``; a fused ``gate_up``; an
        optional ``dropout`` after ``down``), attributes of the ``mlp_attribute`` module, or of the block
        itself when the MLP is spread over it (``bypassed_attributes``); ``form="glu"`` rebuilds the MLP
        from them (kallm/core/function_layers.py).
    activation_config: the config attribute naming the MLP's activation (``ACT2FN`` key); ``form="glu"``
        accepts only the elementwise activations of ``EXACT_ACTIVATIONS``.
    """

    blocks_path: str
    mlp_attribute: str = "mlp"
    bypassed_attributes: tuple[str, ...] = ()
    hidden_size: str = "hidden_size"
    final_norm_path: str = "model.norm"
    attention_attribute: str = "self_attn"
    mlp_layout: tuple[tuple[str, str], ...] = (
        ("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"), ("activation", "act_fn")
    )
    activation_config: str = "hidden_act"


#: activations (transformers' ``ACT2FN`` names) that act on each value alone and learn nothing: ``form="glu"``
#: keeps the model's own activation module and adds its functions to its output, which is exact for these
EXACT_ACTIVATIONS = (
    "gelu", "gelu_10", "gelu_accurate", "gelu_fast", "gelu_new", "gelu_python", "gelu_python_tanh",
    "gelu_pytorch_tanh", "hardswish", "laplace", "leaky_relu", "mish", "quick_gelu", "relu", "relu2", "relu6",
    "sigmoid", "silu", "swish", "tanh",
)

_DECODER = Architecture(blocks_path="model.layers")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": Architecture(blocks_path="model.layers", activation_config="hidden_activation"),
    "phi3": Architecture(  # fused gate_up_proj: the whole mlp module is replaced
        blocks_path="model.layers",
        mlp_layout=(("gate_up", "gate_up_proj"), ("down", "down_proj"), ("activation", "activation_fn")),
    ),
    "gpt2": Architecture(
        blocks_path="transformer.h", hidden_size="n_embd", final_norm_path="transformer.ln_f",
        attention_attribute="attn",
        mlp_layout=(("up", "c_fc"), ("down", "c_proj"), ("activation", "act"), ("dropout", "dropout")),
        activation_config="activation_function",
    ),
    "gpt_neox": Architecture(
        blocks_path="gpt_neox.layers", final_norm_path="gpt_neox.final_layer_norm", attention_attribute="attention",
        mlp_layout=(("up", "dense_h_to_4h"), ("down", "dense_4h_to_h"), ("activation", "act")),
    ),
    "opt": Architecture(
        blocks_path="model.decoder.layers",
        mlp_attribute="fc1",
        bypassed_attributes=("activation_fn", "fc2"),
        final_norm_path="model.decoder.final_layer_norm",
        mlp_layout=(("up", "fc1"), ("down", "fc2"), ("activation", "activation_fn")),
        activation_config="activation_function",
    ),
}

ADDING_AN_ARCHITECTURE_DOC = "docs/adding-an-architecture.md"


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def architecture_for(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(
            f"kallm has no architecture description for model_type {model_type!r}; supported: {', '.join(supported_model_types())}. "
            f"See {ADDING_AN_ARCHITECTURE_DOC} to add one."
        ) from None


def swiglu_parts(original: nn.Module, layout: dict[str, str]) -> tuple[nn.Linear, nn.Linear, nn.Module]:
    """``(gate, up, down)`` projections of a SwiGLU MLP (a fused ``gate_up`` projection split in two); refuses an
    MLP that is not one."""
    activation = getattr(original, layout.get("activation", ""), None)
    probe = torch.linspace(-6, 6, 97)
    if "down" not in layout or not ({"gate", "up"} <= set(layout) or "gate_up" in layout) or activation is None:
        raise ValueError(f"fit init of form='gated' copies the channels of a gated MLP (SwiGLU); this MLP's parts "
                         f"are {layout}; use init='random'")
    if not torch.allclose(activation(probe), torch.nn.functional.silu(probe), atol=1e-5):
        raise ValueError(f"fit init of form='gated' copies the channels of a SwiGLU MLP, whose gate goes through "
                         f"silu; this MLP's activation is {type(activation).__name__}; use init='random'")
    if "gate_up" in layout:
        fused = getattr(original, layout["gate_up"])
        half = fused.out_features // 2
        halves = []
        for rows in (slice(0, half), slice(half, None)):  # the gate's channels first, as the MLP chunks them
            linear = nn.Linear(fused.in_features, half, bias=fused.bias is not None, device=fused.weight.device,
                               dtype=fused.weight.dtype)
            linear.weight.data = fused.weight.data[rows]
            if fused.bias is not None:
                linear.bias.data = fused.bias.data[rows]
            halves.append(linear)
        return (*halves, getattr(original, layout["down"]))
    gate, up = getattr(original, layout["gate"]), getattr(original, layout["up"])
    if not isinstance(gate, nn.Linear) or not isinstance(up, nn.Linear):
        raise ValueError(f"fit init of form='gated' reads the MLP's gate and up projections as nn.Linear; this "
                         f"MLP's are {type(gate).__name__} and {type(up).__name__}; use init='random'")
    return gate, up, getattr(original, layout["down"])


def __getattr__(name: str):
    return moved_name(__name__, name)
