"""Which parameters train (``set_trainable``) and where parameters sit (``summary``)."""

from __future__ import annotations

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..core.layers import is_kan_feedforward
from ..core.modeling_kallm import count_parameters
from .checks import causal_lm_parts
from .retrofit import retrofitted_blocks

POLICIES = ("retrofitted", "tail", "tail+embeddings", "all")


def set_trainable(model: nn.Module, policy: str = "tail+embeddings") -> int:
    """Freeze everything, then unfreeze by ``policy``; returns the trainable parameter count.

    - ``"retrofitted"``: the replaced feedforwards only (KAN modules, or the restarted MLPs).
    - ``"tail"``: the whole retrofitted decoder blocks.
    - ``"tail+embeddings"``: those blocks, the token embeddings (tied with the LM head in
      SmolLM2) and the final norm; the research setup.
    - ``"all"``: every parameter.

    A ``PeftModel`` is accepted: the policy chooses which of the base model's own weights train
    besides the adapters, whose trainability is left as PEFT set it (the active adapter trains).
    The count covers both.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown trainable policy {policy!r}; valid choices: {', '.join(POLICIES)}")
    base, adapter_parameters = _unwrap_peft(model)
    _, adapter, blocks = causal_lm_parts(base, "set_trainable", allow_adapters=base is not model)
    if policy != "all" and not retrofitted_blocks(base):
        raise ValueError(f"policy {policy!r} needs a retrofitted model; call kallm.retrofit first (or use 'all')")
    adapters_trainable = [p.requires_grad for p in adapter_parameters]
    _apply_policy(base, adapter, blocks, policy)
    for parameter, trainable in zip(adapter_parameters, adapters_trainable):
        parameter.requires_grad_(trainable)
    return count_parameters(model, trainable_only=True)


def _apply_policy(model, adapter, blocks, policy):
    if policy == "all":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    for index in retrofitted_blocks(model):
        block = blocks[index]
        if policy == "retrofitted":
            for name in (adapter.mlp_attribute, *adapter.bypassed_attributes):
                getattr(block, name).requires_grad_(True)
        else:
            block.requires_grad_(True)
    if policy == "tail+embeddings":
        model.get_input_embeddings().requires_grad_(True)
        output = model.get_output_embeddings()
        if output is not None:
            output.requires_grad_(True)
        model.get_submodule(adapter.final_norm_path).requires_grad_(True)


def _unwrap_peft(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    """The model under a ``PeftModel`` (or ``model`` itself) and the parameters of its adapters."""
    if not isinstance(model, PeftModel):
        return model, []
    base = model.get_base_model()
    return base, [
        parameter
        for module in base.modules() if isinstance(module, BaseTunerLayer)
        for name in module.adapter_layer_names
        for parameter in getattr(module, name).parameters()
    ]


def summary(model: nn.Module, print_table: bool = True) -> dict:
    """Parameter counts: total, trainable, in KAN modules, and per decoder block.

    Returns a dict (``total``, ``trainable``, ``kan``, ``adapters``, ``blocks``: a list of
    per-block dicts) and, unless ``print_table=False``, prints it as a table. For a ``PeftModel``
    the counts include the adapters (``adapters`` counts them alone; 0 without PEFT), and ``kan``
    counts the KAN feedforwards with any adapters inside them.
    """
    base, adapter_parameters = _unwrap_peft(model)
    _, adapter, blocks = causal_lm_parts(base, "summary", allow_adapters=base is not model)
    retrofitted = set(retrofitted_blocks(base))
    rows = []
    for index, block in enumerate(blocks):
        if is_kan_feedforward(getattr(block, adapter.mlp_attribute)):
            label = "kan"
        else:
            label = "linear restart" if index in retrofitted else "original"
        rows.append({
            "block": index,
            "feedforward": label,
            "parameters": count_parameters(block),
            "trainable": count_parameters(block, trainable_only=True),
        })
    result = {
        "model": type(model).__name__,
        "total": count_parameters(model),
        "trainable": count_parameters(model, trainable_only=True),
        "kan": sum(count_parameters(m) for m in model.modules() if is_kan_feedforward(m)),
        "adapters": sum(p.numel() for p in adapter_parameters),
        "blocks": rows,
    }
    if print_table:
        print(format_summary(result))
    return result


def format_summary(result: dict) -> str:
    lines = [
        f"{result['model']}: {result['total']:,} parameters, {result['trainable']:,} trainable, "
        f"{result['kan']:,} in KAN feedforwards" + (f", {result['adapters']:,} in adapters" if result["adapters"] else ""),
        "",
        "| block | feedforward | parameters | trainable |",
        "|---:|---|---:|---:|",
    ]
    lines += [f"| {r['block']} | {r['feedforward']} | {r['parameters']:,} | {r['trainable']:,} |" for r in result["blocks"]]
    return "\n".join(lines)
