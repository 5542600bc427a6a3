"""The math task: problem files, chat prompts, boxed-answer extraction and grading, and a short run."""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import REPO
from student_trainer.config import ConfigError, load_config
from student_trainer.data import TaskData
from student_trainer.tasks.arithmetic import Problem
from student_trainer.tasks.math import answers_match, last_boxed, normalize, to_number
from student_trainer.tasks.math_data import DataError, format_prompt, load_records
from student_trainer.tasks.math_grader import verify
from student_trainer.training.loop import train_sync
from tiny_model import make_tokenizer

SAMPLE = REPO / "tests" / "data" / "math_sample.jsonl"
SAMPLE_ANSWERS = ["14", "\\frac{3}{4}", "7", "11", "\\dfrac{1}{2}", "1800", "-3", "1,000", "180^\\circ", "13"]
# A chat template in the shape of Qwen3's: one user turn, then the assistant header (+ empty think).
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}"
                 "<think></think>{% endif %}{% endif %}")


def _config(*extra: str):
    return load_config(None, ["student.path=x", "teacher.url=http://127.0.0.1:1", "data.task=math",
                              f"data.path={SAMPLE}", *extra])


# ---------------------------------------------------------------- loader


def test_loader_reads_every_field_convention() -> None:
    records = load_records(SAMPLE)
    assert [r.answer for r in records] == SAMPLE_ANSWERS  # the blank line is skipped
    assert records[2].question.startswith("Tom has 12 apples")  # `question` field
    assert records[8].question.startswith("Find the sum")  # `prompt` field
    gsm = records[3].solution  # GSM8K reasoning kept, calculator annotations dropped, a box appended
    assert "<<" not in gsm and gsm.startswith("2 books cost 2 * 4 = 8") and gsm.endswith("$\\boxed{11}$.")
    assert records[0].solution.endswith("= \\boxed{14}$.")  # a boxed solution is kept as is
    assert all(last_boxed(r.solution) is not None for r in records)


@pytest.mark.parametrize(("line", "message"), [
    ('{"answer": "3"}', r"bad\.jsonl:2: missing question.*problem, question"),
    ('{"problem": "1+2?"}', r"bad\.jsonl:2: missing answer.*keys: problem"),
    ('{"problem": "1+2?", "answer": ""}', r"bad\.jsonl:2: missing answer"),
    ('{"problem": "1+2?", "solution": "it is 3"}', r"bad\.jsonl:2: missing answer.*\\boxed"),
    ('{"problem": "1+2?", "answer": "3"', r"bad\.jsonl:2: not valid JSON"),
    ('["1+2?", "3"]', r"bad\.jsonl:2: expected a JSON object, got list"),
])
def test_loader_errors_name_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_loader_json_array_and_missing_or_empty_files(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert load_records(tmp_path / "a.json") == load_records(SAMPLE)
    with pytest.raises(DataError, match="no such problem file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no problems"):
        load_records(tmp_path / "empty.jsonl")


def test_parquet_matches_jsonl(tmp_path: Path) -> None:
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    # parquet columns have one type: numbers become strings, absent fields null
    keys = sorted({k for r in rows for k in r})
    table = pa.table({k: [None if r.get(k) is None else str(r[k]) for r in rows] for k in keys})
    pq.write_table(table, tmp_path / "sample.parquet")
    assert load_records(tmp_path / "sample.parquet") == load_records(SAMPLE)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"x\.parquet: .*pip install pyarrow"):
        load_records(tmp_path / "x.parquet")


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(("text", "expected"), [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("first \\boxed{3}, then corrected: \\boxed{5}", "5"),  # the last box wins
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
    ("\\fbox{7} and \\boxed {8}", "8"),
    ("\\boxed{}", ""),
    ("no box here: 42", None),
    ("\\boxed{3} then cut off \\boxed{\\frac{1}{", None),  # an unclosed last box is no answer
    ("\\boxed", None),
])
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


