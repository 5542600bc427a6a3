"""Math problem files (JSONL, JSON or parquet) with reference answers, and chat prompts for them.

Public sets name their fields differently, so records are read tolerantly:

- question: the first of `problem`, `question`, `prompt`, `query` (a string);
- answer: the first of `answer`, `final_answer`, `ground_truth` (a string or a number), else the
  last box of `solution`. A GSM8K-style answer ("reasoning ... #### 72") gives "72", and an answer
  that is itself boxed gives the box's content;
- solution (reference text for the KL probe only): `solution` when present, else the reasoning of a
  GSM8K-style answer, else nothing; "The final answer is $\\boxed{..}$." is appended when it has no box.

A record without a usable question or answer is an error naming the file, the line (or parquet
row) and the field, so a bad file fails before any GPU time is spent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from student_trainer.tasks.math import INSTRUCTION, last_boxed

QUESTION_FIELDS = ("problem", "question", "prompt", "query")
ANSWER_FIELDS = ("answer", "final_answer", "ground_truth")
_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")  # GSM8K's "48/2=<<48/2=24>>24" annotations


class DataError(ValueError):
    """A problem file that cannot be used, with the file and line (or row) at fault."""


@dataclass(frozen=True)
class MathRecord:
    """One problem as read from a file, before any prompt formatting."""

    question: str
    answer: str
    solution: str


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, parsed row) for every row of a JSONL, JSON-array or parquet file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from exc
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", row
        return
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        for i, row in enumerate(json.loads(text)):
            yield f"{path} item {i}", row
        return
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{line_no}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc


def _first(row: dict[str, Any], fields: tuple[str, ...]) -> str | None:
    for name in fields:
        value = row.get(name)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip()):
            return str(value).strip()
    return None


def parse_record(row: Any, where: str) -> MathRecord:
    """One file row as a MathRecord; `where` ("file:line") goes into every error message."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    question = _first(row, QUESTION_FIELDS)
    if question is None:
        raise DataError(f"{where}: missing question: none of {', '.join(QUESTION_FIELDS)} is a non-empty "
                        f"string (keys: {', '.join(sorted(row)) or 'none'})")
    raw = _first(row, ANSWER_FIELDS)
    solution = _first(row, ("solution",)) or ""
    answer, reasoning = raw, ""
    if raw is not None and "####" in raw:
        reasoning, answer = (part.strip() for part in raw.rsplit("####", 1))
    elif raw is not None and last_boxed(raw) is not None:
        answer = last_boxed(raw)
    elif raw is None and solution:
        answer = last_boxed(solution)
    if not answer:
        raise DataError(f"{where}: missing answer: none of {', '.join(ANSWER_FIELDS)} is set and there "
                        f"is no \\boxed{{}} in a solution field (keys: {', '.join(sorted(row))})")
    solution = solution or _CALCULATOR_RE.sub("", reasoning)
    if last_boxed(solution) is None:
        solution = f"{solution}\n\nThe final answer is $\\boxed{{{answer}}}$.".lstrip()
    return MathRecord(question=question, answer=answer, solution=solution)


def load_records(path: str | Path) -> list[MathRecord]:
    """Every problem of a .jsonl / .json / .parquet file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such problem file")
    records = [parse_record(row, where) for where, row in _rows(path)]
    if not records:
        raise DataError(f"{path}: no problems in the file")
    return records


def format_prompt(question: str, tokenizer: PreTrainedTokenizerBase, instruction: str = INSTRUCTION,
                  template_kwargs: dict[str, Any] | None = None) -> str:
    """The prompt text for one question, ending where the model's answer starts.

    A tokenizer with a chat template gets one user turn and the generation prompt, the layout chat
    models were trained on (`template_kwargs` reach the template, e.g. Qwen3's enable_thinking).
    Without one (base models, the tests' tiny tokenizers) a plain "Problem: ... Solution:" layout.
    The text may hold special tokens as text; tokenizing it with add_special_tokens=False maps them.
    """
    content = f"{question.strip()}\n\n{instruction}" if instruction else question.strip()
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True, **(template_kwargs or {}))
    return f"Problem: {content}\nSolution: "
