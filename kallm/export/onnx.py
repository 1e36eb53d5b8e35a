"""ONNX export of a causal LM (retrofitted or not) with its KV cache, and the check against PyTorch.

The export is one graph: ``input_ids``, ``attention_mask``, ``position_ids`` and the past keys and values of every
layer go in; ``logits`` and the present keys and values (past + new tokens) come out. Batch, new tokens and past
length are dynamic, so the same graph runs the prompt (with a past of length 0) and every decoding step: one file of
weights, one trace, and a runtime loop that never switches graphs.

Tracing goes through transformers' own ONNX exporter (``transformers.exporters.OnnxExporter``: ``torch.export`` with
the patches and pytree registrations that make its caches traceable, then ``torch.onnx``), under
``torch.no_grad()``, so the KAN layers run kallm's inference path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.save import check_output_folder, replacing_checkpoint
from ..core.function_layers import is_channel_functions
from ..core.kan_function import _is_quantized
from ..core.layers import is_kan_linear
from ..inference import eval_mode
from ..surgery.checks import base_model_type, causal_lm_parts

#: the packages the export and the check need: ``pip install 'kallm[onnx]'``
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
#: the oldest torch transformers' exporter runs on
MIN_TORCH = "2.11"
#: families whose export was checked against PyTorch (logits and greedy tokens with the cache)
EXPORTABLE_FAMILIES = ("gpt2", "llama")
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
SETTINGS_FILE = "kallm_onnx.json"
FORMAT_VERSION = 1
#: the sizes of the example inputs traced: none may be 0 or 1, which torch.export would fix as constants
_TRACE_BATCH, _TRACE_PAST, _TRACE_NEW = 2, 3, 2


def export_onnx(model: nn.Module, folder: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Export ``model`` (a float32 causal LM of a family in ``EXPORTABLE_FAMILIES``) to ONNX in ``folder``.

    Writes ``model.onnx`` (the graph) and ``model.onnx.data`` (the weights), ``config.json`` (and
    ``generation_config.json``), the tokenizer when given, and ``kallm_onnx.json`` (the inputs and outputs and how a
    decoding loop feeds them). Everything is checked before anything is written; the files are written into a
    temporary folder beside ``folder`` and moved in at the end, so a failure leaves no half-written folder. An
    existing non-empty ``folder`` is refused unless ``overwrite``. Check the result with :func:`check_onnx`.
    """
    require_onnx_packages()
    family = check_exportable(model)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot export to {folder}: it is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; choose another folder or pass overwrite=True "
                              f"(--overwrite) to replace its files")
    check_output_folder(folder, (model,))
    with eval_mode(model), torch.no_grad():
        program = _trace(model, family)
    inputs, outputs = _name_inputs_and_outputs(program)
    settings = {
        "format_version": FORMAT_VERSION,
        "model_type": model.config.model_type,
        "family": family,
        "bases": sorted(_bases_of(model)),
        "inputs": inputs,
        "outputs": outputs,
        "usage": (
            "One graph for the prompt and every decoding step. First call: the prompt's input_ids, attention_mask "
            "(1 per token) and position_ids (0..n-1), and every past.* input with past_sequence = 0. Each next "
            "call: the new tokens' ids, attention_mask over past and new tokens, their position_ids, and "
            "past.N.key/value = the previous call's present.N.key/value. logits[:, -1] scores the next token."
        ),
        "versions": _versions(),
    }
    import onnx_ir

    with replacing_checkpoint(folder, model) as staging:
        onnx_ir.save(program, str(staging / MODEL_FILE), external_data=DATA_FILE)
        model.config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return folder


