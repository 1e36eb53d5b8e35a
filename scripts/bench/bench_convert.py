"""Measure kallm.convert on a tiny retrofitted Llama: the logit gap of exact conversions between every pair
of polynomial bases, and the reported error and logit gap of lossy ones. Prints the markdown tables of
docs/transfer.md.

    python scripts/bench/bench_convert.py [--bases cheby2 legendre ...]
"""

from __future__ import annotations

import copy
import warnings

import torch
import transformers
from skeleton import argument_parser

import kallm
from kallm.core.bases import RecurrenceBasis, make_basis

#: (source basis, source degree, target basis, target degree, target options) of the lossy examples
LOSSY = [
    ("cheby2", 3, "legendre", 2, {}),
    ("cheby2", 3, "legendre", 1, {}),
    ("cheby2", 3, "bspline", 1, {"grid_size": 5}),
    ("cheby2", 3, "rbf", 6, {}),
    ("cheby2", 3, "rbf", 12, {}),
    ("rational", 2, "cheby2", 4, {}),
    ("bspline", 3, "cheby2", 6, {}),
]


def tiny_retrofitted(basis: str, degree: int, seed: int = 0) -> torch.nn.Module:
    """A 3-block random Llama (hidden 32) with KAN blocks 1 and 2, whose biases, input maps and basis
    parameters are moved away from their initial values as training would."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, num_hidden_layers=3, max_position_embeddings=64, hidden_size=32, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    model = kallm.retrofit(transformers.AutoModelForCausalLM.from_config(config).eval(), layers=[1, 2],
                           basis=basis, degree=degree)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, kallm.KANLinear):
                module.bias.normal_(0.0, 0.1)
                module.input_scale.uniform_(0.5, 2.0)
                module.input_shift.normal_(0.0, 0.3)
                for parameter in module.basis_parameters:
                    parameter.normal_(0.0, 0.3)
    return model


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def exact_rows(bases: list[str], degrees=(2, 3, 4)) -> list[dict]:
    """Per source basis: the largest |logit difference| over every target basis and degree, for the float32 model
    and for the same model cast to float64 before converting (where float32 rounding of the new coefficients is
    gone and only the conversion's own error would show), and the logit scale."""
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    for source in bases:
        model = tiny_retrofitted(source, 2)
        model64 = copy.deepcopy(model).double()
        reference, reference64 = _logits(model, tokens), _logits(model64, tokens)
        worst = worst64 = 0.0
        for target in bases:
            for degree in degrees:
                converted = kallm.convert(copy.deepcopy(model), basis=target, degree=degree)
                worst = max(worst, float((_logits(converted, tokens) - reference).abs().max()))
                converted64 = kallm.convert(copy.deepcopy(model64), basis=target, degree=degree)
                worst64 = max(worst64, float((_logits(converted64, tokens) - reference64).abs().max()))
        rows.append({"source": source, "max_logit_difference": worst, "max_logit_difference_float64": worst64,
                     "logit_scale": float(reference.abs().max())})
    return rows


def lossy_rows(cases=LOSSY) -> list[dict]:
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    for source, source_degree, target, degree, options in cases:
        model = tiny_retrofitted(source, source_degree)
        reference = _logits(model, tokens)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = kallm.convert(model, basis=target, degree=degree, allow_lossy=True, **options)
        report = converted.kallm_conversion_report
        rows.append({
            "conversion": f"{source} {source_degree} -> {target} {degree}",
            "exact": report.exact,
            "relative_error": report.max_relative_error,
            "max_logit_difference": float((_logits(converted, tokens) - reference).abs().max()),
        })
    return rows


def format_tables(exact: list[dict], lossy: list[dict]) -> str:
    lines = [
        "| source (degree 2) | largest logit difference, float32 | same, model in float64 | largest logit |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['source']} | {r['max_logit_difference']:.2g} | {r['max_logit_difference_float64']:.2g} | "
        f"{r['logit_scale']:.2g} |"
        for r in exact
    ]
    lines += ["", "| conversion | exact | reported relative error | largest logit difference |", "|---|---|---:|---:|"]
    lines += [
        f"| {r['conversion']} | {'yes' if r['exact'] else 'no'} | {r['relative_error']:.2g} | "
        f"{r['max_logit_difference']:.2g} |"
        for r in lossy
    ]
    return "\n".join(lines)


def main(argv=None):
    polynomials = [name for name in kallm.list_bases() if isinstance(make_basis(name, 2), RecurrenceBasis)]
    parser = argument_parser(__doc__)
    parser.add_argument("--bases", nargs="+", default=polynomials, help="polynomial bases to convert between")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(format_tables(exact_rows(args.bases), lossy_rows()))


if __name__ == "__main__":
    main()
