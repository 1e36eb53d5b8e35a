"""Registration of kallm's model classes with transformers, deferred until transformers loads.

``import kallm`` must stay light (``kallm --help`` imports it), yet ``import kallm`` followed by
``AutoModelForCausalLM.from_pretrained(kallm_folder)`` must find kallm's classes. So ``import kallm`` registers
them at once when transformers is already loaded, and otherwise right after transformers' own import finishes.
Registering means importing ``kallm.core``, which registers its classes as its import finishes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys


def register_when_transformers_loads() -> None:
    if "transformers" in sys.modules:
        importlib.import_module("kallm.core")
    elif not any(isinstance(finder, _TransformersWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TransformersWatcher())


class _TransformersWatcher(importlib.abc.MetaPathFinder):
    """Finds transformers with the other finders and registers kallm's classes once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # watch one import only; the finders below locate the package
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfterImport(spec.loader)
        return spec


class _RegisterAfterImport(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # transformers keeps its own loader (resource reading goes through it); this one only adds a step.
        module.__spec__.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        # When kallm.core is what imports transformers, it registers once its own import finishes.
        if "kallm.core" not in sys.modules:
            importlib.import_module("kallm.core")
