"""The config reference comes from the pydantic models: complete, current, and loadable as YAML."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import yaml

from conftest import REPO
from student_trainer.config import Config, Method, load_config
from student_trainer.config_doc import DOC_PATH, REGENERATE, keys, markdown
from student_trainer.methods.plan import METHODS


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "student_trainer.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_every_key_has_a_description() -> None:
    missing = [d.key for d in keys() if not d.description.strip()]
    assert not missing, f"add description= to these config fields: {missing}"


def test_docs_config_md_is_current() -> None:
    assert DOC_PATH.read_text() == markdown(), f"docs/config.md is stale: run `{REGENERATE}`"


def test_every_method_is_documented() -> None:
    assert [row.name for row in METHODS] == list(get_args(Method))


def test_reference_lists_every_key_with_type_and_default() -> None:
    doc = markdown()
    for d in keys():
        assert f"| `{d.key}` |" in doc
    assert "| `train.steps` | `int >= 1` | `100` |" in doc
    assert "| `teacher.api_key` | `str \\| null` | `$TRB_API_KEY` |" in doc


def test_print_config_is_commented_yaml_that_loads_back(tmp_path) -> None:
    args = ["--config", "recipes/arithmetic/trb.yaml", "--set", "train.steps=7", "--set", "method.name=opd"]
    proc = _cli(*args, "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert "# Optimizer steps. [int >= 1; default 100]\n  steps: 7\n" in proc.stdout
    assert "ready_timeout_s: 300.0" in proc.stdout
    printed = tmp_path / "printed.yaml"
    printed.write_text(proc.stdout)
    assert load_config(printed) == load_config(REPO / "recipes/arithmetic/trb.yaml", ["train.steps=7",
                                                                                   "method.name=opd"])


def test_print_config_never_shows_the_api_key() -> None:
    proc = _cli("--set", "student.path=x", "--set", "teacher.url=http://127.0.0.1:1",
                "--set", "teacher.api_key=s3cret-key-123", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert "s3cret" not in proc.stdout and "# api_key: <hidden>" in proc.stdout
    assert isinstance(yaml.safe_load(proc.stdout), dict)


def test_print_config_alone_prints_the_defaults() -> None:
    proc = _cli("--print-config")
    assert proc.returncode == 0, proc.stderr
    tree = yaml.safe_load(proc.stdout)
    assert tree["train"]["steps"] == Config.model_fields["train"].default.steps
    assert "# Student checkpoint" in proc.stdout and "[str; required]" in proc.stdout


def test_help_lists_the_methods_and_the_reference() -> None:
    proc = _cli("--help")
    assert proc.returncode == 0
    for name in get_args(Method):
        assert f"\n  {name} " in proc.stdout
    assert "--check" in proc.stdout and "--print-config" in proc.stdout and "docs/config.md" in proc.stdout
