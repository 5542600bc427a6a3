"""Seeds that vary what matters: data.seed draws the training prompts, data.eval_seed fixes the eval set
and the probe apart from them (a benchmark shared by every seed and method of a comparison)."""

from __future__ import annotations

from student_trainer.config import load_config
from student_trainer.data import TaskData


def _data(*sets: str) -> TaskData:
    return TaskData(load_config(None, ["student.path=models/arith-student", "teacher.url=http://127.0.0.1:1", "data.eval_size=50",
                                 *sets]).data)


def test_eval_seed_fixes_the_benchmark_whatever_the_prompt_draw() -> None:
    a, b = _data("data.seed=0", "data.eval_seed=1000"), _data("data.seed=7", "data.eval_seed=1000")
    assert a.train_batch(0, 16) != b.train_batch(0, 16)  # each seed its own training prompts
    assert a.eval_set() == b.eval_set() and a.probe_set() == b.probe_set()  # one benchmark
    assert {p.prompt for p in a.eval_set()}.isdisjoint(p.prompt for s in range(20) for p in a.train_batch(s, 16))


def test_without_eval_seed_the_eval_set_follows_data_seed_as_before() -> None:
    assert _data("data.seed=3").eval_set() == _data("data.seed=3", "data.eval_seed=3").eval_set()
    assert _data("data.seed=3").eval_set() != _data("data.seed=4").eval_set()
