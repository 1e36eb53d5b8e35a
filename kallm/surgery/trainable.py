"""Which parameters train (``set_trainable``) and where parameters sit (``summary``)."""

from __future__ import annotations

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..core.function_layers import is_channel_functions, is_function_form
from ..core.layers import count_parameters, is_kan_feedforward
from ..core.retrofit_config import read_retrofit_config, retrofitted_blocks
from .checks import causal_lm_parts, feedforward_attributes

POLICIES = ("retrofitted", "functions", "tail", "tail+embeddings", "all")
#: the roles of an MLP layout (``Architecture.mlp_layout``) that hold its weights
PROJECTION_ROLES = ("gate", "up", "gate_up", "down")


def set_trainable(model: nn.Module, policy: str = "tail+embeddings") -> int:
    """Freeze everything, then unfreeze by ``policy``; returns the trainable parameter count.

    - ``"retrofitted"``: the replaced feedforwards only (KAN modules, or the restarted MLPs; for ``form="glu"``
      the MLPs' projections and their functions).
    - ``"functions"``: for ``form="glu"`` only, the learnable functions of the retrofitted blocks (their
      coefficients, input scales and basis parameters) and nothing else; a ``form="kan"`` model is refused,
      since its KAN feedforwards are all function (train them with ``"retrofitted"``).
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
    _, architecture, blocks = causal_lm_parts(base, "set_trainable", allow_adapters=base is not model)
    if policy != "all" and not retrofitted_blocks(base):
        raise ValueError(f"policy {policy!r} needs a retrofitted model; call kallm.retrofit first (or use 'all')")
    if policy == "functions":
        recorded = read_retrofit_config(base.config)
        if recorded.kind != "kan" or recorded.form != "glu":
            retrofitted = f"form={recorded.form!r}" if recorded.kind == "kan" else f"kind={recorded.kind!r}"
            raise ValueError(f"policy 'functions' trains the functions that kallm.retrofit(..., form='glu') adds; "
                             f"this model was retrofitted with {retrofitted}, which has none: train its blocks with "
                             f"'retrofitted' (valid policies: {', '.join(POLICIES)})")
    adapters_trainable = [p.requires_grad for p in adapter_parameters]
    _apply_policy(base, architecture, blocks, policy)
    for parameter, trainable in zip(adapter_parameters, adapters_trainable):
        parameter.requires_grad_(trainable)
    return count_parameters(model, trainable_only=True)


def _apply_policy(model, architecture, blocks, policy):
    if policy == "all":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    for index in retrofitted_blocks(model):
        block = blocks[index]
        if policy == "retrofitted":
            for name in feedforward_attributes(model, architecture):
                getattr(block, name).requires_grad_(True)
        elif policy == "functions":
            for module in block.modules():
                if is_channel_functions(module):
                    module.requires_grad_(True)
        else:
            block.requires_grad_(True)
    if policy == "tail+embeddings":
        model.get_input_embeddings().requires_grad_(True)
        output = model.get_output_embeddings()
        if output is not None:
            output.requires_grad_(True)
        model.get_submodule(architecture.final_norm_path).requires_grad_(True)


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

    Returns a dict (``total``, ``trainable``, ``kan``, ``functions``, ``function_overhead``, ``adapters``,
    ``blocks``: a list of per-block dicts) and, unless ``print_table=False``, prints it as a table. For a
    ``PeftModel`` the counts include the adapters (``adapters`` counts them alone; 0 without PEFT), and ``kan``
    counts the KAN feedforwards with any adapters inside them. ``functions`` counts the learnable functions of
    ``form="glu"`` blocks and ``function_overhead`` divides it by the parameters of the MLP projections they sit
    on (0 without such blocks).
    """
    base, adapter_parameters = _unwrap_peft(model)
    _, architecture, blocks = causal_lm_parts(base, "summary", allow_adapters=base is not model)
    retrofitted = set(retrofitted_blocks(base))
    attribute = feedforward_attributes(base, architecture)[0]
    rows = []
    projections = 0
    for index, block in enumerate(blocks):
        feedforward = getattr(block, attribute)
        if is_kan_feedforward(feedforward):
            label = "kan"
        elif is_function_form(feedforward):
            label = "glu"
            projections += _projection_parameters(block, architecture)
        else:
            label = "linear restart" if index in retrofitted else "original"
        rows.append({
            "block": index,
            "feedforward": label,
            "parameters": count_parameters(block),
            "trainable": count_parameters(block, trainable_only=True),
            "functions": sum(count_parameters(m) for m in block.modules() if is_channel_functions(m)),
        })
    functions = sum(row["functions"] for row in rows)
    result = {
        "model": type(model).__name__,
        "total": count_parameters(model),
        "trainable": count_parameters(model, trainable_only=True),
        "kan": sum(count_parameters(m) for m in model.modules() if is_kan_feedforward(m)),
        "functions": functions,
        "function_overhead": functions / projections if projections else 0.0,
        "adapters": sum(p.numel() for p in adapter_parameters),
        "blocks": rows,
    }
    if print_table:
        print(format_summary(result))
    return result


def _projection_parameters(block, architecture) -> int:
    """Parameters of the projections of a block's MLP, found by the architecture's layout (in the block itself when the
    MLP is spread over it, as in OPT)."""
    holder = block if architecture.bypassed_attributes else getattr(block, architecture.mlp_attribute)
    return sum(count_parameters(getattr(holder, name))
               for role, name in architecture.mlp_layout if role in PROJECTION_ROLES)


def format_summary(result: dict) -> str:
    functions = result.get("functions", 0)
    lines = [
        f"{result['model']}: {result['total']:,} parameters, {result['trainable']:,} trainable, "
        f"{result['kan']:,} in KAN feedforwards"
        + (f", {functions:,} in learnable functions ({result['function_overhead']:.2%} of the MLP projections "
           f"they sit on)" if functions else "")
        + (f", {result['adapters']:,} in adapters" if result["adapters"] else ""),
        "",
        "| block | feedforward | parameters | trainable |",
        "|---:|---|---:|---:|",
    ]
    lines += [f"| {r['block']} | {r['feedforward']} | {r['parameters']:,} | {r['trainable']:,} |" for r in result["blocks"]]
    return "\n".join(lines)
