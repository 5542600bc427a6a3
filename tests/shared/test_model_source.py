"""Model references are read as a local folder or a hub id, and a bad one is named in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest

from conftest import REPO
from shared.model_source import ModelSourceError, check_model_source


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "models" / "real").mkdir(parents=True)
    (tmp_path / "models" / "real" / "config.json").write_text("{}")
    (tmp_path / "models" / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # an empty hub cache
    return tmp_path


def test_a_saved_model_folder_is_accepted(workdir: Path) -> None:
    assert check_model_source("student.path", "models/real") == "local"
    assert check_model_source("student.path", str(workdir / "models" / "real")) == "local"


@pytest.mark.parametrize(("value", "words"), [
    ("models/nope", ["no folder 'models/nope'", "local folder", "models/ is a folder here"]),
    ("/no/such/model", ["no folder '/no/such/model'", "local folder", "cannot be a hub id"]),
    ("./nope", ["local folder"]),
    ("models/empty", ["has no config.json"]),
    ("notes.txt", ["is a file"]),
])
def test_a_bad_local_folder_is_named(workdir: Path, value: str, words: list[str]) -> None:
    with pytest.raises(ModelSourceError) as err:
        check_model_source("student.path", value)
    assert str(err.value).startswith("student.path: ")
    for word in words:
        assert word in str(err.value)


def test_a_hub_id_offline_and_not_cached_is_named(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match=r"teacher.model: 'org/model' .*taken as a hub id.*HF_HUB_OFFLINE"):
        check_model_source("teacher.model", "org/model")


def test_a_hub_id_the_hub_does_not_give_is_named(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_hub(*args: object, **kwargs: object) -> str:
        raise OSError("Repository Not Found for url: https://huggingface.co/org/model")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    with pytest.raises(ModelSourceError, match=r"'org/model' is not a local folder, so it was taken as a hub id"):
        check_model_source("student.path", "org/model")


def test_teacher_cli_names_a_missing_model_folder() -> None:
    proc = subprocess.run([sys.executable, "-m", "teacher_server.cli", "serve", "--model", "models/nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "trb-teacher: --model: no folder 'models/nope'" in proc.stderr
    assert "local folder" in proc.stderr and "Traceback" not in proc.stderr
