"""The trainer's client against real server processes: tensors out, lost sessions rebuilt, bad pairs refused,
and load spread over replicas with a dead one routed around."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from conftest import ServerProcess
from student_trainer.teacher.client import (
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
    # retry_for_s: the restarted server answers 503 until its model is loaded, seconds on a busy machine
    async with TeacherClient(server.url, retries=8, backoff_s=0.2, retry_for_s=120) as client:
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


# ---- several replicas ------------------------------------------------------------------------
async def test_replicas_share_the_load_and_sessions_stay_on_theirs(teacher: ServerProcess, tiny_model: Path) -> None:
    second = ServerProcess(tiny_model).wait_ready()
    try:
        async with TeacherClient([teacher.url, second.url]) as client:
            sessions = [await client.open_session([[1, 5 + i], [1, 6, 7]], top_k=4) for i in range(6)]
            for t in range(3):  # concurrent extends, as several rollouts would send them
                await asyncio.gather(*(s.extend([[8 + t], [9]]) for s in sessions))
            await asyncio.gather(*(client.score([[1, 5, 6, 7]], top_k=4) for _ in range(6)))
            per_replica = client.requests_per_replica()
            assert {s.replica.url for s in sessions} == {teacher.url, second.url}
            assert all(s.rebuilds == 0 for s in sessions)  # every extend found its session where it lives
            for s in sessions:
                await s.close()
        print(f"requests per replica: {per_replica}")
        assert min(per_replica.values()) >= 0.4 * sum(per_replica.values())
    finally:
        second.stop()


async def test_a_dead_replica_is_routed_around_then_probed_back(tiny_model: Path) -> None:
    a, b = ServerProcess(tiny_model).wait_ready(), ServerProcess(tiny_model).wait_ready()
    servers = {a.url: a, b.url: b}
    try:
        async with TeacherClient([a.url, b.url], retries=4, backoff_s=0.2, max_backoff_s=0.5) as client:
            await client.check_tokenizer(AutoTokenizer.from_pretrained(tiny_model))
            session = await client.open_session([[1, 5, 6]], top_k=3)
            victim = servers[session.replica.url]
            survivor = b if victim is a else a
            victim.proc.kill()  # kill -9: its sessions are gone with it
            victim.proc.wait()
            step = await session.extend([[7]])
            assert session.rebuilds == 1 and session.replica.url == survivor.url
            ref = await client.score([[1, 5, 6, 7]], start=3, top_k=3)
            assert torch.equal(step.ids, ref[0].topk.ids)
            for _ in range(4):  # routed to the survivor, no waiting on the dead one
                await client.score([[1, 2]], top_k=3)
            before = client.requests_per_replica()[victim.url]

            restarted = ServerProcess(tiny_model, port=victim.port).wait_ready()
            servers[victim.url] = restarted
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # a /health probe after the backoff puts it back in rotation
                await client.score([[1, 2]], top_k=3)
                if client.requests_per_replica()[victim.url] > before:
                    break
                await asyncio.sleep(0.05)
            assert client.requests_per_replica()[victim.url] > before
            await session.close()
    finally:
        for server in servers.values():
            server.stop()


async def test_every_replica_is_checked_for_the_tokenizer(teacher: ServerProcess, task_teacher: ServerProcess,
                                                          tiny_model: Path) -> None:
    async with TeacherClient([teacher.url, task_teacher.url]) as client:
        with pytest.raises(TokenizerMismatch, match=task_teacher.url.replace(".", r"\.")):
            await client.check_tokenizer(AutoTokenizer.from_pretrained(tiny_model))
