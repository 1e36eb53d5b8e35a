"""``kallm demo``: the main job, end to end on the bundled SmolLM2-135M-Instruct, offline.

1. Generate chat data with the original model (its replies to prompts kallm ships).
2. Retrofit the last 5 blocks: once with ``form="glu"`` (the MLPs kept, zero-initialised functions added, so
   it computes exactly what the original did), and with the research's form, by default with
   function-preserving init fitted on the generated training conversations.
3. Heal with ``kallm.heal`` for a fixed budget (2 minutes by default): block-local training of
   each new feedforward, then distillation from the original through the retrofitted tail.
4. Measure perplexity and chat loss on held-out generated conversations (and WikiText /
   a BBH subset when ``--text`` / ``--bbh-dir`` or ``$KALLM_DATA_DIR`` provide them)
   for the original, the exact start, the fitted and the healed model.
5. Save, reload in a fresh Python process through ``AutoModelForCausalLM`` with
   ``trust_remote_code=True``, and reply to a prompt.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

from ..checkpoints.load import DEFAULT_MODEL, load_model
from ..checkpoints.save import check_output_folder, save_checkpoint
from ..core.retrofit_config import INITS
from ..data.folder import data_folder
from ..eval.evaluate import evaluate
from ..heal.loop import CURVE_FILE, heal
from ..inference import chat_prompt, generate_replies
from ..surgery.fit import format_errors
from ..surgery.retrofit import retrofit
from ..surgery.trainable import summary
from ..values import Number, existing_path, non_negative_float, path_or_hub_id, positive_int

PROMPTS = (
    "Explain why the sky looks blue during the day.",
    "Give me three tips for keeping houseplants healthy.",
    "What is the difference between weather and climate?",
    "Write a short poem about a rainy morning.",
    "How do vaccines help the body fight disease?",
    "Summarize the water cycle in a few sentences.",
    "What are some good habits for studying effectively?",
    "Describe how a bicycle works.",
    "Why do we have seasons on Earth?",
    "Suggest a simple recipe for a vegetable soup.",
    "What does a computer's processor do?",
    "How can I improve my sleep?",
    "Explain what photosynthesis is to a ten-year-old.",
    "What are the main causes of ocean tides?",
    "Give two arguments for learning a second language.",
    "How does a refrigerator keep food cold?",
    "What is a prime number? Give examples.",
    "Describe the life cycle of a butterfly.",
    "Why is regular exercise good for the heart?",
    "What should I pack for a weekend hiking trip?",
    "Explain how a rainbow forms.",
    "What is the role of bees in agriculture?",
    "How do I write a polite email asking for a deadline extension?",
    "What is the difference between a virus and a bacterium?",
    "Describe a typical day of a lighthouse keeper.",
    "Why does ice float on water?",
    "List some ways to reduce plastic waste at home.",
    "How does the moon change its shape over a month?",
    "What is gravity?",
    "Give me a short story opening about a lost key.",
    "How do airplanes stay in the air?",
    "What makes a good team leader?",
)
QUESTION = "What is the capital of France?"
#: the demo heals for this many minutes by default (on 2 CPU cores the whole demo takes about 5)
HEAL_MINUTES = 2.0
HEAL_SHAKESPEARE_CHARACTERS = 300_000
#: chat data the demo heals on (HH-RLHF stays out: kallm's benchmarks score held-out chat loss on it)
HEAL_CHAT_FILES = ("chat/oasst_en100/all_paths.jsonl",)


def conversations(prompts, replies) -> list[dict]:
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            for p, r in zip(prompts, replies)]


def write_jsonl(rows, path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def healing_texts(tokenizer, conversations_kept: list[dict]) -> list[str]:
    """The demo's healing text: its generated training conversations, plus Tiny Shakespeare and the OpenAssistant
    conversations under ``$KALLM_DATA_DIR`` when present. Never WikiText-2, which scores the result."""
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in conversations_kept]
    data_dir = data_folder()
    if data_dir:
        shakespeare = Path(data_dir, "text/tinyshakespeare/input.txt")
        if shakespeare.is_file():
            texts.append(shakespeare.read_text(encoding="utf-8")[:HEAL_SHAKESPEARE_CHARACTERS])
        for chat in HEAL_CHAT_FILES:
            path = Path(data_dir, chat)
            if path.is_file():
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                texts += [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in rows]
    return texts


def measure(model, tokenizer, held_out: Path, args) -> dict:
    tasks = ["chat_loss"] + (["perplexity"] if args.text else []) + (["bbh"] if args.bbh_dir else [])
    results = evaluate(
        model, tokenizer, tasks, chat_data=str(held_out), text=args.text, max_tokens=args.text_tokens,
        bbh_source=args.bbh_dir, bbh_tasks=args.bbh_tasks, limit=args.bbh_limit, mode="loglik", progress=True,
    )
    row = {"chat_loss": results["chat_loss"]["loss"]}
    if "perplexity" in results:
        row["perplexity"] = results["perplexity"]["perplexity"]
    if "bbh" in results:
        row["bbh"] = results["bbh"]["average"]
    return row


def format_table(rows: dict[str, dict]) -> str:
    columns = [("chat_loss", "held-out chat loss", "{:.3f}"), ("perplexity", "WikiText-2 perplexity", "{:.2f}"),
               ("bbh", "BBH accuracy (loglik)", "{:.1%}")]
    columns = [c for c in columns if any(c[0] in row for row in rows.values())]
    lines = ["| model | " + " | ".join(c[1] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(c[2].format(row[c[0]]) for c in columns) + " |")
    return "\n".join(lines)


RELOAD_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, question = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=40, do_sample=False)
print(type(model).__name__, "|", tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
"""


