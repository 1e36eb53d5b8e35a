"""kallm's packages stand on levels, and each imports only what stands below it. The levels, bottom up (a package
may import its own modules and every level below it, never one beside or above it):

    0  core, values, _imports     the portable core (ships next to every checkpoint), checked values, import hooks
    1  checkpoints, data          load and save models; read and tokenize data
    2  inference                  generation, evaluation mode, masked losses
    3  surgery                    architecture descriptions, retrofit, fit init, convert, shrink, quantize
    4  finetune                   LoRA on KAN layers and the KAN adapter (PEFT)
    5  train                      the Trainer-based loop, its options, distillation, parameter groups
    6  healing                    distillation back to the original model (kallm.heal)
    7  eval                       BIG-Bench Hard, perplexity, chat loss, plots
    8  export                     ONNX
    9  testing                    what tests, benchmarks and users' tests share
       recipes, cli               whole jobs and the command line: they may use every level

Every import counts, the lazy ones inside functions too: a package that reaches up breaks as soon as that
function runs without the upper level (the portable core next to a checkpoint has no kallm around it).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kallm"
#: kallm module or package -> its level; a module may import from its own package and from the levels below
LEVELS = {"core": 0, "values": 0, "_imports": 0, "checkpoints": 1, "data": 1, "inference": 2, "surgery": 3,
          "finetune": 4, "train": 5, "healing": 6, "eval": 7, "export": 8, "testing": 9,
          "__version__": 0}  # defined in kallm/__init__.py, which imports nothing but _imports
#: the packages that may use every level: whole jobs and the command line
ENTRY_POINTS = {"recipes", "cli"}


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


def level_of(dotted: str) -> int | None:
    return LEVELS.get(dotted.split(".")[0])


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_its_level_and_below(path):
    package = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    if package in ENTRY_POINTS or package in ("__init__", "__main__"):
        return
    own = level_of(package)
    assert own is not None, f"{package} has no level: give it one in LEVELS (and in the docstring's drawing)"
    not_below = [name for name in kallm_imports(path)
                 if name.split(".")[0] != package and (level_of(name) is None or level_of(name) >= own)]
    assert not not_below, f"{path.relative_to(PACKAGE)} (level {own}) imports from beside or above it: {not_below}"


def test_the_checker_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    module = PACKAGE / "eval" / "chat_loss.py"
    assert "data.chat" in kallm_imports(module)
    fake = tmp_path / "kallm" / "eval" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..train import data\n    from . import bbh\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "kallm")
    assert kallm_imports(fake) == ["train", "eval.bbh"]


def test_the_package_root_holds_at_most_three_modules():
    modules = sorted(path.name for path in PACKAGE.glob("*.py") if path.name not in ("__init__.py", "__main__.py"))
    assert len(modules) <= 3, f"kallm/ holds {modules}: give the new module a package of its own"


def test_every_package_has_a_level_or_is_an_entry_point():
    packages = {path.name.removesuffix(".py") for path in PACKAGE.iterdir()
                if (path.is_dir() and (path / "__init__.py").exists()) or path.suffix == ".py"}
    packages -= {"__init__", "__main__"}
    assert packages - set(LEVELS) - ENTRY_POINTS == set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_two_modules_import_each_other_through_any_path():
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in kallm_imports(path):
            # "surgery.fit" is a module; "surgery.fit.X" a name in it; "core" a package's __init__
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    # a package's __init__ importing its own modules is how re-exports work, not a cycle
    edges = {name: {t for t in targets if not (name and t.startswith(name + "."))} for name, targets in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_longer_than_700_lines(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= 700, f"{path.relative_to(PACKAGE)} has {lines} lines: split it by subject"
