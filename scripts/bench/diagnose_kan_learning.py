"""Why a fresh KAN stack learns slower than a fresh linear one: per-block numbers over the first training steps.

Arms of ``configs/sweep-agnews.yaml`` (the mini model: SmolLM2-135M-Instruct cut to 3 blocks, an AG News
classifier) are built and trained exactly as ``kallm sweep`` does (same seed, data order, learning rate and warmup),
and every ``--every`` steps each replaced block reports, on a fixed batch of 64 training texts:

- ``in``: the root mean square of its feedforward's input (the normed residual stream) and ``out`` of its output,
  next to ``residual``, the residual stream entering the block;
- ``token spread``: the share of the output's variance that varies from token to token (1 - the share of a constant
  vector): a feedforward whose output hardly depends on its input passes no signal;
- ``saturated``: for KAN layers, the share of ``scale * x + shift`` with ``|.| > 2.65`` (``tanh`` above 0.99, where
  the basis functions flatten) in the first layer, and ``domain``: the root mean square of ``tanh(scale * x + shift)``
  there (the share of the basis' [-1, 1] domain the inputs use);
- ``grad``: the norm of the gradient of the feedforward's parameters, and ``update``: the size of the last step
  against the parameters' norm (``||delta|| / ||w||``);

with the dev accuracy at those steps.

    KALLM_DATA_DIR=../shared/data python scripts/bench/diagnose_kan_learning.py \\
        --arms fully-linear-restart,fully-kan-cheby2-d2 --steps 200 --every 25
    # writes docs/results/diagnose_kan_learning.{json,md}
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from skeleton import (
    ROOT,
    add_output_flag,
    add_threads_flag,
    argument_parser,
    parse_arguments,
    require_data,
    write_report_at,
)

SATURATED = 2.65  # tanh(2.65) = 0.99


def parse(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "sweep-agnews.yaml"))
    parser.add_argument("--arms", default="fully-linear-restart,fully-kan-cheby2-d2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    add_threads_flag(parser, 1)
    add_output_flag(parser, "diagnose_kan_learning")
    return parse_arguments(parser, argv)


class Probe:
    """Per-block statistics of a classifier's feedforwards on one fixed batch."""

    def __init__(self, model, batch):
        self.model, self.batch = model, batch
        self.blocks = model.model.layers
        self.previous = {i: self._flat(i).clone() for i in range(len(self.blocks))}

    def _flat(self, index):
        return torch.cat([p.detach().reshape(-1) for p in self.blocks[index].mlp.parameters()])

    @torch.no_grad()
    def measure(self) -> list[dict]:
        input_ids, attention, _ = self.batch
        real = attention.bool()
        seen = {}
        hooks = []
        for index, block in enumerate(self.blocks):
            hooks.append(block.register_forward_pre_hook(
                lambda m, args, index=index: seen.__setitem__(("residual", index), args[0][real])))
            hooks.append(block.mlp.register_forward_hook(
                lambda m, args, out, index=index: seen.__setitem__(index, (args[0][real], out[real]))))
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(input_ids=input_ids, attention_mask=attention)
        finally:
            self.model.train(was_training)
            for hook in hooks:
                hook.remove()
        rows = []
        for index, block in enumerate(self.blocks):
            x, y = seen[index]
            flat = self._flat(index)
            row = {"block": index, "residual": _rms(seen[("residual", index)]), "in": _rms(x), "out": _rms(y),
                   "token_spread": float(y.var(0).sum() / y.pow(2).mean(0).sum().clamp_min(1e-30)),
                   "grad": float(torch.cat([p.grad.reshape(-1) for p in block.mlp.parameters()
                                            if p.grad is not None]).norm()) if self._has_grad(index) else None,
                   "update": float((flat - self.previous[index]).norm() / flat.norm().clamp_min(1e-30))}
            self.previous[index] = flat.clone()
            layers = getattr(block.mlp, "layers", None)
            if layers is not None and layers[0].input_scale is not None:
                mapped = x * layers[0].input_scale + layers[0].input_shift
                row["saturated"] = float((mapped.abs() > SATURATED).float().mean())
                row["domain"] = _rms(torch.tanh(mapped))
            rows.append(row)
        return rows

    def _has_grad(self, index):
        return any(p.grad is not None for p in self.blocks[index].mlp.parameters())


