"""Fresh Python processes: loading a saved checkpoint as a user with or without kallm would, and the benchmark
scripts as modules."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

#: the folder that holds the kallm package: a fresh process that may import kallm finds it there
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
#: the benchmark scripts of a source checkout
SCRIPTS = PACKAGE_ROOT / "scripts" / "bench"

#: the portable modules a retrofitted checkpoint carries for ``trust_remote_code=True`` users
CODE_FILES = (
    "modeling_kallm.py", "configuration_kallm.py", "retrofit_config.py", "layers.py", "bases.py", "kan_function.py",
    "delta_checkpoint.py", "function_layers.py", "model_card.py",
)

#: the start of a script for a fresh interpreter in which importing kallm fails, so that only the code saved beside
#: a checkpoint can be used (what a user without kallm has)
BLOCK_KALLM = r"""
import importlib.abc, sys
class BlockKallm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kallm" or name.startswith("kallm."):
            raise ImportError("kallm is blocked in this process")
sys.meta_path.insert(0, BlockKallm())
"""

# Runs in a fresh interpreter, cwd outside the repository. With "block_kallm", a meta path
# finder makes every kallm import fail, so only the code saved in the folder can be used.
FRESH_PROCESS = r"""
import importlib.abc, json, sys
request = json.loads(sys.argv[1])
if request["block_kallm"]:
    class BlockKallm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "kallm" or name.startswith("kallm."):
                raise ImportError("kallm is blocked in this process")
    sys.meta_path.insert(0, BlockKallm())
    load_kwargs = {"trust_remote_code": True}
else:
    import kallm  # registers the retrofitted classes with transformers
    load_kwargs = {}
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

results = {"models": {}}
for name, (folder, reference) in request["models"].items():
    model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs).eval()
    ref = torch.load(reference)
    with torch.no_grad():
        logits = model(ref["ids"]).logits
    state = model.state_dict()
    entry = results["models"][name] = {
        "max_abs_diff": (logits - ref["logits"]).abs().max().item(),
        "module": type(model).__module__,
        "class": type(model).__name__,
        "kan_tensors_equal": all(torch.equal(state[k], v) for k, v in ref["kan_state"].items()),
        "tied": model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr(),
    }
    if request.get("generate"):
        tokenizer = AutoTokenizer.from_pretrained(folder, **load_kwargs)
        output = model.generate(ref["ids"], max_new_tokens=request["generate"], do_sample=False)
        entry["new_tokens"] = output[0, ref["ids"].shape[1]:].tolist()
        entry["reply"] = tokenizer.decode(entry["new_tokens"], skip_special_tokens=True)
if "tokenizer_folder" in request:
    tokenizer = AutoTokenizer.from_pretrained(request["tokenizer_folder"], **load_kwargs)
    results["tokenizer_ids"] = tokenizer("w1 w5")["input_ids"]
results["refused"] = {}
for name, folder in request.get("refused", {}).items():
    try:
        AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)
        results["refused"][name] = None
    except ValueError as error:
        results["refused"][name] = str(error)
try:
    import kallm  # noqa: F811
    results["kallm_importable"] = True
except ImportError:
    results["kallm_importable"] = False
print("\nRESULTS " + json.dumps(results))
"""


def run_fresh_processes(requests: dict, tmp_path) -> dict:
    """Run FRESH_PROCESS on each request (models: name -> [folder, reference file]) side by
    side, each in its own folder; their results by the same keys."""
    running = {}
    for key, request in requests.items():
        folder = tmp_path / key
        folder.mkdir(parents=True)
        env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
        # The reference logits were computed here: the same thread count keeps a CPU's matrix kernels summing in
        # the same order, so that any difference is the load path's.
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(folder / "hf_modules"),
                   OMP_NUM_THREADS=str(torch.get_num_threads()))
        if not request["block_kallm"]:
            env["PYTHONPATH"] = str(PACKAGE_ROOT)
        running[key] = subprocess.Popen(
            [sys.executable, "-c", FRESH_PROCESS, json.dumps(request)], cwd=folder, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    results = {}
    for key, process in running.items():
        stdout, stderr = process.communicate(timeout=600)
        assert "Do you wish to run the custom code" not in stdout, f"{key}: a load path asked for trust_remote_code"
        assert process.returncode == 0, f"{key}: {stderr[-4000:]}"
        line = next(line for line in stdout.splitlines() if line.startswith("RESULTS "))
        results[key] = json.loads(line[len("RESULTS "):])
    return results


def load_script(name):
    """The benchmark script ``name`` as a module, its sibling imports (skeleton) found as when it is run."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
