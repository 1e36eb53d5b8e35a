"""The shared prefix: the blocks before the first retrofitted one are the same in the student and the teacher,
so each batch runs them once, in the teacher, and the student starts from the teacher's hidden state there
(``Layout`` says where that is and whether it holds; ``PrefixCache`` keeps those states on disk across epochs)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.retrofit_config import read_retrofit_config, retrofitted_blocks
from ..surgery.checks import causal_lm_parts
from ..surgery.trainable import set_trainable
from ..train.runs import check_teacher


class Layout:
    """Where the prefix ends, what trains, and whether the prefix can be shared.

    Checks (changing nothing) that ``model`` is retrofitted and that ``teacher`` matches it
    outside the retrofitted feedforwards, except for parameters the policy trains.
    """

    def __init__(self, model, teacher, policy: str, progressive: bool = False):
        check_teacher(model, teacher)
        self.blocks = retrofitted_blocks(model)
        if not self.blocks:
            raise ValueError("the model has no retrofitted block; call kallm.retrofit first (heal brings a "
                             "retrofitted model back to its original)")
        if retrofitted_blocks(teacher):
            raise ValueError(f"the teacher is itself retrofitted (blocks {retrofitted_blocks(teacher)}); pass the "
                             f"original model the student was retrofitted from")
        student_type, self.adapter, self.student_blocks = causal_lm_parts(model, "heal")
        teacher_type, _, self.teacher_blocks = causal_lm_parts(teacher, "heal")
        if teacher_type != student_type:
            raise ValueError(f"the teacher is a {teacher_type} model but the student a {student_type} "
                             f"one; pass the original model the student was retrofitted from")
        if len(self.student_blocks) != len(self.teacher_blocks):
            raise ValueError(f"the teacher has {len(self.teacher_blocks)} blocks, the student "
                             f"{len(self.student_blocks)}; pass the original model the student was retrofitted from")
        if progressive and read_retrofit_config(model.config).form == "glu":
            raise ValueError("progressive=True blends each new feedforward in from the original, but form='glu' "
                             "starts exactly at the original already: heal it without progressive")
        self.first = min(self.blocks)
        self.trained = _trained_names(model, policy)
        self._check_teacher_matches(model, teacher)
        upstream = {id(tensor) for tensor in self.prefix_tensors(model, self.student_blocks).values()}
        self.shared_prefix = self.first > 0 and not any(
            id(p) in upstream for name, p in model.named_parameters() if name in self.trained)

    def feedforward_prefixes(self) -> tuple[str, ...]:
        names = (self.adapter.mlp_attribute, *self.adapter.bypassed_attributes)
        return tuple(f"{self.adapter.blocks_path}.{i}.{name}." for i in self.blocks for name in names)

    def _check_teacher_matches(self, model, teacher):
        replaced = self.feedforward_prefixes()
        student = {n: p for n, p in model.named_parameters() if not n.startswith(replaced)}
        original = {n: p for n, p in teacher.named_parameters() if not n.startswith(replaced)}
        problems = [f"{n} is missing in the teacher" for n in student if n not in original]
        problems += [f"{n} is missing in the student" for n in original if n not in student]
        for name, parameter in student.items():
            if name in original and name not in self.trained:
                other = original[name]
                if other.shape != parameter.shape or not torch.equal(other.detach().to(parameter.device),
                                                                     parameter.detach()):
                    problems.append(f"{name} differs")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ValueError(f"the teacher does not match the student outside the retrofitted blocks: "
                             f"{'; '.join(problems[:3])}{more}. Pass the original model the student was "
                             f"retrofitted from (parameters the trainable policy trains may differ)")

    def prefix_tensors(self, model, blocks) -> dict[str, torch.Tensor]:
        """The parameters and buffers of ``model`` (whose decoder blocks are ``blocks``) that act before the first
        retrofitted block (embeddings, prefix blocks, rotary tables), by name."""
        downstream = [*blocks[self.first:], model.get_submodule(self.adapter.final_norm_path)]
        output = model.get_output_embeddings()
        if output is not None and output.weight is not model.get_input_embeddings().weight:
            downstream.append(output)
        excluded = {id(t) for module in downstream for t in (*module.parameters(), *module.buffers())}
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        return {name: t for name, t in tensors.items() if id(t) not in excluded}

    def prefix_digest(self, teacher) -> str:
        """A hash of the teacher's prefix weights, which compute the shared prefix states."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.prefix_tensors(teacher, self.teacher_blocks).items()):
            data = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def _trained_names(model, policy: str) -> set[str]:
    """Names of the parameters ``set_trainable(model, policy)`` would train; the flags are left as they were."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        set_trainable(model, policy)
        return {name for name, p in model.named_parameters() if p.requires_grad}
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def prefix_replaced(blocks, count: int, hidden: Callable[[], torch.Tensor]):
    """Within the block, ``blocks[:count]`` do no work: each returns ``hidden()``.

    Decoder blocks (transformers 5) return their hidden states as a tensor, so the first
    real block receives ``hidden()`` whatever the family's loop passes around it.
    """
    saved = [block.__dict__.get("forward") for block in blocks[:count]]
    for block in blocks[:count]:
        block.forward = lambda *args, **kwargs: hidden()
    try:
        yield
    finally:
        for block, forward in zip(blocks[:count], saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def shared_prefix_logits(student, teacher, blocks_path: str, first: int, inputs: dict,
                         cached: torch.Tensor | None = None, student_forward: Callable | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(student_logits, teacher_logits, prefix_hidden)`` with the blocks before ``first`` run once, in the
    teacher (or not at all when ``cached`` holds their output). Only the student's part has gradients.
    ``student_forward`` calls the student (default: ``student`` itself; a DDP wrapper of it, say)."""
    teacher_blocks, student_blocks = teacher.get_submodule(blocks_path), student.get_submodule(blocks_path)
    student_forward = student_forward or student
    captured = {"hidden": cached}
    replaced = prefix_replaced(teacher_blocks, first, lambda: cached) if cached is not None \
        else contextlib.nullcontext()

    def capture(module, args, output):
        captured["hidden"] = output

    hook = teacher_blocks[first - 1].register_forward_hook(capture)
    try:
        with torch.no_grad(), replaced:
            teacher_logits = teacher(**inputs, use_cache=False).logits
    finally:
        hook.remove()
    with prefix_replaced(student_blocks, first, lambda: captured["hidden"]):
        student_logits = student_forward(**inputs, use_cache=False).logits
    return student_logits, teacher_logits, captured["hidden"]


