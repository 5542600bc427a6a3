"""Which grader decides that a boxed math answer equals the reference (`data.grader`).

- `math_verify`: Hugging Face's math-verify (the `math` extra), what open-r1 and TRL's math recipes
  grade with: both answers are parsed to sympy (LaTeX or plain expressions) and compared symbolically,
  so `\\frac{1}{2}` = `0.5`, `\\{1,2\\}` = `\\{2,1\\}`, `x = 3` = `3`, `5\\text{ cm}` = `5`, and
  intervals are compared as intervals. docs/math.md lists where it and the normaliser disagree.
- `normalize`: the string normaliser and exact rationals of tasks/math.py, no computer algebra; it
  under-credits (never over-credits) and needs nothing beyond the core install.
- `auto` (the default): math_verify when it is installed, else normalize, with a note at start.

Both graders see the same strings: the last `\\boxed{}` of the completion (tasks/math.last_boxed)
and the reference answer; the choice of box never depends on the grader.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Literal

from student_trainer.tasks.arithmetic import Problem
from student_trainer.tasks.math import answers_match, last_boxed

Grader = Literal["auto", "math_verify", "normalize"]
INSTALL_HINT = "pip install 'trb-distill[math]'"


def math_verify_installed() -> bool:
    return importlib.util.find_spec("math_verify") is not None


def resolve(grader: Grader) -> Literal["math_verify", "normalize"]:
    if grader == "auto":
        return "math_verify" if math_verify_installed() else "normalize"
    return grader


def symbolic_match(predicted: str, reference: str) -> bool:
    """math-verify's verdict on two answer strings (each parsed as the content of a box).

    math-verify bounds parsing and comparison with signal.alarm, which only the main thread may set;
    elsewhere it runs without that bound.
    """
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
    answer = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    return bool(gold and answer and verify(gold, answer, timeout_seconds=timeout))


def grade(predicted: str, reference: str, grader: Grader = "auto") -> bool:
    """True when `predicted` (a box's content) is the reference answer under the chosen grader."""
    if resolve(grader) == "math_verify":
        return symbolic_match(predicted, reference)
    return answers_match(predicted, reference)


def verify(completion_text: str, problem: Problem, grader: str = "auto") -> bool:
    """True when the completion's last boxed answer matches the problem's reference answer under
    `grader` (math-verify when installed, else `answers_match`)."""
    predicted = last_boxed(completion_text)
    return predicted is not None and grade(predicted, problem.answer, grader)
