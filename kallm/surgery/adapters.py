"""Where each supported architecture keeps its decoder blocks and feedforwards.

Adapters are data: adding an architecture is one entry here plus a config/model class
pair in ``kallm/core`` (see docs/adding-an-architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureAdapter:
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
    """

    blocks_path: str
    mlp_attribute: str = "mlp"
    bypassed_attributes: tuple[str, ...] = ()
    hidden_size: str = "hidden_size"
    final_norm_path: str = "model.norm"
    attention_attribute: str = "self_attn"


_DECODER = ArchitectureAdapter(blocks_path="model.layers")

ADAPTERS: dict[str, ArchitectureAdapter] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "phi3": _DECODER,  # fused gate_up_proj: the whole mlp module is replaced
    "gpt2": ArchitectureAdapter(
        blocks_path="transformer.h", hidden_size="n_embd", final_norm_path="transformer.ln_f",
        attention_attribute="attn",
    ),
    "gpt_neox": ArchitectureAdapter(
        blocks_path="gpt_neox.layers", final_norm_path="gpt_neox.final_layer_norm", attention_attribute="attention"
    ),
    "opt": ArchitectureAdapter(
        blocks_path="model.decoder.layers",
        mlp_attribute="fc1",
        bypassed_attributes=("activation_fn", "fc2"),
        final_norm_path="model.decoder.final_layer_norm",
    ),
}

ADDING_AN_ADAPTER_DOC = "docs/adding-an-architecture.md"


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model_type: str) -> ArchitectureAdapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"kallm has no adapter for model_type {model_type!r}; supported: {', '.join(supported_model_types())}. "
            f"See {ADDING_AN_ADAPTER_DOC} to add one."
        ) from None

