"""Multi-teacher distillation: `teacher.others` and `teacher.route` give each training row its own teacher.

Two real servers with different models that share the task tokenizer (the task teacher, and the task
student served as a second teacher): rows whose prompt has a `*` go to the second one, the rest to the
default; every method's targets (a scored batch, a streamed one, a TRB session) are the row's own
teacher's, and a short run with both finishes.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ServerProcess
from student_trainer.config import ConfigError, load_config
from student_trainer.reports.metrics_file import read_metrics
from student_trainer.rollouts.batch import rollout_batch
from student_trainer.rollouts.targets import score_targets
from student_trainer.teacher.client import TeacherClient
from student_trainer.training.loop import train_sync
from student_trainer.training.run import assemble

K = 8


@pytest.fixture(scope="module")
def second_teacher(task_models: tuple[Path, Path]):
    server = ServerProcess(task_models[1]).wait_ready()
    yield server
    server.stop()


def _cfg(task_models, urls: tuple[str, str], out: Path, *extra: str):
    return load_config(None, [f"student.path={task_models[1]}", f"teacher.url={urls[0]}", f"teacher.top_k={K}",
                              f"teacher.others={{mul: {{url: '{urls[1]}'}}}}", "teacher.route={'*': mul}",
                              "train.batch_size=8", "train.max_new_tokens=10", f"train.out_dir={out}",
                              "train.progress=false", "train.eval_every=0", "data.eval_size=8", "data.probe_size=4",
                              *extra])


def test_route_names_known_teachers_and_picks_the_first_key_found(task_models) -> None:
    cfg = _cfg(task_models, ("http://127.0.0.1:1", "http://127.0.0.1:2"), Path("/tmp/x"))
    assert cfg.teacher.teacher_of("12*3\n") == "mul" and cfg.teacher.teacher_of("12+3\n") == "default"
    with pytest.raises(ConfigError, match=r"teacher\.route: '\+' names teacher 'add'; known ids: \['default', 'mul'\]"):
        _cfg(task_models, ("http://a", "http://b"), Path("/tmp/x"), "teacher.route={'+': add}")
    with pytest.raises(ConfigError, match="`default` is the id of the teacher set by teacher.url"):
        load_config(None, ["teacher.url=http://a", "teacher.others={default: {url: 'http://b'}}"])


async def _rows_and_targets(task_models, urls, out, method: list[str]):
    cfg = _cfg(task_models, urls, out, *method)
    student = AutoModelForCausalLM.from_pretrained(task_models[1], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(task_models[1])
    async with AsyncExitStack() as stack:
        clients = {tid: await stack.enter_async_context(TeacherClient(url))
                   for tid, url in zip(("default", "mul"), urls, strict=True)}
        run = assemble(cfg, student, tok, clients["default"], out, teachers={"mul": clients["mul"]})
        rollouts = await rollout_batch(run, 0, run.policy)
        checked = []
        for r in rollouts:
            prompts = [tok.decode(r.tokens_B_T[b, : r.prompt_width][r.attention_mask_B_T[b, : r.prompt_width].bool()])
                       for b in range(r.tokens_B_T.shape[0])]
            owners = {cfg.teacher.teacher_of(p) for p in prompts}
            assert len(owners) == 1, f"one rollout mixes teachers: {prompts}"
            (owner,) = owners
            other = "mul" if owner == "default" else "default"
            mine = await score_targets(r, clients[owner], K, tok.pad_token_id)
            theirs = await score_targets(r, clients[other], K, tok.pad_token_id)
            checked.append((owner, r, mine, theirs))
        return checked


@pytest.mark.parametrize("method", [["method.name=opd", "teacher.stream_chunk_tokens=0"],
                                    ["method.name=opd", "teacher.stream_chunk_tokens=4"],
                                    ["method.name=trb", "method.eps0=0.5", "method.horizon=10"]],
                         ids=["opd-scored", "opd-streamed", "trb-session"])
def test_each_row_is_scored_by_its_own_teacher(task_models, task_teacher, second_teacher, tmp_path, method) -> None:
    checked = asyncio.run(_rows_and_targets(task_models, (task_teacher.url, second_teacher.url), tmp_path, method))
    assert {owner for owner, *_ in checked} == {"default", "mul"}  # the batch holds rows of both
    for owner, r, mine, theirs in checked:
        mask = r.loss_mask_B_T
        got, own, other = r.targets.logprobs[mask], mine.logprobs[mask], theirs.logprobs[mask]
        assert torch.equal(r.targets.ids[mask], mine.ids[mask]), owner
        assert torch.allclose(got, own, atol=1e-4), (owner, (got - own).abs().max())
        assert (got - other).abs().max() > 0.1, owner  # the two teachers are different models


def test_a_run_with_two_teachers_finishes(task_models, task_teacher, second_teacher, tmp_path) -> None:
    cfg = _cfg(task_models, (task_teacher.url, second_teacher.url), tmp_path, "method.name=trb", "method.eps0=0.5",
               "method.horizon=2", "train.steps=3")
    summary = train_sync(cfg)
    steps = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert summary["steps"] == 3 and [r["step"] for r in steps] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
