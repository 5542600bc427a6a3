"""The vLLM backend against the HF backend, over HTTP, with a protocol-faithful fake vLLM server.

Three real processes on 127.0.0.1: the fake vLLM (tests/fake_vllm.py, the tiny model behind vLLM's
/v1/completions), a `trb-teacher serve --backend vllm` pointed at it, and the `teacher` fixture (backend
hf, same model). Both teachers must give the same answers at every position. The fake is launched the
way a real deployment may be: with an API key, a served name other than the path, `--max-model-len 64`
(so vLLM's limit is below the model's 512) and `--max-logprobs 12` (below the default 20).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from conftest import ServerProcess, free_port
from fake_vllm_process import FakeVLLMProcess as FakeVLLM
from shared import codec
from shared.protocol import ScoreRequest, ScoreResponse
from student_trainer.rollouts.targets import TargetStream
from student_trainer.teacher.client import TeacherClient
from teacher_server.backends.vllm import DUMMY, VLLMBackend, batches, sequence_scores, split_entry, vllm_dtype
from teacher_server.backends.vllm_transport import Entry, VLLMError, error_message
from teacher_server.settings import ServerSettings

SEQS = [[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [1, 13, 14], [2, 30, 47, 32, 47], [7]]
TOL = 1e-5  # same weights, both float32 (real vLLM in bf16 would need far more)
KEY = "vllm-test-key-0123"
MAX_MODEL_LEN = 64  # the fake's --max-model-len
LIMIT = MAX_MODEL_LEN - 2  # our max_context: vLLM serves prompts up to max_model_len - 1, less our dummy id
CAP = 12  # the fake's --max-logprobs


@pytest.fixture(scope="module")
def fake(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeVLLM]:
    server = FakeVLLM(tiny_model, tmp_path_factory.mktemp("logs") / "fake_vllm.log", "--served-model-name",
                      "tiny-teacher", "--max-model-len", str(MAX_MODEL_LEN), "--max-logprobs", str(CAP), key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vllm_teacher(fake: FakeVLLM, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory,
                 request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """Started right after the fake: it waits for the fake's /health itself, so the two load together."""
    logs = tmp_path_factory.mktemp("logs")
    (key_file := logs / "vllm.key").write_text(KEY + "\n")
    server = ServerProcess(tiny_model, "--backend", "vllm", "--vllm-url", fake.url,
                           "--vllm-api-key-file", str(key_file), log=logs / "vllm_teacher.log")
    request.getfixturevalue("teacher")  # the hf teacher loads while these two start
    yield server.wait_ready(120)
    server.stop()


def post(url: str, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=30)


def scores(url: str, body: dict) -> ScoreResponse:
    resp = post(url, "/v1/score", body)
    assert resp.status_code == 200, resp.text
    return codec.decode(resp.content, ScoreResponse)


def test_model_info_matches_hf(vllm_teacher: ServerProcess, teacher: ServerProcess) -> None:
    ours, ref = (httpx.get(f"{s.url}/v1/model").json() for s in (vllm_teacher, teacher))
    assert ours["backend"] == "vllm" and ours["full_logprobs"] is False
    for key in ("vocab_size", "tokenizer_fingerprint"):
        assert ours[key] == ref[key]
    # vLLM's max_model_len from /v1/models less two (its generated token, our dummy), not the model's 512;
    # the top-k cap is vLLM's --max-logprobs, read from its refusal of a larger prompt_logprobs.
    assert ref["max_context"] == 512 and ours["max_context"] == LIMIT
    assert ref["max_top_k"] == 48 and ours["max_top_k"] == CAP
    assert ours["dtype"] == "bfloat16"  # a float32 checkpoint under vLLM's --dtype auto on a bf16 GPU


