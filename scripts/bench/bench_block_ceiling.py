"""How well each feedforward form can copy one pretrained MLP block-locally: the form's ceiling, apart from healing.

For each chosen block of SmolLM2-135M-Instruct, the MLP's inputs and outputs are recorded on healing text (the part
of WikiText-2 test after the scored tokens, Tiny Shakespeare, the OpenAssistant chats) and on held-out text (the
first ``--score-tokens`` tokens of WikiText-2 test, which ``bench_heal.py`` scores). Each form starts from its fit
init and is then trained block-locally (Adam on the relative squared error, batches of ``--batch`` rows, cosine
decay) for ``--steps`` steps; the relative error ``||f(x) - y|| / ||y||`` on the training rows and on the held-out
rows is recorded along the way. A form whose held-out error stays far above what healing needs, while its training
error keeps falling, overfits; one whose training error flattens high lacks the capacity or the optimiser.

Forms (parameters against the MLP's; SmolLM2's has 2,654,208):

- ``kan``: the research's form at the default size (half the MLP's parameters), fit init;
- ``kan-full``: the same at the MLP's parameter count;
- ``kan-base-silu``: with a silu base branch, half the MLP's parameters, fit init;
- ``gated-half``: ``form="gated"``, ``base="linear"``, half the MLP's parameters, fit init (the MLP's top channels);
- ``gated``: the same at the MLP's parameter count.

    KALLM_DATA_DIR=../shared/data python scripts/bench/bench_block_ceiling.py --blocks 25 --steps 1500
    # writes docs/results/bench_block_ceiling.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from bench_heal import data_paths, split_wikitext
from skeleton import add_output_flag, add_threads_flag, argument_parser, parse_arguments, write_report_at

FORMS = {
    "kan": {"share": 0.5},
    "kan-full": {"share": 1.0},
    "kan-base-silu": {"share": 0.5, "base": "silu"},
    "gated-half": {"share": 0.5, "base": "linear", "gated": True},
    "gated": {"share": 1.0, "base": "linear", "gated": True},
}


def parse(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--blocks", default="25", help="comma-separated block indices")
    parser.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of: {', '.join(FORMS)}")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=512, help="rows per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-scales", default={}, type=role_scales,
                        help="ROLE=SCALE,...: learning rate scales by parameter role (kallm.parameter_groups)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--train-tokens", type=int, default=32768)
    parser.add_argument("--score-tokens", type=int, default=8192)
    add_threads_flag(parser, 1)
    add_output_flag(parser, "bench_block_ceiling")
    return parse_arguments(parser, argv)


def record(args):
    """``{block: {"train": (x, y), "held_out": (x, y), "original": mlp}}`` from the bundled model."""
    import kallm
    from kallm.surgery.architectures import architecture_for
    from kallm.surgery.calibration import record_feedforwards

    paths = data_paths()
    model, tokenizer = kallm.load_model(args.model)
    scored, rest = split_wikitext(paths["wikitext"].read_text(encoding="utf-8"), tokenizer, args.score_tokens)
    texts = [rest, paths["shakespeare"].read_text(encoding="utf-8")]
    texts += [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
              for line in paths["oasst"].read_text(encoding="utf-8").splitlines() if line.strip()]
    share = args.train_tokens // len(texts[:3])  # the same number of tokens from each source
    train_ids = [tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:share]
                 for text in (texts[0], texts[1], "".join(texts[2:]))]
    held_ids = tokenizer(scored, add_special_tokens=False, return_tensors="pt").input_ids[0]
    architecture = architecture_for(model.config.model_type)
    blocks = [int(b) for b in args.blocks.split(",")]

    def pieces(ids_list):
        return [ids[s:s + 512] for ids in ids_list for s in range(0, ids.numel(), 512)]

    train = record_feedforwards(model, architecture, blocks, pieces(train_ids), progress=False)
    held = record_feedforwards(model, architecture, blocks, pieces([held_ids]), progress=False)
    layers = model.get_submodule(architecture.blocks_path)
    return {b: {"train": train[b], "held_out": held[b], "original": layers[b].mlp} for b in blocks}, architecture


def build(form: str, original, x, y, architecture):
    from kallm.core.layers import KANFeedForward, intermediate_size_for_budget
    from kallm.surgery.fit import fit_feedforward, fit_gated_feedforward

    spec = FORMS[form]
    options = {key: value for key, value in spec.items() if key != "share"}
    hidden, budget = x.shape[1], int(mlp_parameters(original) * spec["share"])
    size = intermediate_size_for_budget(hidden, budget, "cheby2", 2, **options)
    feedforward = KANFeedForward(hidden, size, "cheby2", 2, **options)
    if spec.get("gated"):
        fit_gated_feedforward(feedforward, x, y, original, dict(architecture.mlp_layout))
    else:
        fit_feedforward(feedforward, x, y, original)
    return feedforward


def role_scales(text: str) -> dict[str, float]:
    """``--lr-scales base=0.1,coefficients=2`` as ``{"base": 0.1, "coefficients": 2.0}``, checked as
    ``kallm.parameter_groups`` checks it."""
    from kallm.train.parameter_groups import check_role_scales

    try:
        scales = {role.strip(): float(value) for role, _, value in
                  (pair.partition("=") for pair in text.split(",") if pair.strip())}
        check_role_scales(scales, "--lr-scales")
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"takes ROLE=SCALE pairs such as base=0.1,coefficients=2: {error}") from None
    return scales


def mlp_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def relative_error(feedforward, x, y) -> float:
    prediction = torch.cat([feedforward(x[s:s + 4096]) for s in range(0, len(x), 4096)])
    return float((prediction - y).norm() / y.norm())


def train(feedforward, data, args) -> list[dict]:
    (x, y), (hx, hy) = data["train"], data["held_out"]
    import kallm

    optimizer = torch.optim.Adam(kallm.parameter_groups(feedforward, args.lr, args.lr_scales))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)))
    generator = torch.Generator().manual_seed(0)
    scale = y.pow(2).sum(1).mean()
    curve = [{"step": 0, "train": relative_error(feedforward, x, y), "held_out": relative_error(feedforward, hx, hy)}]
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(x), (args.batch,), generator=generator)
        loss = (feedforward(x[rows]) - y[rows]).pow(2).sum(1).mean() / scale
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, "train": relative_error(feedforward, x, y),
                          "held_out": relative_error(feedforward, hx, hy),
                          "seconds": round(time.perf_counter() - started, 1)})
            print(f"    step {step}: train {curve[-1]['train']:.3f}, held-out {curve[-1]['held_out']:.3f}", flush=True)
    return curve


def markdown(results, args) -> str:
    scales = " --lr-scales " + ",".join(f"{k}={v:g}" for k, v in args.lr_scales.items()) if args.lr_scales else ""
    lines = [f"Block-local fit of SmolLM2-135M-Instruct's MLPs: fit init, then {args.steps} Adam steps of "
             f"{args.batch} rows (lr {args.lr:g}, cosine) on {args.train_tokens:,} tokens of healing text; relative "
             f"error on those rows (train) and on the first {args.score_tokens:,} tokens of WikiText-2 test "
             f"(held-out). Command: `python scripts/bench/bench_block_ceiling.py --blocks {args.blocks} --steps "
             f"{args.steps}" + scales + "`.", "",
             "| block | form | parameters | x MLP | train: init | train: end | held-out: init | held-out: best | "
             "held-out: end |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        curve = r["curve"]
        share = r["parameters"] / r["mlp_parameters"]
        lines.append(f"| {r['block']} | {r['form']} | {r['parameters']:,} | {share:.2f} | "
                     f"{curve[0]['train']:.3f} | {curve[-1]['train']:.3f} | {curve[0]['held_out']:.3f} | "
                     f"{min(p['held_out'] for p in curve):.3f} | {curve[-1]['held_out']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    unknown = sorted(set(args.forms.split(",")) - set(FORMS))
    if unknown:
        raise SystemExit(f"unknown forms {unknown}; valid: {', '.join(FORMS)}")
    records, architecture = record(args)
    results = []
    for block, data in records.items():
        for form in args.forms.split(","):
            print(f"== block {block}, {form}", flush=True)
            torch.manual_seed(0)
            feedforward = build(form, data["original"], *data["train"], architecture)
            results.append({"block": block, "form": form, "intermediate_size": feedforward.intermediate_size,
                            "parameters": mlp_parameters(feedforward),
                            "mlp_parameters": mlp_parameters(data["original"]),
                            "curve": train(feedforward, data, args)})
    report = markdown(results, args)
    print(report)
    write_report_at(args.output, {"args": vars(args), "results": results}, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
