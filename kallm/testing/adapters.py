"""Checks that an adapter trained on KAN layers (LoRA or the KAN adapter) only loads on a base retrofitted alike."""

from __future__ import annotations

import json

import torch

from ..finetune import load_adapter
from ..surgery import retrofit
from .models import tiny_model

#: the refusal of an adapter made on a tiny Llama retrofitted in blocks 1 and 2, loaded on one retrofitted in 0 and 1
_MISMATCH = (r"the adapter.* holds parts for KAN layers in blocks \[1, 2\], but this model has KAN feedforwards in "
             r"blocks \[0, 1\]: the parts for blocks \[2\] would be dropped")


def check_adapter_refused_on_other_kan_blocks(folder, logits_of, adapted_logits) -> None:
    """The adapter saved in ``folder`` (LoRA or KAN adapter, with parts on the KAN layers of a tiny Llama retrofitted
    in blocks 1 and 2, whose logits were ``adapted_logits``) is refused on a base retrofitted elsewhere, naming the
    blocks on each side, by every loader, and loads exactly on a base retrofitted alike."""
    import peft
    import pytest  # only this check needs it: the rest of kallm.testing works without pytest

    other = lambda: retrofit(tiny_model("llama"), blocks=[0, 1]).eval()  # noqa: E731
    for load in (load_adapter, peft.PeftModel.from_pretrained):
        with pytest.raises(ValueError, match=_MISMATCH):
            load(other(), folder)
    with pytest.raises(ValueError, match=r"in blocks \[1, 2\], but this model has KAN feedforwards in blocks none"):
        load_adapter(tiny_model("llama"), folder)
    # PEFT shortens long target lists to suffixes without block indices; the adapter's weights still name them
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.layers.0", "mlp.layers.1"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=_MISMATCH):
        load_adapter(other(), folder)
    same_blocks = retrofit(tiny_model("llama"), blocks=[1, 2]).eval()
    torch.testing.assert_close(logits_of(load_adapter(same_blocks, folder)), adapted_logits, rtol=0, atol=0)
