"""Registration of kallm with transformers and PEFT, deferred until they load.

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
import sys

#: library -> the kallm modules whose imports register kallm with it
REGISTRARS = {"transformers": ("kallm.core",), "peft": ("kallm.surgery.lora", "kallm.surgery.kan_adapter")}


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
