"""Comparing models: logits, per-block feedforward errors, snapshots of everything a refused call must keep,
compiled against eager."""

from __future__ import annotations

import copy

import torch

from ..core.retrofit_config import retrofitted_blocks
from ..surgery.architectures import architecture_for
from ..surgery.calibration import record_feedforwards


def logits_of(model, ids):
    """``model``'s logits on ``ids``, without building a graph: what two models are compared by."""
    with torch.no_grad():
        return model(ids).logits


def block_errors(model, original, ids):
    """Relative error of each retrofitted feedforward against the original one on ``ids``."""
    architecture = architecture_for(original.config.model_type)
    records = record_feedforwards(original, architecture, retrofitted_blocks(model), list(ids), progress=False)
    blocks = model.get_submodule(architecture.blocks_path)
    errors = {}
    with torch.no_grad():
        for index, (inputs, outputs) in records.items():
            prediction = getattr(blocks[index], architecture.mlp_attribute)(inputs)
            errors[index] = float((prediction - outputs).norm() / outputs.norm())
    return errors


def snapshot(model):
    """Everything a refused retrofit call must leave as it was."""
    return {
        "class": type(model),
        "config": copy.deepcopy(model.config.to_dict()),
        "modules": [(name, id(module)) for name, module in model.named_modules()],
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "restarted": list(getattr(model.config, "kallm_restarted_layers", None) or []),
    }


def assert_unchanged(model, before):
    """``model`` is as :func:`snapshot` saw it: same class, config, modules and tensors."""
    after = snapshot(model)
    assert after["class"] is before["class"]
    assert after["config"] == before["config"]
    assert after["modules"] == before["modules"]
    assert after["restarted"] == before["restarted"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert after["tensors"][key].device == value.device and after["tensors"][key].shape == value.shape, key
        if not value.is_meta:  # meta tensors hold no values to compare
            assert torch.equal(after["tensors"][key], value), key


def check_compiles_as_one_graph(model, x) -> None:
    """``torch.compile(model, fullgraph=True)`` (a graph break fails) gives the eager outputs and gradients."""
    eager_y = model(x)
    eager_grads = torch.autograd.grad(eager_y.square().sum(), [x, *model.parameters()])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled_y = compiled(x)
    compiled_grads = torch.autograd.grad(compiled_y.square().sum(), [x, *model.parameters()])
    for actual, expected in zip([compiled_y, *compiled_grads], [eager_y, *eager_grads]):
        torch.testing.assert_close(actual, expected)
