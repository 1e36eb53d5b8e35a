"""The tests' own layout: what tests share lives in kallm.testing (or is a fixture in conftest.py), so no test file
imports another test file or conftest; and kallm.testing works without pytest, for users' own tests."""

import ast
from pathlib import Path

import pytest
import torch

from kallm.testing.threads import one_thread

TESTS = Path(__file__).resolve().parent
TESTING = TESTS.parent / "kallm" / "testing"
#: torch's thread count while pytest collects this file, before any fixture runs
THREADS_OUTSIDE_TESTS = torch.get_num_threads()


def imported_modules(path: Path, top_level_only: bool = False) -> list[str]:
    """The modules ``path`` imports (from ``import x`` and ``from x import y``), lazy ones too unless
    ``top_level_only``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_finder_sees_lazy_imports_of_test_files_and_conftest(tmp_path):
    test_file = tmp_path / "test_x.py"
    test_file.write_text("import torch\nfrom conftest import tiny_model\n\ndef f():\n    import test_y\n")
    assert imported_modules(test_file) == ["torch", "conftest", "test_y"]
    assert imported_modules(test_file, top_level_only=True) == ["torch", "conftest"]


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.py")), ids=lambda path: path.name)
def test_no_test_file_imports_another_test_file_or_conftest(path):
    test_modules = {other.stem for other in TESTS.glob("*.py")}
    imported = [name for name in imported_modules(path) if name.split(".")[0] in test_modules]
    assert not imported, (f"{path.name} imports {imported}: move what it shares into kallm.testing (or make it a "
                          f"fixture in conftest.py) and import it from there")


@pytest.mark.parametrize("path", sorted(TESTING.glob("*.py")), ids=lambda path: path.name)
def test_kallm_testing_imports_pytest_only_inside_the_functions_that_need_it(path):
    assert "pytest" not in [name.split(".")[0] for name in imported_modules(path, top_level_only=True)], (
        f"kallm/testing/{path.name} imports pytest at module level: users' tests may not have it")


def test_every_test_runs_on_one_thread():
    assert torch.get_num_threads() == 1


@pytest.mark.all_threads
def test_a_test_marked_all_threads_keeps_torchs_thread_count():
    assert torch.get_num_threads() == THREADS_OUTSIDE_TESTS


@pytest.mark.all_threads
def test_one_thread_gives_back_the_thread_count_it_found():
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_thread():
            raise RuntimeError("a failing test")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(THREADS_OUTSIDE_TESTS)
