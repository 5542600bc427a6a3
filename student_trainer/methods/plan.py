"""What each method does at optimizer step k: the only place the methods differ (no torch here: the CLI
prints the table before it loads anything).

Every method is a `method.name` of one trainer. A method is three choices, made here per step:
who picks the rollout's tokens (the behavior policy and its KL budget ε), what the student is fitted
to (the loss), and so how the teacher is asked (`uses_sessions`). `METHODS` is the same facts
written for people: `trb-train --help`, docs/config.md and docs/methods.md print it
(tests/student_trainer/test_train.py and test_config_doc.py keep the docs equal to it).
"""

from __future__ import annotations

from dataclasses import dataclass

from student_trainer.config import Config
from student_trainer.methods.schedules import budget, veto_beta


@dataclass(frozen=True)
class MethodRow:
    """One row of the method table: what a reader needs to tell the methods apart."""

    name: str
    behavior: str
    loss: str
    knobs: str
    teacher_calls: str


METHODS = (
    MethodRow("opd", "π_S", "reverse KL(π_S‖π̂_T)", "none",
              "streamed: a session fed the sampled tokens every `teacher.stream_chunk_tokens` (16) steps while "
              "the rollout goes on (0, or a teacher without sessions: one `/v1/score` per batch, after the rollouts)"),
    MethodRow("trb", "μ_β* (closest to π_T within KL ε_k of π_S), ε_k annealed to 0 over `horizon`", "reverse KL",
              "`eps0`, `horizon`, `schedule`",
              "a session (one `extend` per generated token) while ε_k > 0, then as opd"),
    MethodRow("fixed_eps", "μ_β* at constant ε = `eps0`", "reverse KL", "`eps0`", "a session every step"),
    MethodRow("skd", "π_S proposes; kept if in the teacher's top-`skd_top_k`, else a teacher draw", "reverse KL",
              "`skd_top_k`", "a session every step"),
    MethodRow("sft_warmup", "π̂_T for `horizon` steps, then π_S",
              "token cross-entropy on the teacher's tokens (`sft_loss: cross_entropy`, default) or forward "
              "KL(π̂_T‖π_S) (`sft_loss: forward_kl`) for `horizon` steps, then reverse KL", "`horizon`, `sft_loss`",
              "a session for `horizon` steps, then as opd"),
    MethodRow("teacher_warmup", "π̂_T for `horizon` steps, then π_S", "reverse KL throughout", "`horizon`",
              "as sft_warmup"),
    MethodRow("veto", "π_S", "forward KL(q_β‖π_S) (default) or reverse KL(π_S‖q_β), q_β ∝ π̂_T·sg[π_S]^β, "
              "β decaying from `veto_beta` to 0 over the run", "`veto_beta`, `veto_divergence`, `veto_schedule`",
              "as opd"),
    MethodRow("offline_kd", "none: the stored completions of a `trb-train export` folder (`data.offline_path`)",
              "reverse KL (`offline_loss: reverse_kl`, default) or forward KL(π̂_T‖π_S) (`offline_loss: "
              "forward_kl`) to the stored top-k + tail", "`offline_loss`",
              "none while training (the export scored every position once); eval's KL probe still asks the teacher"),
)

# Methods whose behavior asks the teacher at every rollout token, through a decoding session.
PER_TOKEN_METHODS = ("fixed_eps", "skd", "sft_warmup", "teacher_warmup")


def uses_sessions(cfg: Config) -> bool:
    """Does the method need the teacher's decoding sessions at some step (a teacher without them cannot serve it)?"""
    m = cfg.method
    return m.name in PER_TOKEN_METHODS or (m.name == "trb" and m.eps0 > 0)


def behavior_plan(cfg: Config, step: int) -> tuple[str, float]:
    """(behavior name, ε) at an optimizer step."""
    m = cfg.method
    if m.name == "trb":
        return "trb", budget(m.schedule, step, m.eps0, m.horizon)
    if m.name == "fixed_eps":
        return "fixed_eps", m.eps0
    if m.name in ("sft_warmup", "teacher_warmup"):
        return ("teacher", 0.0) if step < m.horizon else ("opd", 0.0)
    if m.name == "veto":
        return "opd", 0.0
    if m.name == "offline_kd":
        return "offline", 0.0  # no rollouts: stored completions (rollouts/offline_data.py)
    return m.name, 0.0


def loss_plan(cfg: Config, step: int) -> tuple[str, float]:
    """(loss name from losses.LOSSES, Veto's β) at an optimizer step: reverse KL but for three methods."""
    m = cfg.method
    if m.name == "veto":
        return f"veto_{m.veto_divergence}", veto_beta(m.veto_schedule, step, m.veto_beta, cfg.train.steps)
    if m.name == "sft_warmup" and step < m.horizon:
        return m.sft_loss, 0.0
    if m.name == "offline_kd":
        return m.offline_loss, 0.0
    return "reverse_kl", 0.0

