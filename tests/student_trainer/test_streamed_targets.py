"""Student-only rollouts get their teacher targets while they sample (rollouts/targets.py): the same
tokens as without streaming, the same targets as one /v1/score of the finished batch, and a fall back
to that call when the session is lost or refused."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO
from student_trainer.config import load_config
from student_trainer.methods.behaviors import make_behavior
from student_trainer.methods.row_generators import RowGenerators
from student_trainer.reports.metrics_file import read_metrics
from student_trainer.rollouts.generate import generate
from student_trainer.rollouts.rollout import Rollout
from student_trainer.rollouts.targets import refused, score_targets
from student_trainer.teacher.client import TeacherClient, TeacherError
from student_trainer.training.loop import train_sync

K, MAX_NEW = 8, 12
STUDENT = REPO / "models" / "arith-student"
PROMPTS = ["12+34\n", "7*8-5\n", "3+4*2+9\n", "5\n", "81-9*3\n"]


async def _rollout(client: TeacherClient, chunk: int) -> Rollout:
    """The shipped student (it stops after its answer, so rows end at different steps) against the
    random task teacher (same tokenizer)."""
    student = AutoModelForCausalLM.from_pretrained(STUDENT).eval()
    tok = AutoTokenizer.from_pretrained(STUDENT)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return await generate(student, prompts, make_behavior("opd"), 0.0, client, K, MAX_NEW, tok.eos_token_id,
                          tok.pad_token_id, RowGenerators.seeded(0, 3, range(len(prompts))), stream_chunk=chunk)


def _assert_same_targets(rollout: Rollout, scored) -> None:  # noqa: ANN001 - TeacherTopK
    m = rollout.loss_mask_B_T
    assert torch.equal(rollout.targets.ids[m], scored.ids[m])
    assert torch.allclose(rollout.targets.logprobs[m], scored.logprobs[m], atol=1e-5)
    assert torch.allclose(rollout.targets.tail_logprob[m], scored.tail_logprob[m], atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 11])
def test_streamed_targets_equal_scoring_the_finished_batch(task_teacher, chunk) -> None:
    async def main() -> tuple[Rollout, Rollout, object]:
        async with TeacherClient(task_teacher.url) as client:
            plain = await _rollout(client, chunk=0)
            assert (await _rollout(client, chunk=MAX_NEW)).targets is None  # one chunk: scored after sampling
            streamed = await _rollout(client, chunk=chunk)
            return plain, streamed, await score_targets(streamed, client, K, 0)

    plain, streamed, scored = asyncio.run(main())
    assert plain.targets is None  # chunk 0: the caller scores afterwards
    assert torch.equal(plain.tokens_B_T, streamed.tokens_B_T)  # the teacher never changes an OPD token
    lengths = streamed.response_lens_B.tolist()
    assert len(set(lengths)) > 1 and min(lengths) < MAX_NEW  # rows that stop early and at different steps
    _assert_same_targets(streamed, scored)


def test_a_session_lost_mid_stream_is_rebuilt_from_scoring(task_teacher) -> None:
    """The server forgets the session (deleted here; expired or restarted in life): the chunk's targets
    come from /v1/score and a new session carries the rest of the rollout."""

    class Forgetful(TeacherClient):
        async def _session_call(self, path, body, replica=None):  # noqa: ANN001, ANN202
            if path.endswith("/extend") and not self.forgot:
                self.forgot = True
                httpx.delete(f"{task_teacher.url}/v1/sessions/{path.split('/')[3]}")
            return await super()._session_call(path, body, replica)

    async def main() -> tuple[Rollout, object, bool]:
        async with Forgetful(task_teacher.url) as client:
            client.forgot = False
            rollout = await _rollout(client, chunk=3)
            return rollout, await score_targets(rollout, client, K, 0), client.forgot

    rollout, scored, forgot = asyncio.run(main())
    assert forgot and rollout.teacher_rebuilds == 1  # counted in the step's session_rebuilds, as TRB's are
    _assert_same_targets(rollout, scored)


def test_a_server_that_refuses_streaming_is_scored_after_sampling(task_teacher) -> None:
    """A server from before `all_positions` answers 422 to the field it does not know (requests forbid
    unknown fields); this server answers an unknown field the same way. The rollout then has no targets
    (the trainer scores it), and the client stops trying."""

    class OlderServer(TeacherClient):
        async def _session_call(self, path, body, replica=None):  # noqa: ANN001, ANN202
            if path.endswith("/extend"):
                body = {**body.model_dump(exclude={"all_positions"}), "all_positions_v2": True}
                resp = await self.replicas[0].http.post(path, json=body)
                raise self._error(resp)
            return await super()._session_call(path, body, replica)

    async def main() -> tuple[Rollout, bool]:
        async with OlderServer(task_teacher.url) as client:
            rollout = await _rollout(client, chunk=3)
            return rollout, client.stream_targets

    rollout, streaming = asyncio.run(main())
    assert rollout.targets is None and not streaming


def test_which_failures_turn_streaming_off() -> None:
    """A refusal that the next rollout would meet again turns streaming off; a passing failure (a lost
    connection after retries, an overloaded or restarting teacher) costs only that rollout's stream."""
    for status, code in ((422, "invalid_request"), (422, "unsupported"), (413, "too_large")):
        assert refused(TeacherError("no", status, code))
    for status, code in ((None, None), (503, "not_ready"), (429, "overloaded"), (422, "quarantined")):
        assert not refused(TeacherError("later", status, code))


def test_a_streamed_run_trains_like_a_scored_one(task_models, task_teacher, tmp_path) -> None:
    """Three OPD steps through `train()`: the same tokens (response lengths) and losses to float
    rounding whether the targets were streamed in chunks of 4 or scored after sampling."""
    def run(chunk: int) -> list[dict]:
        cfg = load_config(None, [f"student.path={STUDENT}", f"teacher.url={task_teacher.url}", f"teacher.top_k={K}",
                                 f"teacher.stream_chunk_tokens={chunk}", "method.name=opd", "train.batch_size=4",
                                 f"train.max_new_tokens={MAX_NEW}", "train.steps=3", "train.eval_every=0",
                                 "train.save_every=0", f"train.out_dir={tmp_path / str(chunk)}",
                                 "train.progress=false", "data.eval_size=2", "data.probe_size=2"])
        train_sync(cfg)
        return [r for r in read_metrics(tmp_path / str(chunk) / "metrics.jsonl") if "loss" in r]

    def extends() -> int:  # the server's count of session extends (the streamed chunks), every client
        text = httpx.get(f"{task_teacher.url}/metrics").text
        pattern = r'^trb_teacher_requests_total\{[^}]*route="[^"]*/extend"[^}]*\} (\S+)$'
        return int(sum(float(v) for v in re.findall(pattern, text, re.M)))

    before = extends()
    streamed = run(4)
    middle = extends()
    scored = run(0)
    assert middle - before >= 3 * 2 and extends() == middle  # 3 steps of >= 2 chunks; none unstreamed
    assert [r["tokens"] for r in streamed] == [r["tokens"] for r in scored]
    for a, b in zip(streamed, scored, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
