"""kallm's layers import only what sits below them: core, cli_types -> loading, saving, data -> inference
-> surgery -> train, eval.

Training and evaluation are side by side: neither imports the other (the chat data both read is in ``kallm.data``).

Every import counts, the lazy ones inside functions too: a layer that reaches up breaks as soon as that
function runs without the upper layer (the portable core next to a checkpoint has no kallm around it).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kallm"
#: kallm module or package -> its layer; a module may import from its own package and from the layers below
LAYERS = {"core": 0, "cli_types": 0, "loading": 1, "saving": 1, "data": 1, "inference": 2, "surgery": 3, "train": 4, "eval": 4}


def kallm_imports(path: Path) -> list[str]:
    """The kallm modules ``path`` imports, as dotted names below ``kallm`` (``"train.data"``)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
    return [name.split(".", 1)[1] for name in names if name.startswith("kallm.")]


def layer_of(dotted: str) -> int | None:
    return LAYERS.get(dotted.split(".")[0])


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_its_layer_and_below(path):
    package = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    own = layer_of(package)
    if own is None:
        return  # the entry points (cli, demo, experiment, ...) may use every layer
    not_below = [name for name in kallm_imports(path)
                 if name.split(".")[0] != package and (layer_of(name) is None or layer_of(name) >= own)]
    assert not not_below, f"{path.relative_to(PACKAGE)} (layer {own}) imports from beside or above it: {not_below}"


def test_the_checker_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    module = PACKAGE / "eval" / "chat_loss.py"
    assert "data" in kallm_imports(module)
    fake = tmp_path / "kallm" / "eval" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..train import data\n    from . import bbh\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "kallm")
    assert kallm_imports(fake) == ["train", "eval.bbh"]
