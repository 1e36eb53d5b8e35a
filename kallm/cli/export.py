"""``kallm export onnx MODEL --out DIR``: export a causal LM with its KV cache to ONNX and check it against PyTorch."""

from __future__ import annotations

import argparse

from ..values import path_or_hub_id, positive_int

#: formats ``kallm export`` writes
FORMATS = ("onnx",)
DEFAULT_PROMPT = "The capital of France is"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=FORMATS, help="the format to export to")
    parser.add_argument("model", type=path_or_hub_id, help="folder (or hub id, .gguf, bundled name) of a model, retrofitted or not")
    parser.add_argument("--out", required=True, help="folder to write model.onnx, its weights, config and tokenizer")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip running the export with ONNX Runtime against PyTorch")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text the check runs both models on")
    parser.add_argument("--new-tokens", type=positive_int, default=16, help="greedy tokens the check decodes both ways")


def run(args) -> int:
    from ..checkpoints.load import load_model
    from ..export.onnx import check_onnx, export_onnx, require_onnx_packages

    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens must be at least 1, got {args.new_tokens}")
    try:
        require_onnx_packages()
    except ImportError as error:  # a missing package is the user's to install: one line, not a traceback
        raise ValueError(str(error)) from error
    model, tokenizer = load_model(args.model)
    folder = export_onnx(model, args.out, tokenizer, overwrite=args.overwrite)
    print(f"exported {args.model} to {folder}")
    if not args.check:
        return 0
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    result = check_onnx(model, folder, input_ids, new_tokens=args.new_tokens)
    print(f"check on {args.prompt!r}: {result.summary()}")
    return 0 if result.tokens_match else 1
