"""The rollout's logged behavior diagnostics (summarize)."""

import torch

from student_trainer.behaviors import StepDiagnostics
from student_trainer.rollout import summarize


def test_summarize_reports_the_share_of_positions_where_beta_is_one() -> None:
    """beta_one counts exact 1s (teacher inside the ball) among defined betas; NaN (SKD) is ignored."""
    beta = torch.tensor([1.0, 0.25, 1.0, float("nan"), 0.999])
    diag = StepDiagnostics(beta=beta, kl_to_student=torch.zeros(5), teacher_used=torch.ones(5, dtype=torch.bool),
                           teacher_logprob=torch.full((5,), -1.0))
    out = summarize([(torch.ones(5, dtype=torch.bool), diag)])
    assert out["beta_one"] == 0.5
    assert abs(out["beta_mean"] - (1.0 + 0.25 + 1.0 + 0.999) / 4) < 1e-6
    assert out["teacher_logprob"] == -1.0
