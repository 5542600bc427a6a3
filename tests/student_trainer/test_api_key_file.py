"""The trainer's teacher key: $TRB_API_KEY, else the file $TRB_API_KEY_FILE names (docker compose)."""

from __future__ import annotations

from pathlib import Path

import pytest

from student_trainer.config import ConfigError, load_config

SETS = ["student.path=x", "teacher.url=http://127.0.0.1:1"]


def test_key_comes_from_the_file_when_the_variable_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "key").write_text("minted-key-0123456789\n")
    monkeypatch.delenv("TRB_API_KEY", raising=False)
    monkeypatch.setenv("TRB_API_KEY_FILE", str(tmp_path / "key"))
    cfg = load_config(None, SETS)
    assert cfg.teacher.api_key == "minted-key-0123456789"
    assert "minted-key" not in str(cfg.public())


def test_the_variable_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "key").write_text("minted-key-0123456789\n")
    monkeypatch.setenv("TRB_API_KEY", "my-own-key-42")
    monkeypatch.setenv("TRB_API_KEY_FILE", str(tmp_path / "key"))
    assert load_config(None, SETS).teacher.api_key == "my-own-key-42"
    monkeypatch.setenv("TRB_API_KEY", "")  # docker compose passes an unset variable as empty
    assert load_config(None, SETS).teacher.api_key == "minted-key-0123456789"


def test_a_missing_or_empty_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRB_API_KEY", raising=False)
    monkeypatch.setenv("TRB_API_KEY_FILE", str(tmp_path / "key"))
    with pytest.raises(ConfigError, match="TRB_API_KEY_FILE=.*does not exist: the teacher writes it"):
        load_config(None, SETS)
    (tmp_path / "key").write_text("\n")
    with pytest.raises(ConfigError, match="TRB_API_KEY_FILE=.*is empty"):
        load_config(None, SETS)


def test_no_key_at_all_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRB_API_KEY", raising=False)
    monkeypatch.delenv("TRB_API_KEY_FILE", raising=False)
    assert load_config(None, SETS).teacher.api_key is None
