"""The table of docs/math.md: each tricky answer pair of tests/data/math_grading_cases.jsonl graded by
the string normaliser and by math-verify, live (math-verify must be installed: the `math` extra).

    python scripts/math_grader_table.py          # prints the markdown table
"""

from __future__ import annotations

import json
from pathlib import Path

from student_trainer.tasks.math import answers_match
from student_trainer.tasks.math_grader import symbolic_match

CASES = Path(__file__).resolve().parent.parent / "tests" / "data" / "math_grading_cases.jsonl"


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def table(path: Path = CASES) -> str:
    """One row per case: boxed answer, reference, both verdicts, and whether they differ."""
    rows = ["| case | boxed answer | reference | normaliser | math-verify | |", "| --- | --- | --- | --- | --- | --- |"]
    for line in path.read_text().splitlines():
        case = json.loads(line)
        ours = answers_match(case["predicted"], case["reference"])
        theirs = symbolic_match(case["predicted"], case["reference"])
        mark = "**differs**" if ours != theirs else ""
        rows.append(f"| {case['case']} | {_cell(case['predicted'])} | {_cell(case['reference'])} | "
                    f"{'yes' if ours else 'no'} | {'yes' if theirs else 'no'} | {mark} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table(), end="")
