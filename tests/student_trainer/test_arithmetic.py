"""The arithmetic task: generator determinism, split hygiene, verifier, tokenizer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from student_trainer.tasks.arithmetic import (
    Problem,
    extract_answer,
    generate,
    make_problem,
    split_of,
    verify,
)
from student_trainer.tasks.base_model import IGNORE, ModelShape, build_model, encode_batch, sft_loss
from student_trainer.tasks.tokenizer import build_tokenizer


def test_generate_is_deterministic_and_seed_dependent() -> None:
    assert generate(50, seed=3, split="train") == generate(50, seed=3, split="train")
    assert generate(50, seed=3, split="train") != generate(50, seed=4, split="train")


def test_problems_are_distinct_and_in_their_split() -> None:
    for split in ("train", "test"):
        problems = generate(300, seed=0, split=split)
        assert len({p.prompt for p in problems}) == 300
        assert all(split_of(p.prompt[3:].strip()) == split for p in problems)


def test_non_distinct_sampling_keeps_the_operand_mix() -> None:
    """Large training sets sample i.i.d.: short problems stay a steady share to the end."""
    problems = generate(20_000, seed=0, split="train", distinct=False)
    assert len({p.prompt for p in problems}) < len(problems)
    tail = problems[-5000:]
    three = sum(p.prompt.count("+") + p.prompt.count("-") + p.prompt.count("*") == 2 for p in tail)
    assert 0.25 < three / len(tail) < 0.4
    assert generate(100, seed=0, split="train", distinct=False) == problems[:100]


def test_train_and_test_never_share_a_prompt() -> None:
    train = {p.prompt for p in generate(20_000, seed=0, split="train", distinct=False)}
    test = {p.prompt for p in generate(300, seed=0, split="test")}
    assert not train & test


def test_difficulty_knobs_are_respected() -> None:
    problems = generate(200, seed=1, split="train", digits=3, min_operands=3, max_operands=3, operators="+")
    for p in problems:
        numbers = p.prompt[3:].strip().split("+")
        assert len(numbers) == 3 and all(1 <= len(n) <= 3 for n in numbers)


def test_reference_solution_is_correct_arithmetic() -> None:
    for p in generate(300, seed=2, split="train"):
        assert p.prompt.startswith("Q: ") and int(p.answer) == eval(p.prompt[3:])  # noqa: S307 - digits and + - * only
        assert p.solution.endswith(f"#### {p.answer}")
        for line in p.solution.splitlines()[:-1]:
            assert line.startswith("=") and eval(line[1:]) == int(p.answer)  # noqa: S307


def test_worked_example_format() -> None:
    p = make_problem("48-3*7+15")
    assert p == Problem(prompt="Q: 48-3*7+15\n", solution="=48-21+15\n=27+15\n=42\n#### 42", answer="42")
    assert make_problem("3-8+20") is None  # negative intermediate is excluded


def test_verify_accepts_reference_and_rejects_wrong_answer() -> None:
    for p in generate(100, seed=5, split="test"):
        assert verify(p.solution, p)
        wrong = p.solution.rsplit("#### ", 1)[0] + f"#### {int(p.answer) + 1}"
        assert not verify(wrong, p)


def test_extract_answer_edge_cases() -> None:
    assert extract_answer("=5+6\n#### 11") == "11"
    assert extract_answer("#### 11\n\n") == "11"
    assert extract_answer("####11") == "11"
    assert extract_answer("#### 007") == "7"
    assert extract_answer("#### -4") == "-4"
    assert extract_answer("#### 12\n#### 13") == "13"
    assert extract_answer("") is None
    assert extract_answer("=5+6\n") is None  # stopped before answering
    assert extract_answer("#### 11\n=3") is None  # wandered on after the answer
    assert extract_answer("#### 1a") is None
    assert extract_answer("x #### 11") is None
    assert extract_answer("#### 1 #### 2") is None


def test_tokenizer_round_trip_and_clean_concatenation() -> None:
    tok = build_tokenizer()
    for p in generate(50, seed=0, split="train"):
        ids = tok.encode(p.prompt + p.solution, add_special_tokens=False)
        assert ids == tok.encode(p.prompt, add_special_tokens=False) + tok.encode(p.solution, add_special_tokens=False)
        assert len(ids) == len(p.prompt + p.solution)
        assert tok.decode(ids) == p.prompt + p.solution
    assert tok.pad_token_id == 0 and tok.unk_token_id not in tok.encode("12+3\n#### 15")


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet="0123456789+-*=# \nabcXYZ", max_size=40))
def test_tokenizer_is_one_token_per_character(text: str) -> None:
    tok = build_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.decode(ids) == text


def test_tokenizer_save_and_load_with_autotokenizer(tmp_path) -> None:
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "12+3*4\n=12+12\n#### 24"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert (loaded.pad_token, loaded.eos_token, loaded.bos_token) == ("<pad>", "<eos>", "<bos>")
    assert loaded.padding_side == "left"
    assert loaded.decode(loaded.encode(text) + [loaded.eos_token_id], skip_special_tokens=True) == text


def test_sft_batch_scores_solution_and_eos_only() -> None:
    tok = build_tokenizer()
    problems = generate(3, seed=0, split="train")
    input_ids_B_T, labels_B_T = encode_batch(tok, problems)
    for row, p in enumerate(problems):
        n_prompt, n_solution = len(p.prompt), len(p.solution) + 1  # + EOS
        scored = labels_B_T[row] != IGNORE
        assert scored.nonzero().flatten().tolist() == list(range(n_prompt, n_prompt + n_solution))
        assert labels_B_T[row, n_prompt + n_solution - 1] == tok.eos_token_id
        assert tok.decode(input_ids_B_T[row, : n_prompt + n_solution - 1]) == p.prompt + p.solution
        assert (input_ids_B_T[row, n_prompt + n_solution :] == tok.pad_token_id).all()


@pytest.mark.parametrize("alpha", [0.0, 0.15])
def test_sft_loss_label_smoothing_matches_the_mixed_target(alpha: float) -> None:
    """The smoothed loss is the cross-entropy against (1 - α)·one-hot + α·uniform, over scored positions only."""
    tok = build_tokenizer()
    model = build_model(tok, ModelShape(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64), seed=0)
    input_ids_B_T, labels_B_T = encode_batch(tok, generate(3, seed=1, split="train"))
    with torch.no_grad():
        got = sft_loss(model, input_ids_B_T, labels_B_T, label_smoothing=alpha)
        logp = torch.log_softmax(model(input_ids=input_ids_B_T).logits[:, :-1].float(), -1)
    labels = labels_B_T[:, 1:]
    terms = []
    for b, t in (labels != IGNORE).nonzero().tolist():
        target = torch.full_like(logp[b, t], alpha / logp.shape[-1])
        target[labels[b, t]] += 1 - alpha
        terms.append(-(target * logp[b, t]).sum())
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-5)