@pytest.mark.parametrize(("start", "top_k"), [(0, 10), ([3, 0, 1, 0], 5), ([11, 2, 4, 0], CAP), (0, 0)])
def test_scores_match_hf_at_every_position(vllm_teacher: ServerProcess, teacher: ServerProcess,
                                           start: int | list[int], top_k: int) -> None:
    body = {"sequences": SEQS, "start": start, "top_k": top_k}
    ours, ref = scores(vllm_teacher.url, body), scores(teacher.url, body)
    worst = 0.0
    for seq, a, b in zip(SEQS, ours.results, ref.results, strict=True):
        assert a.start == b.start and a.top_ids.shape == (len(seq) - b.start, top_k)
        assert np.array_equal(a.top_ids, b.top_ids)
        for name in ("top_logprobs", "tail_logprob", "next_token_logprobs"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.shape == y.shape, name
            worst = max(worst, float(np.abs(x - y).max(initial=0.0)))
    assert worst <= TOL, f"max |Δ| between the vllm and hf backends = {worst}"


def test_one_call_per_top_k_with_only_known_keys(vllm_teacher: ServerProcess, fake: FakeVLLM) -> None:
    seen = len(fake.requests())
    scores(vllm_teacher.url, {"sequences": SEQS[:2], "top_k": 3})
    sent = fake.requests()[seen:]
    assert [r["prompt_tokens"] for r in sent] == [len(SEQS[0]) + 1, len(SEQS[1]) + 1]  # the dummy id appended
    assert all(r["keys"] == ["max_tokens", "model", "prompt", "prompt_logprobs"] for r in sent)
    assert all(r["max_tokens"] == 1 and r["prompt_logprobs"] == 3 for r in sent)
    typo = fake.complete({"prompt": [1, 2], "prompt_logprob": 3})  # stricter than vLLM: caught, not ignored
    assert typo.status_code == 400 and "prompt_logprob" in typo.json()["error"]["message"]


def test_over_long_sequence_is_refused_naming_the_limit(vllm_teacher: ServerProcess, teacher: ServerProcess,
                                                         fake: FakeVLLM) -> None:
    seen = len(fake.requests())
    over = post(vllm_teacher.url, "/v1/score", {"sequences": [[1] * 10, [2] * (LIMIT + 1)], "top_k": 2})
    assert over.status_code == 422, over.text
    err = over.json()["error"]
    assert err["field"] == "sequences.1" and str(LIMIT) in err["message"]
    assert len(fake.requests()) == seen  # refused before vLLM saw it
    body = {"sequences": [[3] * LIMIT, [1, 2]], "top_k": 4}  # exactly at the limit: served, and right
    for a, b in zip(scores(vllm_teacher.url, body).results, scores(teacher.url, body).results, strict=True):
        assert np.array_equal(a.top_ids, b.top_ids) and np.abs(a.top_logprobs - b.top_logprobs).max() <= TOL


def test_top_k_over_vllms_cap_is_refused(vllm_teacher: ServerProcess) -> None:
    resp = post(vllm_teacher.url, "/v1/score", {"sequences": SEQS[:1], "top_k": CAP + 1})
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "top_k"
    assert str(CAP) in resp.json()["error"]["message"]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/sessions", {"sequences": [[1, 5, 6]], "top_k": 5}, "sequences"),
    ("/v1/score", {"sequences": [[1, 5, 6]], "top_k": 5, "token_ids": [3]}, "token_ids"),
    ("/v1/score", {"sequences": [[1, 5, 6]], "top_k": 5, "full": True}, "full")])
def test_what_vllm_cannot_serve_is_a_422(vllm_teacher: ServerProcess, path: str, body: dict, field: str) -> None:
    resp = post(vllm_teacher.url, path, body)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "unsupported" and err["field"] == field
    if field == "sequences":  # the session refusal names the way out
        assert "/v1/score" in err["message"] and "--backend hf" in err["message"] and "sglang" in err["message"]


def test_streamed_targets_fall_back_to_scoring_on_a_vllm_teacher(vllm_teacher: ServerProcess) -> None:
    """An OPD rollout's session is refused (422 unsupported): no streamed targets (the trainer scores
    the batch), and the client asks no more."""

    async def send(request):  # noqa: ANN001, ANN202 - what rollout._send does without the overlap's loop turns
        return asyncio.ensure_future(request)

    async def main() -> tuple[bool, bool]:
        async with TeacherClient(vllm_teacher.url) as client:
            stream = TargetStream(client, 2, 4, 5, send)
            await stream.open([[1, 5, 6], [2, 7]])
            stream.add([0, 1], [[8], [9]])
            return await stream.finish() is None, client.stream_targets

    assert asyncio.run(main()) == (True, False)


def test_empty_token_ids_give_an_empty_column(vllm_teacher: ServerProcess, teacher: ServerProcess) -> None:
    body = {"sequences": SEQS, "top_k": 2, "token_ids": []}
    for a, b in zip(scores(vllm_teacher.url, body).results, scores(teacher.url, body).results, strict=True):
        assert a.token_logprobs.shape == b.token_logprobs.shape == (len(a.top_ids), 0)


