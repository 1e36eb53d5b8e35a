"""The one resolver of the data folder: ``$KALLM_DATA_DIR``, or a clear error that says to set it."""

import pytest

from kallm.data.folder import DATA_FOLDER_VARIABLE, data_folder, require_data_folder


def test_the_folder_the_variable_names_is_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_FOLDER_VARIABLE, str(tmp_path))
    assert data_folder() == tmp_path == require_data_folder("the test")


@pytest.mark.parametrize("value", [None, "", "missing"])
def test_no_folder_is_none_and_an_error_that_names_the_variable(tmp_path, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(DATA_FOLDER_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(DATA_FOLDER_VARIABLE, value and str(tmp_path / value))
    assert data_folder() is None
    state = "names no folder" if value else "is not set"
    with pytest.raises(FileNotFoundError, match=rf"the benchmark needs the data folder, but \$KALLM_DATA_DIR {state}"):
        require_data_folder("the benchmark")


def test_a_file_is_no_data_folder(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    monkeypatch.setenv(DATA_FOLDER_VARIABLE, str(tmp_path / "file.txt"))
    assert data_folder() is None
