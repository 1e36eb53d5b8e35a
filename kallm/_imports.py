"""Import hooks: kallm's registration with transformers and PEFT, deferred until they load; and the old module paths
of the previous release, which still import (with a warning) for one more.

``import kallm`` must stay light (``kallm --help`` imports it), yet ``import kallm`` followed by
``AutoModelForCausalLM.from_pretrained(kallm_folder)`` must find kallm's classes, and
``AutoPeftModelForCausalLM.from_pretrained(adapter_folder)`` must rebuild LoRA on KAN layers and KAN adapters. So
``import kallm`` registers with each library at once when it is already loaded, and otherwise right after its own
import finishes. Registering means importing the kallm modules named in ``REGISTRARS``, which registers as its import
finishes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: library -> the kallm modules whose imports register kallm with it
REGISTRARS = {"transformers": ("kallm.core",), "peft": ("kallm.finetune.lora", "kallm.finetune.kan_adapter")}


#: module path of the previous release -> its home now
MOVED_MODULES = {
    "kallm.cli_types": "kallm.values",
    "kallm.loading": "kallm.checkpoints.load",
    "kallm.saving": "kallm.checkpoints.save",
    "kallm.delta": "kallm.checkpoints.delta",
    "kallm.surgery.adapters": "kallm.surgery.architectures",
    "kallm.surgery.lora": "kallm.finetune.lora",
    "kallm.surgery.kan_adapter": "kallm.finetune.kan_adapter",
    "kallm.surgery.cli": "kallm.cli.retrofit",
    "kallm.surgery.cli_inspect": "kallm.cli.inspect",
    "kallm.train.cli": "kallm.cli.train",
    "kallm.train.cli_heal": "kallm.cli.heal",
    "kallm.train.heal": "kallm.healing",
    "kallm.eval.cli": "kallm.cli.eval",
    "kallm.cli_export": "kallm.cli.export",
    "kallm.onnx_export": "kallm.export.onnx",
    "kallm.plot": "kallm.eval.plot",
    "kallm.reference": "kallm.testing.reference",
    "kallm.demo": "kallm.recipes.demo",
    "kallm.experiment": "kallm.recipes.experiment",
    "kallm.sweep": "kallm.recipes.sweep",
}
#: (module, name) of the previous release -> where it lives now, as ``module.name`` (a renamed one has a new name)
MOVED_NAMES = {
    **{("kallm.surgery", name): f"kallm.finetune.{name}" for name in (
        "KANAdapterConfig", "kan_adapter_config", "KANLoraLinear", "load_adapter", "lora_config", "lora_targets",
        "with_kan_lora")},
    **{("kallm.surgery", name): f"kallm.train.parameter_groups.{name}" for name in (
        "PARAMETER_ROLES", "parameter_groups")},
    # the architecture descriptions were called adapters, a word kallm now keeps for PEFT's and its KAN adapter
    **{(module, old): f"kallm.surgery.architectures.{new}"
       for module in ("kallm.surgery", "kallm.surgery.architectures")
       for old, new in (("ArchitectureAdapter", "Architecture"), ("ADAPTERS", "ARCHITECTURES"))},
    ("kallm.surgery.architectures", "adapter_for"): "kallm.surgery.architectures.architecture_for",
    ("kallm.surgery.architectures", "ADDING_AN_ADAPTER_DOC"): "kallm.surgery.architectures.ADDING_AN_ARCHITECTURE_DOC",
    **{("kallm.train.trainer", name): f"kallm.train.config.{name}" for name in (
        "ADAPTER_TYPES", "DERIVED_ARGUMENTS", "PASS_THROUGH", "SCHEDULERS", "check_training_arguments")},
}


def moved_name(module: str, name: str):
    """``name`` of ``module`` from where it lives now, with a warning; AttributeError when it never lived there."""
    new = MOVED_NAMES.get((module, name))
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    _warn_moved(f"{module}.{name}", new, stacklevel=4)
    home, _, new_name = new.rpartition(".")
    return getattr(importlib.import_module(home), new_name)


def _warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} is now {new}; the old path is kept for this release only", FutureWarning,
                  stacklevel=stacklevel)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a module path of ``MOVED_MODULES`` as the module at its new home."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        _warn_moved(spec.name, MOVED_MODULES[spec.name])
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module):
        pass  # the module at the new home has run already


def install_moved_module_finder() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def register_when_libraries_load() -> None:
    for library, registrars in REGISTRARS.items():
        if library in sys.modules:
            for registrar in registrars:
                importlib.import_module(registrar)
        elif not any(isinstance(finder, _LibraryWatcher) and finder.library == library for finder in sys.meta_path):
            sys.meta_path.insert(0, _LibraryWatcher(library))


class _LibraryWatcher(importlib.abc.MetaPathFinder):
    """Finds ``library`` with the other finders and registers kallm with it once it has run."""

    def __init__(self, library: str):
        self.library = library

    def find_spec(self, name, path=None, target=None):
        if name != self.library:
            return None
        sys.meta_path.remove(self)  # watch one import only; the finders below locate the package
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfterImport(spec.loader, REGISTRARS[self.library])
        return spec


class _RegisterAfterImport(importlib.abc.Loader):
    def __init__(self, loader, registrars: tuple[str, ...]):
        self.loader = loader
        self.registrars = registrars

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # The library keeps its own loader (resource reading goes through it); this one only adds a step.
        module.__spec__.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        # When a registrar is what imports the library, it registers once its own import finishes.
        for registrar in self.registrars:
            if registrar not in sys.modules:
                importlib.import_module(registrar)