def test_api_key_is_sent_and_a_missing_one_named(fake: FakeVLLM, tiny_model: Path) -> None:
    denied = fake.complete({"prompt": [1, 2]}, key=None)
    assert denied.status_code == 401 and denied.json() == {"error": "Unauthorized"}
    assert httpx.get(f"{fake.url}/v1/models").status_code == 401  # /v1/models is guarded too
    assert httpx.get(f"{fake.url}/health").status_code == 200  # health is not
    with pytest.raises(VLLMError, match="401.*Unauthorized.*VLLM_API_KEY"):
        VLLMBackend(str(tiny_model), url=fake.url)
    with_key = VLLMBackend(str(tiny_model), url=fake.url, api_key=KEY)
    assert with_key.transport.model == "tiny-teacher" and with_key.info.max_top_k == CAP
    assert with_key.score([ScoreRequest(sequences=SEQS[:1], top_k=2)])[0][0].top_ids.shape == (len(SEQS[0]), 2)
    with_key.close()


def test_fake_follows_the_documented_protocol(fake: FakeVLLM) -> None:
    ids = [1, 5, 6, 7, 8]
    resp = fake.complete({"model": "tiny-teacher", "prompt": [ids, [4, 2]], "max_tokens": 1, "prompt_logprobs": 3})
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    entries = choices[0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for i in range(1, len(ids)):
        keys = list(entries[i])
        assert keys[0] == str(ids[i]) and len(keys) in (3, 4)  # the actual token first, string keys
        ranks = sorted(e["rank"] for t, e in entries[i].items() if len(keys) == 3 or t != str(ids[i]))
        assert ranks == [1, 2, 3] and all("decoded_token" in e for e in entries[i].values())
    plain = fake.complete({"prompt": ids, "max_tokens": 1})
    assert plain.json()["choices"][0]["prompt_logprobs"] is None  # only when asked
    hot = fake.complete({"prompt": ids, "max_tokens": 1, "prompt_logprobs": 3, "temperature": 0.3})
    assert hot.json()["choices"][0]["prompt_logprobs"] == entries  # temperature never applies


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ({"prompt": [1] * MAX_MODEL_LEN, "max_tokens": 1}, 400, "max_tokens must be at least 1"),
    ({"prompt": [1] * (MAX_MODEL_LEN + 1)}, 400, "maximum context length is 64"),
    ({"prompt": [1, 2], "prompt_logprobs": CAP + 1}, 400, f"greater than max allowed: {CAP}"),
    ({"prompt": [1, 2], "prompt_logprobs": -1}, 400, f"greater than max allowed: {CAP}"),
    ({"prompt": [1, 2], "prompt_logprobs": -2}, 400, "positive value or -1"),
    ({"prompt": [1, 2], "prompt_logprobs": 2, "stream": True}, 400, "not available when `stream=True`"),
    ({"prompt": [1, 48]}, 400, "Token id 48 is out of vocabulary"),
    ({"prompt": [1, 2], "model": "other"}, 404, "does not exist")])
def test_fake_enforces_vllm_limits_with_its_error_body(fake: FakeVLLM, body: dict, status: int, words: str) -> None:
    resp = fake.complete(body)
    err = resp.json()["error"]
    assert resp.status_code == status == err["code"] and words in err["message"], resp.text
    assert set(err) == {"message", "type", "param", "code"}


def test_split_entry_drops_the_actual_token_only_when_outside_the_top_k() -> None:
    def entry(*rows: tuple[int, float, int]) -> dict[str, Entry]:
        return {str(t): Entry(logprob=lp, rank=r) for t, lp, r in rows}

    outside = entry((9, -5.0, 7), (3, -0.5, 1), (4, -1.0, 2))
    assert split_entry(outside, 9, 2) == ([3, 4], [-0.5, -1.0], -5.0)
    merged = entry((4, -1.0, 2), (3, -0.5, 1))  # the actual token is in the top-k: one key, top-k rank
    assert split_entry(merged, 4, 2) == ([3, 4], [-0.5, -1.0], -1.0)
    tie = entry((9, -1.0, 2), (3, -0.5, 1), (4, -1.0, 2))  # a tie at the boundary: the id decides, not the rank
    assert split_entry(tie, 9, 2)[0] == [3, 4]
    assert split_entry(entry((5, -9999.0, 40)), 5, 0) == ([], [], float("-inf"))  # -9999.0 is -inf
    with pytest.raises(VLLMError, match="lacks the actual token"):
        split_entry(outside, 8, 2)
    with pytest.raises(VLLMError, match="3 logprobs"):
        split_entry(outside, 9, 1)
    for broken in ({"logprob": -0.5}, {"logprob": "x", "rank": 1}, {"logprob": -0.5, "rank": None}):
        with pytest.raises(VLLMError, match="malformed"):  # what a model validation used to refuse
            split_entry({**outside, "3": broken}, 9, 2)