_BALANCED = st.recursive(st.text(alphabet="ab1 +-^_x", max_size=5),
                         lambda inner: st.lists(inner, max_size=3).map(lambda xs: "{" + "".join(xs) + "}"),
                         max_leaves=8)


@given(prefix=st.text(alphabet="xyz {}$.\n", max_size=20), earlier=_BALANCED, content=_BALANCED)
def test_last_boxed_recovers_any_balanced_content(prefix: str, earlier: str, content: str) -> None:
    text = f"{prefix}\\boxed{{{earlier}}} then \\boxed{{{content}}}. Done"
    assert last_boxed(text) == content


# ---------------------------------------------------------------- grading


@pytest.mark.parametrize(("a", "b"), [
    ("1,000", "1000"), ("0.5", "1/2"), ("\\frac{1}{2}", "0.5"), ("\\dfrac{1}{2}", "\\frac12"),
    ("\\tfrac{3}{4}", "0.75"), ("-\\frac{1}{2}", "\\frac{-1}{2}"), ("$14$", "14"), ("14.", "14"),
    ("\\left( 1, 2 \\right)", "(1,2)"), (" 2 \\sqrt{3} ", "2\\sqrt{3}"), ("x = -3", "-3"),
    ("180^\\circ", "180"), ("50\\%", "50"), ("\\$18.00", "18"), ("\\text{(B)}", "(B)"), ("007", "7"),
    ("2.50", "5/2"), ("1,234,567.5", "1234567.5"), ("1{,}000", "1000"),
])
def test_equivalent_answers_match(a: str, b: str) -> None:
    assert answers_match(a, b) and answers_match(b, a)


@pytest.mark.parametrize(("a", "b"), [
    ("0.333", "1/3"), ("\\frac{1}{2}", "\\frac{2}{1}"), ("2", "-2"), ("1,000", "1000.5"), ("x+1", "x-1"),
    ("1,2", "12"), ("\\sqrt{2}", "2"), ("", ""), ("1/0", "0"), ("5\\text{ cm}", "5"), ("(1,2)", "[1,2]"),
])
def test_different_answers_do_not_match(a: str, b: str) -> None:
    assert not answers_match(a, b) and not answers_match(b, a)


@given(st.integers(min_value=-10**12, max_value=10**12))
def test_thousands_separators_are_numbers(n: int) -> None:
    assert answers_match(f"{n:,}", str(n))
    assert not answers_match(f"{n:,}", str(n + 1))


@given(st.integers(min_value=-500, max_value=500), st.integers(min_value=1, max_value=64))
def test_fraction_spellings_agree(p: int, q: int) -> None:
    sign = "-" if p < 0 else ""
    spellings = [f"{p}/{q}", f"\\frac{{{p}}}{{{q}}}", f"{sign}\\dfrac{{{abs(p)}}}{{{q}}}"]
    if q & (q - 1) == 0:  # a power of two: the decimal is exact
        spellings.append(str(float(Fraction(p, q))))
    for s in spellings:
        assert to_number(normalize(s)) == Fraction(p, q), s
        assert answers_match(s, spellings[0])


def test_verify_grades_the_last_box_only() -> None:
    problem = Problem(prompt="", solution="", answer="\\frac{3}{4}")
    assert verify("6/8 = \\boxed{0.75}", problem)
    assert not verify("\\boxed{0.75} no wait \\boxed{0.7}", problem)
    assert not verify("the answer is 0.75", problem)


# ---------------------------------------------------------------- config, prompts, trainer seam


def test_math_config_validates_and_needs_a_path() -> None:
    cfg = _config("data.eval_path=x.jsonl", "data.chat_template_kwargs={enable_thinking: false}")
    assert cfg.data.task == "math" and cfg.data.chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_config(None, ["student.path=x", "teacher.url=http://127.0.0.1:1", "data.task=math"])


