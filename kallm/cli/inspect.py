"""``kallm inspect DIR``: the parameter table and KAN settings of a saved model."""

from __future__ import annotations

import argparse
import json

from ..checkpoints.load import load_model
from ..surgery.trainable import summary
from ..values import path_or_hub_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=path_or_hub_id, help="folder (or hub id, .gguf, bundled name) of a model")


def run(args) -> int:
    model, _ = load_model(args.model)
    kan_config = getattr(model.config, "kan_config", None)
    if kan_config is None:
        print(f"{args.model} is not retrofitted (model_type {model.config.model_type!r}).\n")
    else:
        print("kan_config:\n" + json.dumps(kan_config, indent=2) + "\n")
    summary(model)
    return 0
