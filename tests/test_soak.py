"""Soak: retrofit, train, save, reload in a fresh process, generate, extend, save again, three
times over on one tiny model; nothing may drift or pile up (logits, temporary files, open files)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
import torch

import kallm
from kallm.checkpoints.save import save_checkpoint
from kallm.surgery import retrofitted_blocks
from kallm.testing.compare import logits_of
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import make_tiny_tokenizer
from kallm.train import TrainConfig, train

pytestmark = pytest.mark.integration  # slow: the whole chain, three times over

PROMPT_IDS = [[1, 40, 50, 60, 41, 70, 33]]
PROMPT = torch.tensor(PROMPT_IDS)

# Runs where kallm cannot be imported (cwd is the checkpoint, PYTHONPATH cleared): the remote-code path.
FRESH_PROCESS = """
import json, sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
assert "kallm" not in sys.modules
folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert "kallm" not in sys.modules
with torch.no_grad():
    torch.save(model(ids).logits, folder + "/../fresh_logits.pt")
reply = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
print(json.dumps({"class": type(model).__name__, "reply": reply[0].tolist()}))
"""


def conversations():
    return [{"messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]}
            for a in range(4) for b in range(4)]


def reload_in_a_fresh_process(folder, tmp_dir):
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.update(TMPDIR=str(tmp_dir), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(folder.resolve()), json.dumps(PROMPT_IDS)],
                            cwd=folder, env=environment, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh_logits = torch.load(folder.parent / "fresh_logits.pt")
    (folder.parent / "fresh_logits.pt").unlink()
    return fresh_logits, json.loads(result.stdout.strip().splitlines()[-1])


def open_files() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_the_whole_chain_three_times_without_drift_or_leftovers(tmp_path, monkeypatch):
    tmp_dir = tmp_path / "tmp"  # everything tempfile makes in this process and the children goes here
    tmp_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_dir))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_dir))
    work = tmp_path / "work"
    work.mkdir()
    folder, run_dir = work / "model", work / "run"
    tokenizer, data = make_tiny_tokenizer(), conversations()
    model = kallm.retrofit(tiny_model("llama"), last_n=1)
    files_after_first_round = None

    for round_number in range(3):
        config = TrainConfig(output_dir=str(run_dir), max_steps=2, batch_size=4, max_length=60, learning_rate=1e-3,
                             warmup=0, logging_steps=1, save_steps=1000, progress_bar=False, seed=round_number,
                             bf16=round_number != 1)  # autocast in rounds 0 and 2: the model must come back unwrapped
        train(model, tokenizer, data, config)
        expected = logits_of(model.eval(), PROMPT)
        save_checkpoint(model, tokenizer, folder)

        in_process, _ = kallm.load_model(str(folder))
        assert torch.equal(logits_of(in_process.eval(), PROMPT), expected)
        # train's own final save
        assert torch.equal(logits_of(kallm.load_model(str(run_dir))[0].eval(), PROMPT), expected)
        fresh, answer = reload_in_a_fresh_process(folder, tmp_dir)
        assert torch.equal(fresh, expected), f"round {round_number}: the fresh process computes other logits"
        assert answer["class"] == type(model).__name__ and answer["reply"][: len(PROMPT_IDS[0])] == PROMPT_IDS[0]
        assert len(answer["reply"]) > len(PROMPT_IDS[0])  # it generated
        del in_process

        blocks = retrofitted_blocks(model)
        if len(blocks) < 3:
            kallm.retrofit(model, layers=[min(blocks) - 1])  # extend by one block, same settings
            assert retrofitted_blocks(model) == [min(blocks) - 1, *blocks]
        extended = logits_of(model.eval(), PROMPT)
        save_checkpoint(model, tokenizer, folder)
        assert torch.equal(logits_of(kallm.load_model(str(folder))[0].eval(), PROMPT), extended)
        assert json.loads((folder / "config.json").read_text())["kan_config"]["blocks"] == retrofitted_blocks(model)

        assert sorted(os.listdir(work)) == ["model", "run"], f"round {round_number}: left behind in {work}"
        assert os.listdir(tmp_dir) == [], f"round {round_number}: left behind in the temporary folder"
        if round_number == 0:
            files_after_first_round = open_files()  # the first round opens what stays open (imports, pools)
    assert open_files() <= files_after_first_round