def test_sequence_scores_reads_entry_p_plus_one() -> None:
    seq = [5, 6, 7]
    positions = [None] + [{str(t): Entry(logprob=-float(i), rank=1)} for i, t in enumerate([6, 7, DUMMY], 1)]
    res = sequence_scores(positions, seq, 1, 1)  # p = 1, 2: entries 2, 3 (the dummy's: after all of seq)
    assert res.top_ids[:, 0].tolist() == [7, DUMMY] and res.next_token_logprobs.tolist() == [-2.0]
    with pytest.raises(VLLMError, match="expected one per token"):
        sequence_scores(positions[:-1], seq, 0, 1)


def test_batches_respect_both_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    import teacher_server.backends.vllm as mod

    monkeypatch.setattr(mod, "ENTRY_BUDGET", 10)
    monkeypatch.setattr(mod, "MAX_PROMPTS", 3)
    parts = list(batches([1, 1, 1, 1, 1, 9, 4], 2))  # 3 prompts a call, then 10 entries, one over-budget alone
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 5), (5, 6), (6, 7)]
    assert [(p.start, p.stop) for p in batches([2, 2, 1, 3], 2)] == [(0, 3), (3, 4)]  # 4+4+2 fits, +6 not


def test_dtype_and_error_messages() -> None:
    assert vllm_dtype("float32") == "bfloat16" and vllm_dtype("torch.float16") == "float16"
    refused = httpx.Response(400, json={"error": {"message": "max_tokens must be at least 1", "code": 400}})
    assert error_message(refused).startswith("max_tokens") and error_message(httpx.Response(502, text="x")) == "x"
    assert error_message(httpx.Response(401, json={"error": "Unauthorized"})) == "Unauthorized"


def test_settings_need_a_vllm_url_and_hide_its_key() -> None:
    with pytest.raises(ValidationError, match="needs vllm_url"):
        ServerSettings(model="m", backend="vllm")
    with pytest.raises(ValidationError, match="only backend vllm"):
        ServerSettings(model="m", vllm_api_key=KEY)
    cfg = ServerSettings(model="m", backend="vllm", vllm_url="http://127.0.0.1:8001", vllm_api_key=KEY)
    assert KEY not in repr(cfg) and KEY not in str(cfg.model_dump())