def reload_and_reply(folder: Path, question: str) -> str:
    """Load ``folder`` in a fresh interpreter that never imports kallm (remote code path).

    The child runs inside ``folder`` (so a kallm source tree in the caller's working directory
    cannot shadow the remote code), hence the absolute path: a relative one would no longer
    exist there and transformers would take it for a hub id.
    """
    folder = Path(folder).resolve()
    result = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(folder), question], capture_output=True,
                            text=True, cwd=folder, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"reloading {folder} in a fresh process failed:\n{result.stderr[-2000:]}")
    return result.stdout.strip().splitlines()[-1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data_dir = data_folder()
    wikitext = Path(data_dir, "text/wikitext2/wiki.test.raw") if data_dir else None
    bbh = Path(data_dir, "bbh/bbh") if data_dir else None
    parser.add_argument("--model", default=DEFAULT_MODEL, type=path_or_hub_id,
                        help="model to retrofit: a hub id, a folder, a .gguf file or a bundled name")
    parser.add_argument("--out", default="runs/demo", help="working folder; the healed model goes to OUT/model")
    parser.add_argument("--last-n", type=positive_int, default=5, help="retrofit the last N decoder blocks")
    parser.add_argument("--basis", default="cheby2", help="KAN basis (kallm.list_bases(), or a composed spec)")
    parser.add_argument("--degree", type=positive_int, default=2, help="degree of the basis")
    parser.add_argument("--init", default="fit", choices=INITS,
                        help="fit (default): start from the MLPs' function, fitted on the generated conversations")
    parser.add_argument("--heal-minutes", type=non_negative_float, default=HEAL_MINUTES,
                        help="wall-clock budget of kallm.heal (0 skips healing; default %(default)s)")
    parser.add_argument("--heal-steps", type=positive_int, help="also stop healing after this many end-to-end steps")
    parser.add_argument("--heal-data", type=path_or_hub_id,
                        help="healing text (.txt) or chat data; default: the generated training conversations, "
                             "plus Tiny Shakespeare and OpenAssistant chats under $KALLM_DATA_DIR if there")
    parser.add_argument("--held-out", type=positive_int, default=8, help="generated conversations kept for evaluation")
    parser.add_argument("--text", default=str(wikitext) if wikitext and wikitext.is_file() else None,
                        type=existing_path,
                        help="text file for perplexity (default: WikiText-2 test under $KALLM_DATA_DIR, if set)")
    parser.add_argument("--text-tokens", type=Number(int, 2), default=2048, help="tokens of --text scored")
    parser.add_argument("--bbh-dir", default=str(bbh) if bbh and bbh.is_dir() else None, type=existing_path,
                        help="BBH task folder (default: $KALLM_DATA_DIR/bbh/bbh, if set)")
    parser.add_argument("--bbh-tasks", default="boolean_expressions,navigate,causal_judgement,hyperbaton,"
                        "formal_fallacies", help="BBH tasks to score (comma-separated)")
    parser.add_argument("--bbh-limit", type=positive_int, default=12, help="examples per BBH task")
    parser.add_argument("--question", default=QUESTION, help="what the reloaded model is asked at the end")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="length of the generated replies")


