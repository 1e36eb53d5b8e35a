"""Which parameters train (``set_trainable``) and where parameters sit (``summary``)."""

from __future__ import annotations

from torch import nn

from ..core.modeling_kallm import count_parameters
from .checks import causal_lm_parts, is_kan_feedforward
from .retrofit import retrofitted_layers

POLICIES = ("retrofitted", "tail", "tail+embeddings", "all")


def set_trainable(model: nn.Module, policy: str = "tail+embeddings") -> int:
    """Freeze everything, then unfreeze by ``policy``; returns the trainable parameter count.

    - ``"retrofitted"``: the replaced feedforwards only (KAN modules, or the restarted MLPs).
    - ``"tail"``: the whole retrofitted decoder blocks.
    - ``"tail+embeddings"``: those blocks, the token embeddings (tied with the LM head in
      SmolLM2) and the final norm; the research setup.
    - ``"all"``: every parameter.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown trainable policy {policy!r}; valid choices: {', '.join(POLICIES)}")
    _, adapter, blocks = causal_lm_parts(model, "set_trainable")
    if policy == "all":
        model.requires_grad_(True)
        return count_parameters(model, trainable_only=True)
    layers = retrofitted_layers(model)
    if not layers:
        raise ValueError(f"policy {policy!r} needs a retrofitted model; call kallm.retrofit first (or use 'all')")
    model.requires_grad_(False)
    for index in layers:
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
    return count_parameters(model, trainable_only=True)


def summary(model: nn.Module, print_table: bool = True) -> dict:
    """Parameter counts: total, trainable, in KAN modules, and per decoder block.

    Returns a dict (``total``, ``trainable``, ``kan``, ``blocks``: a list of per-block
    dicts) and, unless ``print_table=False``, prints it as a table.
    """
    _, adapter, blocks = causal_lm_parts(model, "summary")
    retrofitted = set(retrofitted_layers(model))
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
        "blocks": rows,
    }
    if print_table:
        print(format_summary(result))
    return result


def format_summary(result: dict) -> str:
    lines = [
        f"{result['model']}: {result['total']:,} parameters, {result['trainable']:,} trainable, "
        f"{result['kan']:,} in KAN feedforwards",
        "",
        "| block | feedforward | parameters | trainable |",
        "|---:|---|---:|---:|",
    ]
    lines += [f"| {r['block']} | {r['feedforward']} | {r['parameters']:,} | {r['trainable']:,} |" for r in result["blocks"]]
    return "\n".join(lines)
