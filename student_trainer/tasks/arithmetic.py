"""Arithmetic word-free problems with a rewrite-one-step chain of thought, and their verifier.

Why this task: it is cheap to generate, exactly verifiable, and its chain of thought is a sequence
of small dependent steps. A weak student that slips on one step carries the wrong number into every
later line, which is the regime where on-policy distillation beats plain SFT.

Format (prompt, then solution; the trainer appends EOS after the solution)::

    Q: 7*8-9+3*4\n        <- prompt: a fixed "Q: ", the expression, a newline
    =56-9+3*4\n            <- each line rewrites the expression with one operation done
    =56-9+12\n                (leftmost `*` first, then `+`/`-` left to right)
    =47+12\n
    =59\n
    #### 59                <- final answer line: a copy of the last value

The fixed "Q: " gives every sequence the same first tokens (tiny models train faster with a
constant start to attend to; there is no BOS). Train and test splits are disjoint by construction:
a problem belongs to the split chosen by a stable hash of its expression, so no test prompt can
ever be generated for training.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

PROMPT_PREFIX = "Q: "
ANSWER_PREFIX = "#### "
OPERATORS = "+-*"
TEST_FRACTION = 0.1
_ANSWER_RE = re.compile(r"####[ \t]*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    """One task instance: the prompt, the reference completion and its final answer."""

    prompt: str
    solution: str
    answer: str


@dataclass(frozen=True)
class Difficulty:
    """Knobs that set how hard problems are.

    digits: most digits of an operand of `+`/`-`.
    mul_digits: most digits of an operand of `*` (products grow fast; keep these small).
    min_operands, max_operands: how many numbers appear in the expression.
    operators: which of `+`, `-`, `*` may appear.
    max_factors: most numbers in one product term (3 allows "4*5*7", i.e. 20*7 as a step).

    The defaults are the shipped models' task. min_operands is 3 because the 2-operand space of
    1-digit numbers is only ~300 expressions: a model memorises the train ones and fails the ~30
    held-out ones (the first teacher scored 17% on them and 99% on 3-5 operands).
    """

    digits: int = 1
    mul_digits: int = 1
    min_operands: int = 3
    max_operands: int = 5
    operators: str = OPERATORS
    max_factors: int = 2

    def __post_init__(self) -> None:
        if not self.operators or set(self.operators) - set(OPERATORS):
            raise ValueError(f"operators must be a non-empty subset of {OPERATORS!r}")
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError("need 2 <= min_operands <= max_operands")
        if self.digits < 1 or self.mul_digits < 1 or self.max_factors < 2:
            raise ValueError("digits and mul_digits must be >= 1, max_factors >= 2")


def split_of(expression: str) -> str:
    """The split ("train" or "test") that owns `expression`; stable across processes and machines."""
    digest = hashlib.blake2b(expression.encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") / 2**64
    return "test" if bucket < TEST_FRACTION else "train"


def _random_number(rng: random.Random, digits: int) -> int:
    """A number with 1..digits digits, each length equally likely (so short numbers are common)."""
    n_digits = rng.randint(1, digits)
    low = 0 if n_digits == 1 else 10 ** (n_digits - 1)
    return rng.randint(low, 10**n_digits - 1)


def _random_operators(rng: random.Random, n: int, d: Difficulty) -> list[str]:
    """n operators; `*` is skipped where it would put more than d.max_factors numbers in a product."""
    ops: list[str] = []
    run = 1
    for _ in range(n):
        allowed = d.operators if run < d.max_factors else d.operators.replace("*", "") or "*"
        ops.append(rng.choice(allowed))
        run = run + 1 if ops[-1] == "*" else 1
    return ops


def _random_expression(rng: random.Random, d: Difficulty) -> list[str]:
    """Alternating numbers and operators, e.g. ["48", "-", "3", "*", "7"]."""
    n = rng.randint(d.min_operands, d.max_operands)
    ops = _random_operators(rng, n - 1, d)
    tokens: list[str] = []
    for i in range(n):
        next_to_mul = (i > 0 and ops[i - 1] == "*") or (i < n - 1 and ops[i] == "*")
        tokens.append(str(_random_number(rng, d.mul_digits if next_to_mul else d.digits)))
        if i < n - 1:
            tokens.append(ops[i])
    return tokens


def _reduce_once(tokens: list[str]) -> list[str]:
    """Do one operation: the leftmost `*`, else the leftmost `+`/`-` (standard precedence)."""
    i = tokens.index("*") if "*" in tokens else 1
    a, op, b = int(tokens[i - 1]), tokens[i], int(tokens[i + 1])
    value = a * b if op == "*" else a + b if op == "+" else a - b
    return tokens[: i - 1] + [str(value)] + tokens[i + 2 :]


def solve(expression: str) -> list[str] | None:
    """The rewrite lines of `expression` (the last is the value), or None if a step goes negative.

    Negative intermediates are excluded so that every number in the format is a plain digit string.
    """
    tokens = re.findall(r"\d+|[+\-*]", expression)
    lines = []
    while len(tokens) > 1:
        tokens = _reduce_once(tokens)
        if tokens[0].startswith("-"):
            return None
        lines.append("".join(tokens))
    return lines or tokens


def make_problem(expression: str) -> Problem | None:
    """Build the Problem for an expression like "48-3*7+15" (None if it has negative steps).

    Every computation happens on a "=" line; the answer line only copies the last value, so the
    model does arithmetic in one place and one layout.
    """
    lines = solve(expression)
    if lines is None:
        return None
    solution = "".join(f"={line}\n" for line in lines) + ANSWER_PREFIX + lines[-1]
    return Problem(prompt=f"{PROMPT_PREFIX}{expression}\n", solution=solution, answer=lines[-1])


def generate(n: int, seed: int, split: str = "train", distinct: bool = True, **difficulty: object) -> list[Problem]:
    """`n` problems of `split`, deterministic in (seed, split, distinct, difficulty).

    The difficulty keywords are the fields of `Difficulty`. With `distinct` (the default) no prompt
    repeats, so a test sample measures `n` different questions. Pass distinct=False for large
    training sets: deduplication would exhaust the small space of short problems early and leave
    the rest of the set with long ones only (a teacher trained that way forgot 3-operand problems).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = Difficulty(**difficulty)  # type: ignore[arg-type]
    rng = random.Random(f"{seed}/{split}")
    seen: set[str] = set()
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 50 * n + 10_000:
            raise ValueError(f"could not find {n} distinct {split} problems at {d}")
        expression = "".join(_random_expression(rng, d))
        if (distinct and expression in seen) or split_of(expression) != split:
            continue
        problem = make_problem(expression)
        if problem is not None:
            seen.add(expression)
            problems.append(problem)
    return problems


def extract_answer(text: str) -> str | None:
    """The final answer in a completion: the number on its last non-empty line after "####".

    Returns None when the last line is not an answer line, so a completion that wanders on after
    its answer, or stops early, is not credited. Leading zeros are normalised ("007" -> "7").
    """
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = _ANSWER_RE.fullmatch(lines[-1].strip())
    return None if match is None else str(int(match.group(1)))


def verify(completion_text: str, problem: Problem) -> bool:
    """True when the completion's final answer equals the problem's answer (the steps are not graded)."""
    return extract_answer(completion_text) == problem.answer
