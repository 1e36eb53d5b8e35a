"""What the mini model of ``kallm sweep`` saves and costs: parameters, seconds per training step of a
classifier (full model against mini model, side by side in one run), tokens per text and language-model loss before and
after the vocabulary is trimmed.

    python scripts/bench/bench_mini_model.py --data $KALLM_DATA_DIR/classification/ag_news \
        --json docs/results/bench_mini_model.json --markdown docs/results/bench_mini_model.md
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from skeleton import add_report_flags, argument_parser, parse_arguments, write_report

import kallm
from kallm.core.layers import count_parameters
from kallm.data.classification import batch, encode, read_rows


def seconds_per_step(model, examples, pad_id, batch_size, steps, warmup=1) -> float:
    """Median seconds of a full AdamW training step of ``model`` as a classifier over ``examples``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for step in range(warmup + steps):
        chosen = [examples[(step * batch_size + i) % len(examples)] for i in range(batch_size)]
        input_ids, attention, labels = batch(chosen, pad_id)
        started = time.perf_counter()
        model(input_ids=input_ids, attention_mask=attention, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.no_grad()
def bits_per_character(model, tokenizer, texts) -> tuple[float, float]:
    """``(bits per character, tokens per text)`` of ``model`` as a language model on ``texts``, one at a time;
    per character, so that tokenizers that split a text differently compare."""
    model.eval()
    total, characters, lengths = 0.0, 0, []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        lengths.append(ids.shape[1])
        total += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        characters += len(text)
    return total / characters / math.log(2), statistics.fmean(lengths)


def classifier_of(causal_lm, num_labels, pad_id):
    """``causal_lm``'s blocks with a fresh classification head, through a save-free config copy."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels, config.pad_token_id = num_labels, pad_id
    classifier = AutoModelForSequenceClassification.from_config(config)
    missing = classifier.load_state_dict(causal_lm.state_dict(), strict=False).missing_keys
    assert missing == ["score.weight"], missing
    return classifier


def main(argv=None) -> int:
    parser = argument_parser(__doc__, whole=True)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", required=True, help="folder with train.jsonl and dev.jsonl (text, label)")
    parser.add_argument("--num-blocks", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per model (after one warm-up)")
    parser.add_argument("--eval-texts", type=int, default=100, help="training and dev texts to score the language-model loss on")
    add_report_flags(parser, required=True)
    args = parse_arguments(parser, argv)

    train = read_rows(str(Path(args.data) / "train.jsonl"), "train", "text", "label", None)
    dev = read_rows(str(Path(args.data) / "dev.jsonl"), "test", "text", "label", None)
    num_labels = max(row["label"] for row in train) + 1
    model, tokenizer = kallm.load_model(args.model)
    blocks_only, _ = kallm.shrink(model, tokenizer, num_blocks=args.num_blocks)
    mini, mini_tokenizer = kallm.shrink(model, tokenizer, num_blocks=args.num_blocks,
                                        vocab_from=[row["text"] for row in train])
    models = {"full": (model, tokenizer), f"{args.num_blocks} blocks": (blocks_only, tokenizer),
              f"{args.num_blocks} blocks, trimmed vocabulary": (mini, mini_tokenizer)}

    eval_texts = [row["text"] for row in dev[:args.eval_texts]]
    train_texts = [row["text"] for row in train[:args.eval_texts]]
    results = {"model": args.model, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
               "max_length": args.max_length, "rows": []}
    for name, (causal_lm, causal_tokenizer) in models.items():
        dev_bits, dev_tokens = bits_per_character(causal_lm, causal_tokenizer, eval_texts)
        train_bits, train_tokens = bits_per_character(causal_lm, causal_tokenizer, train_texts)
        examples = encode(causal_tokenizer, train[:args.batch_size * (args.steps + 1)], args.max_length)
        classifier = classifier_of(causal_lm, num_labels, causal_tokenizer.pad_token_id)
        row = {
            "model": name, "parameters": count_parameters(causal_lm), "vocabulary": len(causal_tokenizer),
            "embedding_parameters": causal_lm.get_input_embeddings().weight.numel(),
            "seconds_per_step": seconds_per_step(classifier, examples, causal_tokenizer.pad_token_id,
                                                 args.batch_size, args.steps),
            "train_bits_per_character": train_bits, "train_tokens_per_text": train_tokens,
            "dev_bits_per_character": dev_bits, "dev_tokens_per_text": dev_tokens,
        }
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        del classifier
    full = results["rows"][0]
    lines = [
        f"# The mini model against {args.model}", "",
        f"Classifier training step: batch {args.batch_size} x up to {args.max_length} tokens of AG News, AdamW over "
        f"every parameter, median of {args.steps} steps after one warm-up, {results['threads']} threads. Language "
        f"model loss in bits per character (lower is better) on {len(train_texts)} training and {len(eval_texts)} dev texts (the vocabulary is "
        f"trimmed to the {len(train)} training texts, so dev texts hold tokens it lacks).", "",
        "| model | parameters | vocabulary | s/step | speed-up | train bits/char | tokens/text | dev bits/char | "
        "tokens/text |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['model']} | {row['parameters']:,} | {row['vocabulary']:,} | {row['seconds_per_step']:.3f} | "
            f"{full['seconds_per_step'] / row['seconds_per_step']:.1f}x | {row['train_bits_per_character']:.3f} | "
            f"{row['train_tokens_per_text']:.1f} | {row['dev_bits_per_character']:.3f} | {row['dev_tokens_per_text']:.1f} |"
        )
    write_report(results, "\n".join(lines) + "\n", args.json, args.markdown)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