def _rms(tensor) -> float:
    return float(tensor.float().pow(2).mean().sqrt())


def run_arm(name, config, inputs, args) -> dict:
    import kallm
    from kallm.data.classification import batch
    from kallm.eval.classification import accuracy
    from kallm.recipes.sweep import ARM_TRAIN_KEYS, arm_settings, build_arm

    arm = arm_settings(config, name)
    model = build_arm(inputs, arm, args.seed)
    pad = inputs.tokenizer.pad_token_id
    probe = Probe(model, batch(inputs.train[:64], pad))
    settings = {**config.train, **{key: arm[key] for key in ARM_TRAIN_KEYS if key in arm}}  # as the sweep trains it
    groups = kallm.parameter_groups(model, settings.get("learning_rate", 1e-3), settings.get("learning_rate_scales"))
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.get("weight_decay", 0.0))
    warmup = settings.get("warmup_steps", 0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    generator = torch.Generator().manual_seed(args.seed)  # the sweep's data order
    order, points, losses = [], [], []
    points.append({"step": 0, "accuracy": accuracy(model, inputs.dev, pad, 250), "blocks": probe.measure()})
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        model.train()
        if len(order) < settings.get("batch_size", 16):
            order += torch.randperm(len(inputs.train), generator=generator).tolist()
        size = settings.get("batch_size", 16)
        chosen, order = order[:size], order[size:]
        input_ids, attention, labels = batch([inputs.train[i] for i in chosen], pad)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        if step % args.every == 0:
            gradients = probe.measure()  # gradients of this step, before the optimiser consumes them
        optimizer.step()
        schedule.step()
        if step % args.every == 0:
            after = probe.measure()
            for row, with_grad in zip(after, gradients):  # this step's gradient; the update is this step's alone
                row["grad"] = with_grad["grad"]
            points.append({"step": step, "accuracy": accuracy(model, inputs.dev, pad, 250), "blocks": after,
                           "loss": sum(losses[-args.every:]) / args.every})
            print(f"  {name} step {step}: accuracy {100 * points[-1]['accuracy']:.1f}%, loss {points[-1]['loss']:.3f}",
                  flush=True)
        optimizer.zero_grad(set_to_none=True)
    return {"arm": name, "points": points, "seconds": time.perf_counter() - started, "first_losses": losses[:5]}


def markdown(results, args) -> str:
    lines = [f"Mini model of `{Path(args.config).name}`, seed {args.seed}, the sweep's training settings; statistics on "
             f"a fixed batch of 64 training texts (see the script's docstring). Command: `python "
             f"scripts/bench/diagnose_kan_learning.py --arms {args.arms} --steps {args.steps} --every {args.every}`.", "",
             "| arm | step | dev acc. | block | residual rms | in rms | out rms | token spread | saturated | tanh rms | "
             "grad norm | update / weight |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value, spec):
        return "" if value is None else format(value, spec)

    for result in results:
        for point in result["points"]:
            for row in point["blocks"]:
                lines.append(
                    f"| {result['arm']} | {point['step']} | {100 * point['accuracy']:.1f}% | {row['block']} | "
                    f"{row['residual']:.3f} | {row['in']:.3f} | {row['out']:.3f} | {row['token_spread']:.3f} | "
                    f"{cell(row.get('saturated'), '.3f')} | {cell(row.get('domain'), '.3f')} | "
                    f"{cell(row['grad'], '.3g')} | {cell(row['update'], '.2e')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from kallm.recipes.sweep import load_data, load_sweep, prepare_inputs, prepare_mini_model

    args = parse(argv)
    config = load_sweep(args.config)
    data = load_data(config)
    inputs = prepare_inputs(config, prepare_mini_model(config, data[0]), data)
    results = [run_arm(name.strip(), config, inputs, args) for name in args.arms.split(",")]
    report = markdown(results, args)
    print(report)
    write_report_at(args.output, {"args": vars(args), "results": results}, report)
    return 0


if __name__ == "__main__":
    require_data("diagnose_kan_learning.py (its sweep config reads AG News there)")
    raise SystemExit(main())
