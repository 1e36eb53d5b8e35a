"""The module paths and names of the previous release still work for one release, with a warning that names the new
home; the public API of ``kallm`` resolves to the same objects as before."""

import importlib
import subprocess
import sys
import warnings

import pytest

import kallm
from kallm._imports import MOVED_MODULES, MOVED_NAMES


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_module_path_imports_the_module_at_its_new_home_with_a_warning(old):
    new = importlib.import_module(MOVED_MODULES[old])
    sys.modules.pop(old, None)
    with pytest.warns(FutureWarning, match=rf"{old} is now {MOVED_MODULES[old]}"):
        module = importlib.import_module(old)
    assert module is new


@pytest.mark.parametrize(("package", "name"), sorted(MOVED_NAMES))
def test_an_old_name_of_a_package_is_the_object_at_its_new_home_with_a_warning(package, name):
    target = MOVED_NAMES[(package, name)]
    home, _, new_name = target.rpartition(".")
    with pytest.warns(FutureWarning, match=rf"{package}.{name} is now {target}"):
        value = getattr(importlib.import_module(package), name)
    assert value is getattr(importlib.import_module(home), new_name)


def test_a_name_a_package_never_had_is_still_an_attribute_error():
    import kallm.surgery

    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        kallm.surgery.no_such_name  # noqa: B018


def test_the_public_api_loads_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for name in kallm.__all__:
            assert getattr(kallm, name) is not None, name


def test_old_import_statements_of_users_still_run_in_a_fresh_process():
    script = ("import warnings; warnings.simplefilter('error', FutureWarning)\n"
              "try:\n    from kallm.loading import load_model\nexcept FutureWarning as w:\n    print('warned:', w)\n"
              "import warnings; warnings.resetwarnings(); warnings.simplefilter('ignore')\n"
              "from kallm.train.heal import heal, HealConfig\nfrom kallm.sweep import run_sweep, load_sweep\n"
              "from kallm.surgery import lora_config, parameter_groups\nimport kallm.onnx_export, kallm.cli_types\n"
              "print('ok', heal.__module__, run_sweep.__module__)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "warned: kallm.loading is now kallm.checkpoints.load" in result.stdout
    assert "ok kallm.healing" in result.stdout and "kallm.recipes.sweep" in result.stdout


def test_python_dash_m_kallm_runs_the_command_line():
    for entry in (["-m", "kallm", "--version"], ["-m", "kallm.cli", "--version"]):
        result = subprocess.run([sys.executable, *entry], capture_output=True, text=True, check=True)
        assert result.stdout.strip() == f"kallm {kallm.__version__}"