def require_onnx_packages() -> None:
    """Raise ImportError naming the extra when onnx, onnxscript or onnxruntime is missing, or torch is too old for
    transformers' exporter."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"the ONNX export needs {', '.join(missing)} (not installed); install them with "
                          f"pip install 'kallm[onnx]'")
    if _release(torch.__version__) < _release(MIN_TORCH):
        raise ImportError(f"the ONNX export needs torch >= {MIN_TORCH} (transformers' exporter), this is torch "
                          f"{torch.__version__}")


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def check_exportable(model: nn.Module) -> str:
    """The family of ``model`` if kallm can export it; otherwise a ValueError naming what is not supported."""
    causal_lm_parts(model, "export_onnx")
    family = base_model_type(model.config)
    if not (hasattr(model, "can_generate") and model.can_generate()):
        raise ValueError(f"export_onnx exports causal LMs; {type(model).__name__} does not generate text (load the "
                         f"model with AutoModelForCausalLM)")
    if family not in EXPORTABLE_FAMILIES:
        raise ValueError(f"the ONNX export does not support the {family!r} family yet; supported families: "
                         f"{', '.join(EXPORTABLE_FAMILIES)}")
    quantized = [name for name, p in model.named_parameters() if _is_quantized(p)]
    if quantized:
        raise ValueError(f"{quantized[0]} is quantized (kallm.quantize); export the unquantized model: torchao's "
                         f"tensors have no ONNX form")
    not_float32 = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if not_float32:
        raise ValueError(f"the ONNX export takes float32 models, this one holds {', '.join(not_float32)} weights; "
                         f"convert it with model.float() first")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("some weights of this model are on the meta device (not loaded); load the weights first")
    return family


def _bases_of(model) -> set[str]:
    names = set()
    for module in model.modules():
        if is_kan_linear(module) or is_channel_functions(module):
            names.update(module.basis.describe()["basis"].split("+"))
    return names


def _trace(model, family):
    """The ONNX program of ``model``'s forward with a cache, traced on small example inputs with dynamic sizes."""
    from torch.export import Dim
    from transformers.exporters import OnnxConfig, OnnxExporter
    from transformers.exporters.exporter_dynamo import get_auto_dynamic_shapes

    device = next(model.parameters()).device
    vocab_size = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab_size, (_TRACE_BATCH, _TRACE_PAST + _TRACE_NEW), generator=generator).to(device)
    cache = model(input_ids=ids[:, :_TRACE_PAST], use_cache=True).past_key_values
    example = {
        "input_ids": ids[:, _TRACE_PAST:],
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(_TRACE_PAST, _TRACE_PAST + _TRACE_NEW, device=device).expand(_TRACE_BATCH, -1),
        "past_key_values": cache,
    }
    rows_and_tokens = {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}

    def cache_shapes(spec):  # each cached tensor is (batch, heads, past_sequence, head_dim)
        return {0: Dim.DYNAMIC, 2: Dim.DYNAMIC} if isinstance(spec, dict) else [cache_shapes(s) for s in spec]

    dynamic_shapes = {"input_ids": rows_and_tokens, "attention_mask": rows_and_tokens,
                      "position_ids": rows_and_tokens, "past_key_values": cache_shapes(get_auto_dynamic_shapes(cache))}
    try:
        program, _ = OnnxExporter().export_program(model, example, OnnxConfig(dynamic_shapes=dynamic_shapes))
    except Exception as error:
        from ..core.bases import _BUILTIN_FACTORIES, custom_bases

        bases = sorted(_bases_of(model))
        user_bases = custom_bases("+".join(bases)) if bases else []
        hint = (f"; the user bases {', '.join(user_bases)} may compute outside torch (torch.export traces torch "
                f"operations only); kallm's bases all trace: {', '.join(_BUILTIN_FACTORIES)}" if user_bases else "")
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"the ONNX exporter could not trace this {family} model (KAN bases: "
                         f"{', '.join(bases) or 'none'}){hint}: {type(error).__name__}: {first_line}") from error
    return program


_PAST_NAME = re.compile(r"past_key_values\.layers\.(\d+)\.(key|value)s")
_PRESENT_NAME = re.compile(r"cache\.layers\.(\d+)\.(key|value)s")


def _name_inputs_and_outputs(program) -> tuple[list[dict], list[dict]]:
    """Give the graph's inputs and outputs kallm's names and readable dimension names; return their descriptions.

    Past keys and values become ``past.N.key`` / ``past.N.value``, present ones ``present.N.key`` /
    ``present.N.value``."""
    import onnx_ir

    def describe(value, dims):
        value.shape = onnx_ir.Shape(dims)
        return {"name": value.name, "dtype": value.dtype.name.lower(), "shape": list(dims)}

    def readable(value, names):  # symbolic dimensions named, fixed ones kept
        return [name if not isinstance(dim, int) else dim for dim, name in zip(value.shape.dims, names)]

    graph = program.graph
    inputs, outputs = [], []
    for value in graph.inputs:
        if value.name in ("input_ids", "position_ids"):
            inputs.append(describe(value, ["batch", "sequence"]))
        elif value.name == "attention_mask":
            inputs.append(describe(value, ["batch", "past_sequence + sequence"]))
        else:
            match = _PAST_NAME.fullmatch(value.name)
            if match is None:
                raise ValueError(f"the exported graph has an input kallm does not know: {value.name}")
            value.name = f"past.{match[1]}.{match[2]}"
            inputs.append(describe(value, readable(value, ["batch", "heads", "past_sequence", "head_dim"])))
    for value in graph.outputs:
        if value.name == "logits":
            outputs.append(describe(value, readable(value, ["batch", "sequence", "vocab"])))
            continue
        match = _PRESENT_NAME.fullmatch(value.name)
        if match is None:
            raise ValueError(f"the exported graph has an output kallm does not know: {value.name}")
        value.name = f"present.{match[1]}.{match[2]}"
        outputs.append(describe(value, readable(value, ["batch", "heads", "past_sequence + sequence", "head_dim"])))
    return inputs, outputs