def run(args) -> int:
    started = time.perf_counter()
    out = Path(args.out)
    if args.held_out >= len(PROMPTS):
        raise ValueError(f"--held-out must be below the {len(PROMPTS)} shipped prompts")
    check_output_folder(out, (args.model,))
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/6] Loading {args.model} ...", flush=True)
    model, tokenizer = load_model(args.model)
    original = copy.deepcopy(model).eval()

    print(f"[2/6] Generating {len(PROMPTS)} conversations with the original model ...", flush=True)
    replies = generate_replies(model, tokenizer, [chat_prompt(tokenizer, prompt) for prompt in PROMPTS],
                               max_new_tokens=args.max_new_tokens, batch_size=16, progress=True,
                               desc="generating conversations")
    data = conversations(PROMPTS, replies)
    write_jsonl(data[args.held_out:], out / "generated_train.jsonl")
    held_out = write_jsonl(data[:args.held_out], out / "generated_held_out.jsonl")
    rows = {"original": measure(original, tokenizer, held_out, args)}

    print(f"[3/6] Retrofitting the last {args.last_n} blocks: first form='glu' (the MLPs kept, zero functions "
          f"added: the exact start), then the research's form ({args.basis}, degree {args.degree}, {args.init} "
          f"init) ...", flush=True)
    # the glu form puts one basis on each channel: the first stage of a chained spec ("a>b")
    exact_start = retrofit(copy.deepcopy(original), last_n=args.last_n, basis=args.basis.split(">")[0],
                           degree=args.degree, form="glu")
    rows["retrofitted (form=glu, exact start)"] = measure(exact_start, tokenizer, held_out, args)
    del exact_start
    calibration = None
    if args.init == "fit":
        calibration = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in data[args.held_out:]]
    retrofit(model, last_n=args.last_n, basis=args.basis, degree=args.degree, init=args.init,
             calibration=calibration, tokenizer=tokenizer)
    if args.init == "fit":
        print("    fit relative error per block: " + format_errors(model.kallm_fit_report), flush=True)
    rows[f"retrofitted ({args.init} init)"] = measure(model, tokenizer, held_out, args)

    if args.heal_minutes > 0:
        print(f"[4/6] Healing with kallm.heal for {args.heal_minutes:g} minutes: block-local stage, then "
              f"distillation from the original through the retrofitted tail ...", flush=True)
        heal_data = args.heal_data or healing_texts(tokenizer, data[args.held_out:])
        report = heal(model, original, tokenizer, data=heal_data, minutes=args.heal_minutes, max_steps=args.heal_steps,
                      output_dir=str(out / "heal"), save_model=False)
        print(f"    {report.steps} steps, {report.tokens:,} tokens at {report.tokens_per_second:,.0f} tokens/s; "
              f"curve in {out / 'heal' / CURVE_FILE}", flush=True)
        model.eval()
        rows["healed (kallm.heal)"] = measure(model, tokenizer, held_out, args)
    del original
    summary(model)
    print("\n" + format_table(rows) + "\n", flush=True)

    folder = out / "model"
    print(f"[5/6] Saving to {folder} ...", flush=True)
    save_checkpoint(model, tokenizer, folder)
    (out / "demo_results.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    (out / "demo_results.md").write_text(format_table(rows) + "\n", encoding="utf-8")

    print("[6/6] Reloading in a fresh process (AutoModelForCausalLM, trust_remote_code=True) ...", flush=True)
    print(f"    Q: {args.question}\n    {reload_and_reply(folder, args.question)}")
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Results: {out / 'demo_results.md'}")
    return 0