def test_prompts_use_the_chat_template_when_there_is_one() -> None:
    tok = make_tokenizer()
    assert format_prompt("1+1?", tok, "Box it.") == "Problem: 1+1?\n\nBox it.\nSolution: "
    tok.chat_template = CHAT_TEMPLATE
    assert format_prompt("1+1?", tok, "Box it.") == "<user>1+1?\n\nBox it.</user>\n<assistant>"
    assert format_prompt("1+1?", tok, "Box it.", {"enable_thinking": False}).endswith("<assistant><think></think>")


def test_task_data_splits_renders_and_grades() -> None:
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    data = TaskData(_config("data.eval_size=3", "data.probe_size=2",
                            "data.chat_template_kwargs={enable_thinking: false}").data, tok)
    eval_set, probe = data.eval_set(), data.probe_set()
    assert len(eval_set) == 3 and probe == eval_set[:2]
    assert all(p.prompt.startswith("<user>") and p.prompt.endswith("<think></think>") for p in eval_set)
    assert "\\boxed{}" in eval_set[0].prompt  # the default instruction
    epoch = data.train_batch(0, 7)  # 10 problems - 3 held out = one epoch of 7
    assert len({p.prompt for p in epoch}) == 7 and not {p.prompt for p in epoch} & {p.prompt for p in eval_set}
    assert data.train_batch(1, 7) != epoch and sorted(data.train_batch(1, 7), key=str) == sorted(epoch, key=str)
    assert data.train_batch(3, 2) == TaskData(data.cfg, tok).train_batch(3, 2)  # a function of (seed, step)
    assert data.verify(f"so \\boxed{{{eval_set[0].answer}}}", eval_set[0])
    with pytest.raises(ValueError, match="tokenizer"):
        TaskData(data.cfg)


def test_eval_file_problems_never_train(tmp_path: Path) -> None:
    lines = [line for line in SAMPLE.read_text().splitlines() if line.strip()]
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[:4]))
    data = TaskData(_config(f"data.eval_path={tmp_path / 'eval.jsonl'}", "data.eval_size=2").data, make_tokenizer())
    assert len(data.eval_set()) == 2
    assert not {p.prompt for p in data.train_batch(0, 6)} & {p.prompt for p in data.eval_set()}
    assert len({p.prompt for p in data.train_batch(0, 6)}) == 6  # the 4 eval-file problems are out
    with pytest.raises(DataError, match="no training problems left"):
        TaskData(_config("data.eval_size=10").data, make_tokenizer())


def test_two_step_run_on_the_math_fixture(task_models, task_teacher, tmp_path: Path) -> None:
    """The real trainer against a real teacher server, fed by the math loader and graded by its verifier."""
    out = tmp_path / "run"
    cfg = load_config(None, [f"student.path={task_models[1]}", f"teacher.url={task_teacher.url}", "teacher.top_k=8",
                             "data.task=math", f"data.path={SAMPLE}", "data.eval_size=3", "data.probe_size=2",
                             "data.eval_batch_size=2", "train.steps=2", "train.batch_size=4",
                             "train.max_new_tokens=8", "train.eval_every=0", "train.save_every=0",
                             f"train.out_dir={out}", "train.progress=false", "method.name=trb", "method.eps0=0.2",
                             "method.horizon=2"])
    summary = train_sync(cfg)
    assert summary["steps"] == 2 and 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["final_probe_kl"] > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes" / "qwen3").glob("*.yaml")), ids=lambda p: p.stem)
def test_gpu_recipes_validate_and_build_math_prompts(recipe: Path) -> None:
    cpu = load_config(REPO / "recipes" / "arithmetic" / "trb.yaml")
    cfg = load_config(recipe, [f"data.path={SAMPLE}", "data.eval_path=null", "data.eval_size=3"])
    assert (cfg.data.task, cfg.student.device, cfg.teacher.url) == ("math", "cuda", "http://127.0.0.1:8000")
    assert cfg.method.name == cpu.method.name == "trb" and cfg.teacher.top_k == cpu.teacher.top_k
    assert cfg.train.batch_size % cfg.optim.accum_steps == 0
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    data = TaskData(cfg.data, tok)
    assert all(p.prompt.endswith("<assistant><think></think>") for p in data.eval_set())  # Qwen3 non-thinking
