"""The rollout's logged behavior diagnostics (summarize)."""

import torch

from student_trainer.methods.behaviors import StepDiagnostics
from student_trainer.rollouts.rollout import summarize


def test_summarize_reports_the_share_of_positions_where_beta_is_one() -> None:
    """beta_one counts exact 1s (teacher inside the ball) among defined betas; NaN (SKD) is ignored."""
    beta = torch.tensor([1.0, 0.25, 1.0, float("nan"), 0.999])
    diag = StepDiagnostics(beta=beta, kl_to_student=torch.zeros(5), teacher_used=torch.ones(5, dtype=torch.bool),
                           teacher_logprob=torch.full((5,), -1.0))
    out = summarize([(torch.ones(5, dtype=torch.bool), diag)])
    assert out["beta_one"] == 0.5
    assert abs(out["beta_mean"] - (1.0 + 0.25 + 1.0 + 0.999) / 4) < 1e-6
    assert out["teacher_logprob"] == -1.0


def test_scored_logprob_is_exact_on_the_topk_and_the_tail_bound_off_it() -> None:
    import math

    from student_trainer.methods.topk import TeacherTopK, scored_logprob_of

    ids = torch.tensor([[3, 1], [3, 1]])
    lps = torch.log(torch.tensor([[0.5, 0.3], [0.5, 0.3]]))
    lp = scored_logprob_of(TeacherTopK(ids, lps), torch.tensor([1, 7]))
    assert torch.allclose(lp, torch.tensor([math.log(0.3), math.log(0.2)]), atol=1e-6)


def test_sampled_teacher_logprob_reads_the_target_of_each_response_token() -> None:
    """Targets at position t are the teacher's distribution of the token at t + 1."""
    import math

    from student_trainer.methods.topk import TeacherTopK
    from student_trainer.rollouts.rollout import Rollout, sampled_teacher_logprob

    tokens = torch.tensor([[5, 6, 1, 2]])  # prompt 5 6, response 1 2
    loss_mask = torch.tensor([[False, True, True, False]])  # positions whose next token is a response token
    ids = torch.tensor([[[0, 0]] * 4])
    lps = torch.full((1, 4, 2), math.log(0.25))
    ids[0, 1] = torch.tensor([1, 4])  # the teacher after "5 6": token 1 with p 0.25
    ids[0, 2] = torch.tensor([9, 4])  # after "5 6 1": token 2 off the top-k, tail 0.5
    rollout = Rollout(tokens, torch.ones_like(tokens), loss_mask, 2, torch.tensor([2]), TeacherTopK(ids, lps))
    total, count = sampled_teacher_logprob(rollout)
    assert count == 2
    assert math.isclose(total, math.log(0.25) + math.log(0.5), rel_tol=1e-6)