# ---- the exact path: a pooling runner's hidden states, projected by the checkpoint's lm_head -------
@pytest.fixture(scope="module")
def pooling_fake(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeVLLM]:
    server = FakeVLLM(tiny_model, tmp_path_factory.mktemp("logs") / "fake_vllm_pooling.log", "--runner", "pooling",
                      "--max-model-len", str(MAX_MODEL_LEN), key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def exact_teacher(pooling_fake: FakeVLLM, tiny_model: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("logs")
    (key_file := logs / "vllm.key").write_text(KEY + "\n")
    server = ServerProcess(tiny_model, "--backend", "vllm", "--vllm-url", pooling_fake.url, "--vllm-api-key-file",
                           str(key_file), "--allow-full", "--max-full-values", "100000", log=logs / "exact.log")
    yield server.wait_ready(120)
    server.stop()


def test_a_pooling_runner_gives_exact_scores(exact_teacher: ServerProcess, teacher: ServerProcess) -> None:
    info = httpx.get(f"{exact_teacher.url}/v1/model").json()
    assert info["tail"] == "exact" and info["tail_bound"] == 0 and info["full_logprobs"] and info["token_ids"]
    assert info["sessions"] is False and info["dtype"] == "float32"  # read off the hidden states' bits
    assert info["max_context"] == MAX_MODEL_LEN  # no generated token, no dummy id
    body = {"sequences": SEQS, "start": [3, 0, 1, 0], "top_k": 10, "token_ids": [1, 5, 47], "full": True}
    ours, ref = scores(exact_teacher.url, body), scores(teacher.url, body)
    assert ours.tail == "exact"
    for a, b in zip(ours.results, ref.results, strict=True):
        assert np.array_equal(a.top_ids, b.top_ids)
        for name in ("top_logprobs", "tail_logprob", "next_token_logprobs", "token_logprobs", "logprobs"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, err_msg=name)


def test_stacked_scores_are_those_of_one_sequence_at_a_time() -> None:
    import torch

    from teacher_server.backends.lm_head import scores_from_logprobs, stacked_scores

    seqs, starts = [[1, 5, 6, 7], [2, 3], [4, 9, 9]], [1, 0, 2]
    req = ScoreRequest(sequences=seqs, start=starts, top_k=3, token_ids=[0, 5], full=True)
    rows = [torch.randn(len(s) - b, 12).log_softmax(-1) for s, b in zip(seqs, starts, strict=True)]
    items = list(zip(seqs, starts, strict=True))
    for got, seq, start, lp in zip(stacked_scores(torch.cat(rows), items, req), seqs, starts, rows, strict=True):
        one = scores_from_logprobs(lp, seq, start, req)
        for name in ("start", "top_ids", "top_logprobs", "tail_logprob", "next_token_logprobs", "token_logprobs",
                     "logprobs"):
            np.testing.assert_array_equal(getattr(got, name), getattr(one, name), err_msg=name)


def test_a_generate_server_says_its_tail_is_bounded(vllm_teacher: ServerProcess) -> None:
    from teacher_server.backends.base import TOPK_MASS_BOUND

    info = httpx.get(f"{vllm_teacher.url}/v1/model").json()
    assert info["tail"] == "bounded" and info["tail_bound"] == TOPK_MASS_BOUND and info["sessions"] is False
    assert scores(vllm_teacher.url, {"sequences": SEQS[:1], "top_k": 3}).tail == "bounded"


def test_an_engine_restart_is_a_503_and_the_client_rides_it_out(tiny_model: Path, tmp_path: Path) -> None:
    """vLLM dies under a running teacher: requests get 503 `engine_unavailable` (JSON), /ready turns 503;
    a client with retry_for_s keeps retrying until the engine is back on its port, then gets its answer."""
    port = free_port()
    engine = FakeVLLM(tiny_model, tmp_path / "engine.log", port=port)
    server = ServerProcess(tiny_model, "--backend", "vllm", "--vllm-url", engine.url, log=tmp_path / "teacher.log")
    try:
        server.wait_ready(120)
        assert post(server.url, "/v1/score", {"sequences": SEQS[:1], "top_k": 3}).status_code == 200
        engine.stop()
        resp = post(server.url, "/v1/score", {"sequences": SEQS[:1], "top_k": 3})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "engine_unavailable", resp.text
        ready = httpx.get(f"{server.url}/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "engine_unavailable"

        async def score_through_the_outage() -> float:
            async with TeacherClient(server.url, retries=0, retry_for_s=120.0) as client:
                started = time.monotonic()
                await client.score([SEQS[0]], top_k=3)
                return time.monotonic() - started

        async def restart_later() -> None:
            await asyncio.sleep(2.0)
            nonlocal engine
            engine = FakeVLLM(tiny_model, tmp_path / "engine.log", port=port)

        async def both() -> float:
            waited, _ = await asyncio.gather(score_through_the_outage(), restart_later())
            return waited

        assert asyncio.run(both()) >= 2.0  # answered only once the engine was back
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/ready").status_code != 200:
            assert time.monotonic() < deadline, "/ready did not turn 200 once the engine answered again"
            time.sleep(0.2)
    finally:
        server.stop()
        engine.stop()


@pytest.mark.parametrize("k", [0, 4])
def test_compat_route_over_vllm_answers_as_vllm_itself(vllm_teacher: ServerProcess, fake: FakeVLLM, k: int) -> None:
    """/v1/completions on the vllm backend: the fake vLLM's own answer to the same request (docs/interop.md)."""
    from fake_vllm_process import assert_same_answers

    body = {"prompt": SEQS, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}
    ours = httpx.post(f"{vllm_teacher.url}/v1/completions", json=body, timeout=120)
    assert ours.status_code == 200, ours.text
    assert_same_answers(ours.json(), fake.complete(body).json(), k)
    over = httpx.post(f"{vllm_teacher.url}/v1/completions", json={**body, "prompt_logprobs": CAP + 1}, timeout=30)
    assert over.status_code == 400 and over.json()["error"]["param"] == "prompt_logprobs"  # vLLM's own cap
