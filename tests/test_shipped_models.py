"""The shipped tiny models load with the Auto classes and still score what their cards say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from student_trainer.tasks import arithmetic
from student_trainer.tasks.base_model import evaluate, greedy_complete
from student_trainer.tasks.tokenizer import build_tokenizer

MODELS = Path(__file__).resolve().parents[1] / "models"
NAMES = ["arith-teacher", "arith-student"]


def _load(name: str):
    path = MODELS / name
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    info = json.loads((path / "task.json").read_text())
    return model, tokenizer, info


def _accuracy_on_200(name: str) -> tuple[float, dict]:
    """Greedy pass@1 on the same 200 test problems the card reports (one thread, batched)."""
    torch.set_num_threads(1)
    model, tokenizer, info = _load(name)
    problems = arithmetic.generate(200, info["eval_seed"], "test", **info["difficulty"])
    max_new = max(len(p.solution) for p in problems) + 16
    accuracy, _ = evaluate(model, tokenizer, problems, max_new_tokens=max_new)
    return accuracy, info


@pytest.mark.parametrize("name", NAMES)
def test_shipped_files_load_and_match_the_task_tokenizer(name: str) -> None:
    path = MODELS / name
    assert (path / "model.safetensors").stat().st_size < 8_000_000
    assert (path / "README.md").read_text().startswith(f"# {name}")
    model, tokenizer, _ = _load(name)
    assert tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_student_is_clearly_smaller_than_teacher() -> None:
    teacher, _, _ = _load("arith-teacher")
    student, _, _ = _load("arith-student")
    assert 2 * student.num_parameters() <= teacher.num_parameters()


def test_teacher_reaches_its_stated_accuracy() -> None:
    accuracy, info = _accuracy_on_200("arith-teacher")
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(info["accuracy"]["200"], abs=0.01)


def test_student_starts_weak_as_stated() -> None:
    accuracy, info = _accuracy_on_200("arith-student")
    assert 0.05 <= accuracy <= 0.5
    assert accuracy == pytest.approx(info["accuracy"]["200"], abs=0.01)


def test_batched_left_padded_greedy_equals_one_at_a_time() -> None:
    """Left padding and the KV cache must not change greedy outputs (prompts of mixed lengths)."""
    torch.set_num_threads(1)
    model, tokenizer, info = _load("arith-student")
    prompts = [p.prompt for p in arithmetic.generate(24, 11, "test", **info["difficulty"])]
    assert len({len(p) for p in prompts}) > 1
    batched = greedy_complete(model, tokenizer, prompts, max_new_tokens=64, batch_size=24)
    single = greedy_complete(model, tokenizer, prompts, max_new_tokens=64, batch_size=1)
    assert batched == single
