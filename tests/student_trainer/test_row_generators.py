"""Per-row random streams: a row samples the same tokens however its batch is split or shrinks."""

from __future__ import annotations

import torch

from student_trainer.methods.behaviors import make_behavior
from student_trainer.methods.row_generators import RowGenerators, rows_of
from student_trainer.methods.topk import TeacherTopK, sample_categorical

B, V, K = 6, 11, 3


def _step_inputs(seed: int = 0) -> tuple[torch.Tensor, TeacherTopK]:
    g = torch.Generator().manual_seed(seed)
    logits_B_V = torch.randn(B, V, generator=g)
    t_logp_B_V = torch.randn(B, V, generator=g).log_softmax(-1)
    lps, ids = t_logp_B_V.topk(K, -1)
    return logits_B_V, TeacherTopK(ids, lps)


def test_streams_are_a_pure_function_of_seed_step_and_row() -> None:
    a = RowGenerators.seeded(0, 3, [4, 5]).rand((2, 7), torch.device("cpu"))
    b = RowGenerators.seeded(0, 3, [0, 1, 2, 3, 4, 5]).rows([4, 5]).rand((2, 7), torch.device("cpu"))
    assert torch.equal(a, b)
    other_step = RowGenerators.seeded(0, 4, [4, 5]).rand((2, 7), torch.device("cpu"))
    other_seed = RowGenerators.seeded(1, 3, [4, 5]).rand((2, 7), torch.device("cpu"))
    assert not torch.equal(a, other_step) and not torch.equal(a, other_seed)
    assert not torch.equal(a[0], a[1])


def test_a_split_batch_samples_what_the_whole_batch_samples() -> None:
    """Every behavior, several decode steps: rows 0-2 and 3-5 apart draw the tokens rows 0-5 draw."""
    for name in ("opd", "trb", "skd", "teacher"):
        behavior = make_behavior(name, k_skd=2) if name == "skd" else make_behavior(name)
        whole = RowGenerators.seeded(7, 2, range(B))
        halves = [RowGenerators.seeded(7, 2, range(0, 3)), RowGenerators.seeded(7, 2, range(3, B))]
        for t in range(4):
            logits, topk = _step_inputs(t)
            tokens, _ = behavior.sample(logits, topk, 0.3, whole)
            parts = [behavior.sample(logits[r], topk.select(r), 0.3, g)[0]
                     for r, g in zip((slice(0, 3), slice(3, B)), halves, strict=True)]
            assert torch.equal(tokens, torch.cat(parts)), name


def test_stopped_rows_do_not_shift_the_others() -> None:
    """A row that hit EOS stops drawing; the rows still active keep their own streams."""
    logits, _ = _step_inputs()
    log_p = logits.log_softmax(-1)
    full, subset = RowGenerators.seeded(0, 0, range(B)), RowGenerators.seeded(0, 0, range(B))
    sample_categorical(log_p, full)
    sample_categorical(log_p, subset)
    active = torch.tensor([1, 4])
    later = sample_categorical(log_p[active], rows_of(full, active))
    alone = [sample_categorical(log_p[[i]], RowGenerators(subset.generators[i : i + 1])) for i in (1, 4)]
    assert torch.equal(later, torch.cat(alone))


def test_a_plain_generator_is_still_one_shared_stream() -> None:
    logits, _ = _step_inputs()
    g = torch.Generator().manual_seed(0)
    assert rows_of(g, torch.tensor([0])) is g
    a = sample_categorical(logits, torch.Generator().manual_seed(3))
    b = sample_categorical(logits, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