class PrefixCache:
    """The prefix hidden states of each healing sequence on disk, one safetensors file per sequence
    (``hidden_size`` times the dtype's bytes per token: 2,304 bytes for SmolLM2-135M in float32).
    Filled during the first epoch; later epochs read them and skip the prefix entirely."""

    def __init__(self, folder: str, sequences: list[torch.Tensor], layout: Layout, teacher, autocast_dtype,
                 device: torch.device, main: bool):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        for sequence in sequences:
            digest.update(sequence.numpy().tobytes() + b"|")
        # the states depend on the teacher's prefix weights, not on its name: another teacher of the same name
        # and shapes must not reuse them
        key = {"prefix_weights": layout.prefix_digest(teacher), "first_block": layout.first,
               "autocast": str(autocast_dtype), "data": digest.hexdigest()}
        key_file = self.folder / "cache_key.json"
        if key_file.is_file() and json.loads(key_file.read_text(encoding="utf-8")) != key:
            raise ValueError(f"cache_dir {folder} holds prefix states of other data or another model; "
                             f"use an empty folder")
        if main:
            key_file.write_text(json.dumps(key), encoding="utf-8")
        self.device = device

    def _file(self, row: int) -> Path:
        return self.folder / f"row-{row:08d}.safetensors"

    def load(self, rows: list[int], mask: torch.Tensor) -> torch.Tensor | None:
        from safetensors.torch import load_file

        if not all(self._file(r).is_file() for r in rows):
            return None
        states = [load_file(str(self._file(r)))["hidden"] for r in rows]
        hidden = torch.zeros(len(rows), mask.shape[1], states[0].shape[-1], dtype=states[0].dtype)
        for k, state in enumerate(states):
            hidden[k, :len(state)] = state
        return hidden.to(self.device)

    def store(self, rows: list[int], hidden: torch.Tensor, mask: torch.Tensor):
        from safetensors.torch import save_file

        for k, row in enumerate(rows):
            target = self._file(row)
            if not target.is_file():
                partial = target.with_suffix(f".{os.getpid()}.tmp")
                save_file({"hidden": hidden[k, :int(mask[k].sum())].detach().cpu().contiguous()}, str(partial))
                os.replace(partial, target)
