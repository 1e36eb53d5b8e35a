"""A saved retrofitted checkpoint evaluated the way lm-evaluation-harness's ``hf`` model loads it
(``--model_args pretrained=DIR,trust_remote_code=True``): in a fresh process where kallm cannot
be imported, through AutoConfig/AutoModelForCausalLM/AutoTokenizer. Its BBH log-likelihoods and
greedy replies must equal those of ``kallm eval``. lm-eval itself is not needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import kallm
from kallm.eval import bbh
from kallm.testing.data import TOY
from kallm.testing.models import chat_model
from kallm.testing.processes import BLOCK_KALLM
from kallm.testing.tokenizers import make_tiny_tokenizer

HARNESS_LIKE = BLOCK_KALLM + r"""
import json
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

folder, examples = sys.argv[1], json.loads(sys.argv[2])
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
out = {"class": type(model).__name__, "module": type(model).__module__, "examples": []}
for example in examples:
    context = tokenizer.apply_chat_template([{"role": "user", "content": example["input"]}], tokenize=False,
                                            add_generation_prompt=True)
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    scores = []
    for choice in example["choices"]:
        ids = context_ids + tokenizer(choice, add_special_tokens=False).input_ids
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        scores.append(sum(float(logprobs[t - 1, ids[t]]) for t in range(len(context_ids), len(ids))))
    with torch.no_grad():
        generated = model.generate(torch.tensor([context_ids]), max_new_tokens=8, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
    reply = tokenizer.decode(generated[0, len(context_ids):], skip_special_tokens=True).strip()
    out["examples"].append({"logprobs": scores, "reply": reply})
print("RESULTS " + json.dumps(out))
"""


def test_saved_checkpoint_scores_the_same_through_transformers_auto_classes(tmp_path):
    model = kallm.retrofit(chat_model("llama"), last_n=2)
    folder = tmp_path / "kan"
    model.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)

    loaded, tokenizer = kallm.load_model(str(folder))
    data = {"boolean_expressions": TOY["boolean_expressions"], "hyperbaton": TOY["hyperbaton"]}
    scored = bbh.evaluate_bbh(loaded, tokenizer, data, mode="loglik", progress=False)["examples"]
    replies = bbh.generate_replies(loaded, tokenizer, [bbh.build_prompt(tokenizer, e["input"])
                                                       for examples in data.values() for e in examples],
                                   max_new_tokens=8)
    examples = [{"input": data[r["task"]][r["index"]]["input"], "choices": r["choices"]} for r in scored]

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    completed = subprocess.run([sys.executable, "-c", HARNESS_LIKE, str(folder), json.dumps(examples)],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                               stdin=subprocess.DEVNULL)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(next(line for line in completed.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert result["class"] == "KALlamaForCausalLM" and result["module"].endswith(".modeling_kallm")
    for record, other in zip(scored, result["examples"]):
        assert torch.allclose(torch.tensor(record["logprobs"]), torch.tensor(other["logprobs"]), atol=1e-4)
    assert [other["reply"] for other in result["examples"]] == replies and any(replies)