def _versions() -> dict:
    import onnx
    import onnxscript
    import transformers

    from .. import __version__

    return {"kallm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__}


@dataclass
class OnnxCheck:
    """What :func:`check_onnx` measured: ONNX Runtime against PyTorch on the same prompt."""

    max_logit_diff: float  # largest |logit difference| over the prompt and every decoding step
    torch_tokens: list[list[int]]  # greedy new tokens of model.generate(do_sample=False), per row
    onnx_tokens: list[list[int]]  # greedy new tokens of the ONNX Runtime loop with the cache, per row
    torch_seconds: float = field(default=0.0)  # model.generate for the prompt and the new tokens
    onnx_seconds: float = field(default=0.0)  # the ONNX Runtime loop for the same

    @property
    def tokens_match(self) -> bool:
        return self.torch_tokens == self.onnx_tokens

    def summary(self) -> str:
        new_tokens = sum(len(row) for row in self.torch_tokens)
        speed = ""
        if self.torch_seconds > 0 and self.onnx_seconds > 0:
            speed = (f"; generation tokens/s: PyTorch {new_tokens / self.torch_seconds:.1f}, ONNX Runtime "
                     f"{new_tokens / self.onnx_seconds:.1f}")
        verdict = "identical" if self.tokens_match else "DIFFERENT"
        return (f"max |logit diff| {self.max_logit_diff:.3g}; greedy tokens ({new_tokens} new) {verdict} between "
                f"PyTorch and ONNX Runtime{speed}")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_match": self.tokens_match}


def check_onnx(model: nn.Module, folder: str | os.PathLike, input_ids: torch.Tensor, new_tokens: int = 8,
               threads: int | None = None) -> OnnxCheck:
    """Run the export in ``folder`` with ONNX Runtime against ``model`` in PyTorch on ``input_ids`` (batch, length).

    Measures the largest logit difference (prompt and each decoding step) and decodes ``new_tokens`` greedily both
    ways: ``model.generate(do_sample=False)`` and an ONNX Runtime loop feeding each step's present keys and values
    back as the next step's past. Both run exactly ``new_tokens`` steps (end-of-sequence tokens do not stop them).
    ``threads``: ONNX Runtime's intra-op threads (default: torch's)."""
    require_onnx_packages()
    import numpy as np
    import onnxruntime

    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no {MODEL_FILE}; export one with kallm.export_onnx")
    input_ids = torch.as_tensor(input_ids).cpu()
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) token ids with length >= 1, got shape "
                         f"{tuple(input_ids.shape)}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])

    device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad():
        generation_config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
        generation_config.update(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=None,
                                 eos_token_id=None, num_beams=1, temperature=None, top_p=None, top_k=None,
                                 return_dict_in_generate=True, output_logits=True)
        if generation_config.pad_token_id is None:
            generation_config.pad_token_id = 0  # no row ends early, so no padding is ever written
        started = time.perf_counter()
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=torch.ones_like(input_ids).to(device),
                                   generation_config=generation_config)
        torch_seconds = time.perf_counter() - started
        torch_tokens = generated.sequences[:, input_ids.shape[1]:].cpu()
        prompt_logits = model(input_ids=input_ids.to(device)).logits.float().cpu().numpy()
    # generate's step logits (the last position of each forward) for the tokens both sides decoded
    step_logits = [logits.float().cpu().numpy() for logits in generated.logits]

    batch, length = input_ids.shape
    empty = {}
    for spec in session.get_inputs():
        if spec.name.startswith("past."):
            _, heads, _, head_dim = spec.shape
            empty[spec.name] = np.zeros((batch, heads, 0, head_dim), np.float32)
    started = time.perf_counter()
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": np.ones((batch, length), np.int64),
             "position_ids": np.tile(np.arange(length, dtype=np.int64), (batch, 1)), **empty}
    output_names = [spec.name for spec in session.get_outputs()]
    onnx_tokens, onnx_step_logits = [], []
    for step in range(new_tokens):
        results = dict(zip(output_names, session.run(None, feeds)))
        if step == 0:
            onnx_prompt_logits = results["logits"]
        last = results["logits"][:, -1]
        onnx_step_logits.append(last)
        token = last.argmax(-1).astype(np.int64)[:, None]
        onnx_tokens.append(token)
        position = length + step
        feeds = {"input_ids": token, "attention_mask": np.ones((batch, position + 1), np.int64),
                 "position_ids": np.full((batch, 1), position, np.int64)}
        feeds.update({name.replace("present.", "past.", 1): value for name, value in results.items()
                      if name.startswith("present.")})
    onnx_seconds = time.perf_counter() - started

    diffs = [np.abs(onnx_prompt_logits - prompt_logits).max()]
    diffs += [np.abs(ours - theirs).max() for ours, theirs in zip(onnx_step_logits, step_logits)]
    return OnnxCheck(
        max_logit_diff=float(max(diffs)),
        torch_tokens=torch_tokens.tolist(),
        onnx_tokens=np.concatenate(onnx_tokens, axis=1).tolist(),
        torch_seconds=torch_seconds,
        onnx_seconds=onnx_seconds,
    )
