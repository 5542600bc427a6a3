"""The trainer's client against real server processes: tensors out, lost sessions rebuilt, bad pairs refused."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from conftest import ServerProcess
from student_trainer.teacher_client import (
    TeacherClient,
    TeacherError,
    TokenizerMismatch,
)
from tiny_model import make_tokenizer


async def test_score_decodes_to_tensors(teacher: ServerProcess) -> None:
    async with TeacherClient(teacher.url) as client:
        out = await client.score([[1, 5, 6, 7], [2, 9]], start=[1, 0], top_k=4, token_ids=[3])
    assert out[0].topk.ids.shape == (3, 4) and out[0].topk.ids.dtype == torch.long
    assert out[0].topk.logprobs.dtype == torch.float32 and out[1].next_token_logprobs.shape == (1,)
    assert out[0].token_logprobs.shape == (3, 1) and out[0].logprobs is None
    mass = out[0].topk.logprobs.exp().sum(-1) + out[0].topk.tail_logprob.exp()
    assert torch.allclose(mass, torch.ones(3), atol=1e-5)


async def test_tokenizer_fingerprint_check(teacher: ServerProcess, tiny_model: Path) -> None:
    async with TeacherClient(teacher.url) as client:
        await client.check_tokenizer(AutoTokenizer.from_pretrained(tiny_model))
        with pytest.raises(TokenizerMismatch, match="tokenizer mismatch"):
            await client.check_tokenizer(make_tokenizer(extra="#"))


async def test_lost_session_is_rebuilt_from_prefixes(teacher: ServerProcess) -> None:
    async with TeacherClient(teacher.url) as client:
        session = await client.open_session([[1, 5], [1, 6, 7]], top_k=5)
        await session.extend([[8], [9]])
        httpx.delete(f"{teacher.url}/v1/sessions/{session.session_id}")  # as if evicted or expired
        step = await session.extend([[10]], rows=[1])
        assert session.rebuilds == 1
        ref = await client.score([[1, 6, 7, 9, 10]], start=4, top_k=5)
        assert torch.equal(step.ids, ref[0].topk.ids) and torch.allclose(step.logprobs, ref[0].topk.logprobs, atol=1e-5)
        await session.close()


async def test_restarted_teacher_mid_session(tiny_model: Path) -> None:
    server = ServerProcess(tiny_model).wait_ready()
    port = server.port
    async with TeacherClient(server.url, retries=8, backoff_s=0.2) as client:
        session = await client.open_session([[1, 5, 6]], top_k=3)
        await session.extend([[7]])
        server.stop()
        restarted = ServerProcess(tiny_model, port=port)  # same address, fresh process, no sessions
        try:
            step = await session.extend([[8]])  # the old session died with the process
            assert session.rebuilds == 1 and step.ids.shape == (1, 3)
            ref = await client.score([[1, 5, 6, 7, 8]], start=4, top_k=3)
            assert torch.equal(step.ids, ref[0].topk.ids)
        finally:
            restarted.stop()


async def test_errors_are_not_retried_and_carry_the_field(teacher: ServerProcess) -> None:
    async with TeacherClient(teacher.url) as client:
        with pytest.raises(TeacherError) as info:
            await client.score([[1, 999]])
    assert info.value.status == 422 and info.value.field == "sequences.0.1"


async def test_unreachable_teacher_fails_after_retries() -> None:
    from conftest import free_port

    async with TeacherClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.01) as client:
        with pytest.raises(TeacherError, match="unreachable"):
            await client.score([[1, 2]])
