"""A short training run samples the same tokens, and takes the same steps, with the hand-written
Qwen3 decoder (what `student.decoder=auto` picks on a CPU) as with the eager transformers decoder:
OPD (rollout, then one /v1/score) and TRB (a teacher session during the rollout). Three optimizer
steps at a high learning rate: a decoder that kept step 0's fused weights samples other tokens
(checked by making `fused_weights` ignore weight changes: the OPD case fails)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from decoders.choose import make_decoder
from decoders.qwen3_decode import Qwen3Decoder
from student_trainer.config import load_config
from student_trainer.rollouts.batch import rollout_batch
from student_trainer.teacher.client import TeacherClient
from student_trainer.training.learner import learn
from student_trainer.training.run import assemble

STEPS = 3


async def _run(task_models: tuple[Path, Path], url: str, out: Path, method: list[str], decoder: str):
    cfg = load_config(None, [f"student.path={task_models[1]}", f"teacher.url={url}", "teacher.top_k=8",
                             "train.batch_size=4", "train.max_new_tokens=12", f"train.out_dir={out}",
                             "optim.lr=0.02", f"student.decoder={decoder}", *method])
    student = AutoModelForCausalLM.from_pretrained(task_models[1], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(task_models[1])
    tokens, losses = [], []
    async with TeacherClient(url) as client:
        run = assemble(cfg, student, tok, client, out)
        for _ in range(STEPS):
            rollouts = await rollout_batch(run, run.step, run.policy)
            tokens.append([r.tokens_B_T for r in rollouts])
            losses.append(learn(run, rollouts)["loss"])
            run.step += 1
    return tokens, losses


@pytest.mark.parametrize("method", [["method.name=opd"], ["method.name=trb", "method.eps0=0.3", "method.horizon=4"]],
                         ids=["opd", "trb"])
def test_short_run_samples_the_same_tokens_with_either_decoder(task_models, task_teacher, tmp_path, method):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one GEMM rounding for both (test_qwen3_decode.py says why)
    try:
        student = AutoModelForCausalLM.from_pretrained(task_models[1])
        assert type(make_decoder(student, 0)) is Qwen3Decoder  # what auto runs in this test's trainer
        eager = asyncio.run(_run(task_models, task_teacher.url, tmp_path / "eager", method, "eager"))
        fast = asyncio.run(_run(task_models, task_teacher.url, tmp_path / "auto", method, "auto"))
    finally:
        torch.set_num_threads(threads)
    for step, (a, b) in enumerate(zip(eager[0], fast[0], strict=True)):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), f"step {step}"
    assert eager[1] == pytest.approx(fast[1], abs=1e-5)
