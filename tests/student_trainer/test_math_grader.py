"""data.grader: math-verify (when installed) and the string normaliser on a fixture of tricky answers,
the table of docs/math.md, the config check and the fallback note."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO
from student_trainer import startup
from student_trainer.config import ConfigError, load_config
from student_trainer.data import TaskData
from student_trainer.tasks import math_grader
from student_trainer.tasks.arithmetic import Problem
from student_trainer.tasks.math import answers_match
from student_trainer.tasks.math_grader import verify

CASES = [json.loads(line) for line in (REPO / "tests" / "data" / "math_grading_cases.jsonl").read_text().splitlines()]
HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None
needs_math_verify = pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify not installed (the math extra)")
BASE = ["student.path=x", "teacher.url=http://127.0.0.1:1", "data.task=math", "data.eval_size=3",
        f"data.path={REPO / 'tests' / 'data' / 'math_sample.jsonl'}"]


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_normaliser_verdicts(case: dict) -> None:
    assert answers_match(case["predicted"], case["reference"]) == case["normalize"]


@needs_math_verify
@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_math_verify_verdicts(case: dict) -> None:
    assert math_grader.symbolic_match(case["predicted"], case["reference"]) == case["math_verify"]
    assert math_grader.grade(case["predicted"], case["reference"], "math_verify") == case["math_verify"]


@needs_math_verify
def test_the_graders_differ_somewhere_and_docs_hold_the_current_table() -> None:
    assert any(c["normalize"] != c["math_verify"] for c in CASES)
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from math_grader_table import table
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert table() in (REPO / "docs" / "math.md").read_text(), "run: python scripts/math_grader_table.py"


def test_verify_uses_the_chosen_grader_on_the_last_box(monkeypatch) -> None:
    problem = Problem(prompt="", solution="", answer="\\{1,2\\}")
    text = "first \\boxed{3}, then \\boxed{\\{2,1\\}}"
    assert not verify(text, problem, grader="normalize")
    if HAS_MATH_VERIFY:
        assert verify(text, problem, grader="math_verify") and verify(text, problem)  # auto = math_verify
        assert not verify("\\boxed{\\{2,1\\}} no: \\boxed{3}", problem, grader="math_verify")
    monkeypatch.setattr(math_grader, "math_verify_installed", lambda: False)
    assert not verify(text, problem)  # auto falls back to the normaliser


def test_task_data_grades_with_the_configured_grader() -> None:
    from tiny_model import make_tokenizer

    data = TaskData(load_config(None, [*BASE, "data.grader=normalize"]).data, make_tokenizer())
    problem = Problem(prompt="", solution="", answer="5")
    assert not data.verify("\\boxed{5\\text{ cm}}", problem)
    if HAS_MATH_VERIFY:
        data = TaskData(load_config(None, [*BASE, "data.grader=math_verify"]).data, make_tokenizer())
        assert data.verify("\\boxed{5\\text{ cm}}", problem)


def test_math_verify_without_the_package_fails_at_config_time(monkeypatch) -> None:
    monkeypatch.setattr("student_trainer.config.math_verify_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"data\.grader: math-verify is not installed; .*'trb-distill\[math\]'"):
        load_config(None, [*BASE, "data.grader=math_verify"])
    assert load_config(None, BASE).data.grader == "auto"


def test_the_fallback_is_announced(monkeypatch) -> None:
    said: list[str] = []
    cfg = load_config(None, BASE)
    monkeypatch.setattr(math_grader, "math_verify_installed", lambda: False)
    startup.grader_note(cfg, said.append)
    assert len(said) == 1 and "string normaliser" in said[0] and "trb-distill[math]" in said[0]
    said.clear()
    startup.grader_note(load_config(None, [*BASE, "data.grader=normalize"]), said.append)  # chosen: no note
    monkeypatch.setattr(math_grader, "math_verify_installed", lambda: True)
    startup.grader_note(cfg, said.append)
    assert said == []
