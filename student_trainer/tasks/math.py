"""Math answers: the last `\\boxed{...}` of a completion, and whether it equals a reference answer.

Why this shape: chat models asked to "put the final answer within \\boxed{}" do so at the end, and
may box intermediate results before; the last box is the answer. With math-verify installed (the
`math` extra) `verify` grades symbolically (tasks/math_grader.py); this module's own grader, the
fallback, is deliberately small and honest, with no computer algebra: two answers match when their
normalised strings are equal, or when both parse as the same exact rational number. Anything else
(equivalent expressions written differently, intervals in another order, units) counts as wrong; it
under-credits, never over-credits.

Normalisation (`normalize`): drop `$`, whitespace and LaTeX spacing (`\\,` `\\!` `\\;` `\\:`),
`\\left`/`\\right`, `\\text{..}`/`\\mathrm{..}` wrappers, `^\\circ`, `\\%`, one trailing `.`, and a short
`x=` in front; `\\dfrac`/`\\tfrac` become `\\frac`, and `\\frac12` becomes `\\frac{1}{2}`.
Numbers (`to_number`): integers, decimals, `a/b`, `\\frac{a}{b}`, with `1,000`-style thousands
separators (LaTeX's `1{,}000` too); so "1,000" = "1000" and "0.5" = "1/2" = "\\frac{1}{2}", but "0.333" != "1/3".
"""

from __future__ import annotations

import re
from fractions import Fraction

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_SPACING_RE = re.compile(r"\\[,!;: ]|\s+")
_DEGREE_RE = re.compile(r"\^\{?\\circ\}?")
_SHORT_FRAC_RE = re.compile(r"\\frac(\d)(\d)")
_LHS_RE = re.compile(r"^[a-zA-Z]\w?=(?!=)")
_INT_OR_DECIMAL_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SLASH_FRAC_RE = re.compile(r"(-?\d+)/(\d+)")
_TEX_FRAC_RE = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces included.

    Escaped braces (`\\{`, `\\}`) do not count. Returns None when there is no box, or when the last
    one is never closed (a completion cut off inside its answer has not given one).
    """
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return text[start:i]
        i += 1
    return None


def normalize(answer: str) -> str:
    """A canonical string for an answer; see the module docstring for the exact rules."""
    s = answer.replace("\\$", "").replace("$", "").replace("{,}", ",")
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _SPACING_RE.sub("", s)
    s = _WRAPPER_RE.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SHORT_FRAC_RE.sub(r"\\frac{\1}{\2}", s)
    s = _DEGREE_RE.sub("", s).replace("\\%", "").replace("%", "")
    s = s.removesuffix(".")
    return _LHS_RE.sub("", s, count=1)


def to_number(s: str) -> Fraction | None:
    """The exact value of a normalised numeric answer, or None when `s` is not a plain number."""
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if _INT_OR_DECIMAL_RE.fullmatch(s):
        return Fraction(s)
    if match := _SLASH_FRAC_RE.fullmatch(s):
        return _ratio(match[1], match[2])
    if match := _TEX_FRAC_RE.fullmatch(s):
        value = _ratio(match[2], match[3])
        return -value if value is not None and match[1] else value
    return None


def _ratio(num: str, den: str) -> Fraction | None:
    return None if int(den) == 0 else Fraction(int(num), int(den))


def answers_match(predicted: str, reference: str) -> bool:
    """True when two answers are the same after normalisation, or the same exact number."""
    a, b = normalize(predicted), normalize(reference)
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    return x is not None and y is not None and x == y
