"""``kallm retrofit``: load a model, retrofit it, print its parameter table, save (and push)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import yaml

from ..checkpoints.load import DEFAULT_MODEL, load_model, push_to_hub
from ..checkpoints.save import check_output_folder, save_checkpoint
from ..core.kan_function import BASE_BRANCHES
from ..core.layers import KANFeedForward
from ..core.retrofit_config import INITS
from ..surgery.fit import format_errors
from ..surgery.retrofit import FORMS, KINDS, retrofit
from ..surgery.trainable import POLICIES, set_trainable, summary
from ..values import existing_path, finite_int, path_or_hub_id, positive_int


def parse_options(pairs: list[str]) -> dict:
    """``["alpha=0.5", "input_map=tanh"]`` -> ``{"alpha": 0.5, "input_map": "tanh"}``."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option takes KEY=VALUE, got {pair!r}")
        options[key] = yaml.safe_load(value)
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, type=path_or_hub_id, help="hub id, folder, .gguf file or bundled name")
    parser.add_argument("--out", required=True, help="folder to save the retrofitted model and tokenizer to")
    parser.add_argument("--last-n", type=positive_int, default=5, help="retrofit the last N decoder blocks")
    parser.add_argument("--blocks", type=finite_int, nargs="+", help="explicit decoder block indices (overrides --last-n)")
    parser.add_argument("--layers", type=finite_int, nargs="+", dest="deprecated_layers", help=argparse.SUPPRESS)
    parser.add_argument("--basis", default="cheby2", help="basis name, 'a+b' (parallel) or 'a>b' (sequential)")
    parser.add_argument("--degree", type=positive_int, default=2, help="polynomial degree (or basis size) of each edge function")
    parser.add_argument("--intermediate-size", type=positive_int, help="KAN inner size (default: half the MLP's parameters)")
    parser.add_argument("--base", choices=BASE_BRANCHES,
                        help="add a base branch to every KAN layer: a matrix on silu(x) or on x beside the basis "
                             "functions (default: none, the research's form)")
    parser.add_argument("--kind", default="kan", choices=KINDS,
                        help="kan, or linear for the re-initialised MLP baseline")
    parser.add_argument("--form", default="kan", choices=FORMS,
                        help="kan: a KAN feedforward; glu: the MLP keeps its projections and gains learnable "
                             "functions that start at zero, so the model starts exactly at the original")
    parser.add_argument("--function-groups", type=positive_int,
                        help="--form glu: channels share functions in this many groups (default: one per channel)")
    parser.add_argument("--init", default="random", choices=INITS,
                        help="fit: start each KAN feedforward fitted to the MLP it replaces (see docs/fit-init.md)")
    parser.add_argument("--calibration", metavar="FILE", type=existing_path,
                        help="text file to fit on with --init fit (default: replies the model writes itself)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE", help="layer/basis option, repeatable")
    parser.add_argument("--trainable", default="tail+embeddings", choices=POLICIES,
                        help="policy used for the trainable column")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the saved folder to this Hub repo")


def run(args) -> int:
    options = parse_options(args.option)
    blocks = args.blocks
    if args.deprecated_layers is not None:
        if blocks is not None:
            raise ValueError("give --blocks or its deprecated name --layers, not both")
        warnings.warn("kallm retrofit --layers is deprecated: use --blocks", FutureWarning, stacklevel=2)
        blocks = args.deprecated_layers
    # Check the settings before spending time on loading the model.
    check_output_folder(args.out, (args.model,))
    try:
        KANFeedForward.count_parameters(2, 2, args.basis, args.degree, base=args.base, **options)
    except TypeError as error:  # an --option value of the wrong type
        raise ValueError(f"bad layer settings (--basis {args.basis}, --degree {args.degree}, --option): "
                         f"{error}") from error
    calibration = None
    if args.calibration:
        if args.init != "fit":
            raise ValueError("--calibration is only used with --init fit")
        calibration = [Path(args.calibration).read_text(encoding="utf-8")]
    print(f"Loading {args.model} ...")
    model, tokenizer = load_model(args.model)
    print(f"Retrofitting ({args.kind}, form {args.form}, basis {args.basis}, degree {args.degree}) ...")
    retrofit(
        model, last_n=args.last_n, blocks=blocks, basis=args.basis, degree=args.degree,
        intermediate_size=args.intermediate_size, base=args.base, kind=args.kind, form=args.form,
        function_groups=args.function_groups, init=args.init, calibration=calibration,
        tokenizer=tokenizer, **options,
    )
    if args.init == "fit":
        print("Fit relative error per block: " + format_errors(model.kallm_fit_report))
    set_trainable(model, args.trainable)
    summary(model)
    save_checkpoint(model, tokenizer, args.out)
    print(f"\nSaved to {args.out}. Load it with AutoModelForCausalLM.from_pretrained({args.out!r}) "
          f"(after `import kallm`) or with trust_remote_code=True.")
    if args.push_to_hub:
        print(f"Pushed: {push_to_hub(model, args.push_to_hub, tokenizer=tokenizer)}")
    return 0
