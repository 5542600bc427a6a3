"""The SGLang backend against the HF backend, over HTTP, with a protocol-faithful fake SGLang server.

Three real processes on 127.0.0.1: the fake SGLang (tests/fake_sglang.py, the tiny model behind SGLang's
native /generate), a `trb-teacher serve --backend sglang` pointed at it, and the `teacher` fixture
(backend hf, same model). Both teachers must give the same answers at every position.
The fake is launched the way a real deployment may be: with an API key, a context length of 64 (so
SGLang's own limit, 57 tokens a prompt, is below the model's 512), preferred sampling params setting
temperature 0.7 (a backend that forgot to send temperature 1.0 would get a different last position),
and /health answering 503 while it "starts".
"""

from __future__ import annotations

import asyncio
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fake_sglang_process import FakeSGLang

from conftest import ServerProcess
from shared import codec
from shared.protocol import ScoreRequest, ScoreResponse, SessionStep
from teacher_server.backends.sglang import (
    SGLangBackend,
)
from teacher_server.backends.sglang_transport import (
    GenerateCall,
    SGLangError,
    error_message,
)

LAST = 47  # the tiny model's last vocabulary id (vocab_size 48): SGLang reports it as 0 in input entries
SEQS = [[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [1, 13, 14], [2, 30, LAST, 32, LAST], [7]]
TOL = 1e-4  # same weights, both float32: they agree to ~1e-6 (real SGLang in bf16 would need far more)
KEY = "sglang-test-key-0123"
CONTEXT = 64  # the fake's --context-length
LIMIT = min(CONTEXT - 1, (1 << 20) - 1) - 5 - 1  # max_req_input_len - 1: the longest prompt SGLang serves


@pytest.fixture(scope="module")
def fake(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeSGLang]:
    server = FakeSGLang(tiny_model, tmp_path_factory.mktemp("logs") / "fake_sglang.log",
                        "--context-length", str(CONTEXT), "--starting-health-calls", "3",
                        "--preferred-sampling-params", json.dumps({"temperature": 0.7}), key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sglang_teacher(fake: FakeSGLang, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory,
                   request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """Started right after the fake: it waits for the fake's /health itself, so the two load together."""
    logs = tmp_path_factory.mktemp("logs")
    (key_file := logs / "sglang.key").write_text(KEY + "\n")
    server = ServerProcess(tiny_model, "--backend", "sglang", "--sglang-url", fake.url,
                           "--sglang-api-key-file", str(key_file), log=logs / "sglang_teacher.log")
    request.getfixturevalue("teacher")  # the hf teacher loads while these two start
    yield server.wait_ready(120)
    server.stop()


def backend(fake: FakeSGLang, tiny_model: Path, **kwargs: Any) -> SGLangBackend:
    return SGLangBackend(str(tiny_model), url=fake.url, api_key=KEY, **kwargs)


def post(url: str, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=30)


def scores(url: str, body: dict) -> ScoreResponse:
    resp = post(url, "/v1/score", body)
    assert resp.status_code == 200, resp.text
    return codec.decode(resp.content, ScoreResponse)


def test_model_info_matches_hf(sglang_teacher: ServerProcess, teacher: ServerProcess) -> None:
    ours, ref = (httpx.get(f"{s.url}/v1/model").json() for s in (sglang_teacher, teacher))
    assert ours["backend"] == "sglang" and ours["full_logprobs"] is False
    for key in ("vocab_size", "tokenizer_fingerprint"):
        assert ours[key] == ref[key]
    # SGLang's limit from /server_info, not the model's 512; its --dtype "auto" resolved as SGLang does
    # (a float32 checkpoint runs in float16), not shown as "auto".
    assert ref["max_context"] == 512 and ours["max_context"] == LIMIT
    assert ours["dtype"] == "float16"


def test_over_long_sequence_is_refused_naming_the_limit(sglang_teacher: ServerProcess, teacher: ServerProcess,
                                                         fake: FakeSGLang) -> None:
    seen = len(fake.requests())
    over = post(sglang_teacher.url, "/v1/score", {"sequences": [[1] * 10, [2] * (LIMIT + 1)], "top_k": 2})
    assert over.status_code == 422, over.text
    err = over.json()["error"]
    assert err["field"] == "sequences.1" and str(LIMIT) in err["message"]
    assert len(fake.requests()) == seen  # refused before SGLang saw it
    body = {"sequences": [[3] * LIMIT, [1, 2]], "top_k": 4}  # exactly at the limit: served, and right
    for a, b in zip(scores(sglang_teacher.url, body).results, scores(teacher.url, body).results, strict=True):
        assert np.array_equal(a.top_ids, b.top_ids) and np.abs(a.top_logprobs - b.top_logprobs).max() <= TOL
    sid = codec.decode(post(sglang_teacher.url, "/v1/sessions", {"sequences": [[1] * (LIMIT - 1)], "top_k": 2})
                       .content, SessionStep).session_id
    grow = post(sglang_teacher.url, f"/v1/sessions/{sid}/extend", {"tokens": [[4, 5]], "rows": [0]})
    assert grow.status_code == 422 and str(LIMIT) in grow.json()["error"]["message"]


@pytest.mark.parametrize(("start", "top_k"), [(0, 10), ([3, 0, 1, 0], 5), ([11, 2, 4, 0], 20)])
def test_scores_match_hf_at_every_position(sglang_teacher: ServerProcess, teacher: ServerProcess,
                                           start: int | list[int], top_k: int) -> None:
    body = {"sequences": SEQS, "start": start, "top_k": top_k, "token_ids": [3, 9, 40, 9]}
    ours, ref = scores(sglang_teacher.url, body), scores(teacher.url, body)
    worst = 0.0
    for seq, a, b in zip(SEQS, ours.results, ref.results, strict=True):
        assert a.start == b.start and a.top_ids.shape == (len(seq) - b.start, top_k)
        assert np.array_equal(a.top_ids, b.top_ids)
        for name in ("top_logprobs", "tail_logprob", "next_token_logprobs", "token_logprobs"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.shape == y.shape, name
            worst = max(worst, float(np.abs(x - y).max(initial=0.0)))
    assert worst <= TOL, f"max |Δ| between the sglang and hf backends = {worst}"


def test_top_k_zero_and_no_token_ids(sglang_teacher: ServerProcess, teacher: ServerProcess) -> None:
    body = {"sequences": SEQS, "top_k": 0, "token_ids": []}
    for a, b in zip(scores(sglang_teacher.url, body).results, scores(teacher.url, body).results, strict=True):
        assert a.top_ids.shape == b.top_ids.shape and a.token_logprobs.shape == b.token_logprobs.shape
        assert np.abs(a.next_token_logprobs - b.next_token_logprobs).max(initial=0.0) <= TOL
        assert np.abs(a.tail_logprob - b.tail_logprob).max() <= TOL  # log(1) = 0: the tail is everything


def _sessions(servers: tuple[ServerProcess, ...], prompts: list[list[int]]) -> list[str]:
    return [codec.decode(post(s.url, "/v1/sessions", {"sequences": prompts, "top_k": 5}).content, SessionStep)
            .session_id for s in servers]


def _extend_both(servers: tuple[ServerProcess, ...], ids: list[str], body: dict) -> float:
    """The same extend on the SGLang-backed and the HF-backed session: equal ids, rows and lengths;
    returns the largest logprob difference."""
    a, b = (codec.decode(post(s.url, f"/v1/sessions/{sid}/extend", body).content, SessionStep)
            for s, sid in zip(servers, ids, strict=True))
    entries = sum(map(len, body["tokens"])) if body.get("all_positions") else len(body["rows"])
    assert a.rows == b.rows == body["rows"] and a.lengths == b.lengths and len(a.top_ids) == len(b.top_ids) == entries
    assert np.array_equal(a.top_ids, b.top_ids)
    return max(float(np.abs(a.top_logprobs - b.top_logprobs).max()),
               float(np.abs(a.tail_logprob - b.tail_logprob).max()))


def test_sessions_match_hf(sglang_teacher: ServerProcess, teacher: ServerProcess, fake: FakeSGLang) -> None:
    servers, seen = (sglang_teacher, teacher), len(fake.requests())
    prompts = [[1, 5, 6], [2, 7, 8, 9]]
    ids = _sessions(servers, prompts)
    rng, worst = np.random.default_rng(3), 0.0
    for t in range(20):
        rows = [0, 1] if t < 12 else [1]  # row 0 finishes at step 12
        body = {"tokens": [[int(x) for x in rng.integers(4, 45, size=1 + t % 3)] for _ in rows], "rows": rows}
        worst = max(worst, _extend_both(servers, ids, body))
    assert worst <= TOL, f"max |Δ| between sglang and hf sessions = {worst}"
    extends = fake.requests()[seen + len(prompts):]
    assert len(extends) == 12 * 2 + 8
    # The radix-cache pattern: every extend reuses the whole prefix sent before, capped at s = L - 1.
    assert all(r["cached_tokens"] > 0 for r in extends)
    new_tokens = [r["prompt_tokens"] - r["cached_tokens"] for r in extends]
    assert max(new_tokens) <= 3 and all(r["logprob_start_len"] == r["prompt_tokens"] - 1 for r in extends)


def test_all_positions_sessions_match_hf(sglang_teacher: ServerProcess, teacher: ServerProcess,
                                        fake: FakeSGLang) -> None:
    """Streamed targets: the top-k after every new token, rows in order, each call reusing the prefix
    sent before (logprob_start_len = the old length, so SGLang's radix cache serves all of it)."""
    servers, seen = (sglang_teacher, teacher), len(fake.requests())
    prompts = [[1, 5, 6], [2, 7, 8, 9], [3]]
    ids = _sessions(servers, prompts)
    rng, worst = np.random.default_rng(4), 0.0
    for t in range(4):
        rows = [2, 0] if t < 3 else [1]
        body = {"tokens": [[int(x) for x in rng.integers(4, 45, size=1 + (t + r) % 4)] for r in rows], "rows": rows,
                "all_positions": True}
        worst = max(worst, _extend_both(servers, ids, body))
    assert worst <= TOL, f"max |Δ| between sglang and hf all-position extends = {worst}"
    extends = fake.requests()[seen + len(prompts):]
    assert all(r["prompt_tokens"] - r["cached_tokens"] <= 4 for r in extends)


def test_full_is_refused_naming_the_limit(sglang_teacher: ServerProcess) -> None:
    resp = post(sglang_teacher.url, "/v1/score", {"sequences": [[1, 2, 3]], "full": True})
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "unsupported" and err["field"] == "full" and "top-k" in err["message"]


def test_backend_sends_only_known_sampling_params(sglang_teacher: ServerProcess, fake: FakeSGLang) -> None:
    seen = len(fake.requests())
    scores(sglang_teacher.url, {"sequences": SEQS[:2], "top_k": 3})
    sent = fake.requests()[seen:]
    assert len(sent) == 2 and all(r["sampling_params"] == {"max_new_tokens": 1, "temperature": 1.0} for r in sent)
    bad = fake.generate({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1, "top_q": 0.5}})
    assert bad.status_code == 400 and "top_q" in bad.json()["error"]  # a schema error: {"error": "..."}


def test_compatible_requests_share_one_generate_call(fake: FakeSGLang, tiny_model: Path) -> None:
    via_http = backend(fake, tiny_model)
    calls = []
    generate = via_http.transport.generate
    via_http.transport.generate = lambda call: calls.append(call) or generate(call)  # type: ignore[method-assign]
    reqs = [ScoreRequest(sequences=SEQS[:2], top_k=4), ScoreRequest(sequences=SEQS[2:], start=[1, 0], top_k=4),
            ScoreRequest(sequences=SEQS[:1], top_k=4, token_ids=[3])]
    out = via_http.score(reqs)
    assert [len(c.input_ids) for c in calls] == [4, 1] and calls[0].logprob_start_len == [0, 0, 1, 0]
    assert [r.start for r in out[1]] == [1, 0] and out[2][0].token_logprobs.shape == (len(SEQS[0]), 1)
    via_http.close()


def test_api_key_is_sent_and_a_missing_one_named(fake: FakeSGLang, tiny_model: Path) -> None:
    denied = fake.generate({"input_ids": [1, 2]}, key=None)
    assert denied.status_code == 401 and denied.json() == {"error": "Unauthorized"}
    assert httpx.get(f"{fake.url}/health").status_code == 200  # SGLang lets health checks through
    with pytest.raises(SGLangError, match="401.*Unauthorized.*SGLANG_API_KEY"):
        SGLangBackend(str(tiny_model), url=fake.url)
    with_key = backend(fake, tiny_model)
    assert with_key.score([ScoreRequest(sequences=SEQS[:1], top_k=2)])[0][0].top_ids.shape == (len(SEQS[0]), 2)
    with_key.close()


def test_health_503_while_starting_is_waited_out(sglang_teacher: ServerProcess, fake: FakeSGLang) -> None:
    # The fake answered 503 to its first three /health calls; the sglang teacher got ready all the same.
    assert httpx.get(f"{fake.url}/fake/health_calls").json() > 3
    assert httpx.get(f"{sglang_teacher.url}/ready").status_code == 200


class StubEngine:
    """Stands in for `sglang.Engine` (which needs a GPU): async_generate forwards to the fake server.

    Like the real one (engine.py, 0.5.23) it adopts the running loop when built, its synchronous
    methods run `self.loop.run_until_complete` (so they fail when called while that loop runs), it
    raises ValueError for a refused request, and its tokenizer manager holds the limits."""

    def __init__(self, url: str, **kwargs: object) -> None:
        self.url, self.kwargs, self.loop = url, kwargs, asyncio.get_running_loop()
        self.tokenizer_manager = types.SimpleNamespace(max_req_input_len=30, context_len=CONTEXT)
        self.shut = False

    async def async_generate(self, **body: object) -> list:
        assert asyncio.get_running_loop() is self.loop, "every call must run on the loop the Engine was built on"
        async with httpx.AsyncClient() as client:
            resp = await client.post(f"{self.url}/generate", json=body, headers={"Authorization": f"Bearer {KEY}"})
        if resp.status_code == 400:
            raise ValueError(error_message(resp))
        return resp.json()

    def _sync(self) -> Any:
        async def work() -> None:
            return None

        coro = work()
        try:
            return self.loop.run_until_complete(coro)
        finally:
            coro.close()

    def get_server_info(self) -> dict:
        return self._sync()

    def open_session(self, capacity_of_str_len: int) -> str:
        return self._sync()

    def shutdown(self) -> None:
        self.shut = True


def test_engine_transport_bridges_to_its_own_loop(fake: FakeSGLang, tiny_model: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(Engine=lambda **kw: StubEngine(fake.url, **kw)))
    via_engine = SGLangBackend(str(tiny_model), engine=True, dtype="bfloat16")
    via_http = backend(fake, tiny_model)
    assert via_engine.info.max_context == 29 and via_engine.info.dtype == "bfloat16"  # from its tokenizer manager
    req = ScoreRequest(sequences=SEQS, start=[2, 1, 0, 0], top_k=6, token_ids=[5])
    for a, b in zip(via_engine.score([req])[0], via_http.score([req])[0], strict=True):
        assert np.array_equal(a.top_ids, b.top_ids) and np.array_equal(a.top_logprobs, b.top_logprobs)
        assert np.array_equal(a.token_logprobs, b.token_logprobs)
    engine = via_engine.transport.engine  # type: ignore[union-attr]
    assert engine.kwargs == {"model_path": str(tiny_model), "dtype": "bfloat16"}
    with pytest.raises(SGLangError, match="refused the call.*context length"):  # SGLang's ValueError, named
        via_engine.transport.generate(GenerateCall([[1] * CONTEXT], [0], 1))  # type: ignore[union-attr]
    for sync_method in (engine.get_server_info, lambda: engine.open_session(1024)):  # why only coroutines
        with pytest.raises(RuntimeError, match="already running"):
            sync_method()
    via_engine.close()
    via_http.close()
    assert engine.shut and not via_engine.transport._thread.is_alive()  # type: ignore[union-attr]


def meta_of(fake: FakeSGLang, body: dict) -> dict:
    resp = fake.generate({"return_logprob": True, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
                          **body})
    assert resp.status_code == 200, resp.text
    return resp.json()["meta_info"]


def test_fake_follows_the_documented_protocol(fake: FakeSGLang) -> None:
    ids = [1, 5, 6, 7, 8]
    for s in (0, 2, 4, 5):  # L - s entries; entry 0 null; s == L gives empty input lists
        meta = meta_of(fake, {"input_ids": ids, "logprob_start_len": s, "top_logprobs_num": 2})
        assert len(meta["input_token_logprobs"]) == len(ids) - s == len(meta["input_top_logprobs"])
        assert meta["prompt_tokens"] == s + len(meta["input_token_logprobs"])
        if s < len(ids):
            assert meta["input_token_logprobs"][0] == [None, ids[s], None] and meta["input_top_logprobs"][0] is None
        assert len(meta["output_top_logprobs"]) == 1 and len(meta["output_top_logprobs"][0]) == 2
        assert meta["cached_tokens"] <= s
    batch = fake.generate({"input_ids": [[1, 2, 3], [4]], "return_logprob": True, "logprob_start_len": [1, 0],
                           "sampling_params": {"max_new_tokens": 0, "temperature": 1.0}})
    assert [m["meta_info"]["prompt_tokens"] for m in batch.json()] == [3, 1]
    assert "input_top_logprobs" not in batch.json()[0]["meta_info"]  # only with top_logprobs_num > 0
    for body in ({"input_ids": ids, "logprob_start_len": 6}, {"input_ids": []}, {"input_ids": [[1], []]},
                 {"input_ids": ids, "token_ids_logprob": [48]}):
        resp = fake.generate({"sampling_params": {"max_new_tokens": 1}, "return_logprob": True, **body})
        assert resp.status_code == 400 and resp.json()["error"]["message"], body  # a refused request


def test_fake_enforces_sglang_limits_on_the_whole_batch(fake: FakeSGLang) -> None:
    ok = {"return_logprob": True, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0}}
    assert fake.generate({**ok, "input_ids": [[1] * LIMIT, [2]]}).status_code == 200
    info = httpx.get(f"{fake.url}/server_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["max_req_input_len"] == LIMIT + 1 and info["context_length"] == CONTEXT and info["dtype"] == "auto"
    for n, words in ((LIMIT + 1, "maximum allowed length"), (CONTEXT, "context length")):
        resp = fake.generate({**ok, "input_ids": [[1, 2], [1] * n, [3]]})  # one item fails all three
        assert resp.status_code == 400 and words in resp.json()["error"]["message"], resp.text


def test_fake_reports_the_last_id_as_zero(fake: FakeSGLang) -> None:
    ids = [LAST, 1, LAST, 46]
    meta = meta_of(fake, {"input_ids": ids, "logprob_start_len": 0, "token_ids_logprob": [LAST]})
    assert [e[1] for e in meta["input_token_logprobs"]] == [0, 1, 0, 46]
    exact = [row[0][0] for row in meta["input_token_ids_logprobs"][1:]]  # the logprobs of LAST, at p = 1, 2, 3
    assert meta["input_token_logprobs"][2][0] == pytest.approx(exact[1])  # the value is the true token's


# ---- the exact path: hidden states projected by the checkpoint's lm_head -------------------------
@pytest.fixture(scope="module")
def hidden_fake(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeSGLang]:
    server = FakeSGLang(tiny_model, tmp_path_factory.mktemp("logs") / "fake_sglang_hidden.log",
                        "--context-length", str(CONTEXT), "--enable-return-hidden-states",
                        "--chunked-prefill-size", "-1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def exact_teacher(hidden_fake: FakeSGLang, tiny_model: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tiny_model, "--backend", "sglang", "--sglang-url", hidden_fake.url, "--allow-full",
                           "--max-full-values", "100000", log=tmp_path_factory.mktemp("logs") / "exact.log")
    yield server.wait_ready(120)
    server.stop()


def test_hidden_states_give_exact_scores(exact_teacher: ServerProcess, teacher: ServerProcess) -> None:
    info = httpx.get(f"{exact_teacher.url}/v1/model").json()
    assert info["tail"] == "exact" and info["tail_bound"] == 0 and info["full_logprobs"] and info["sessions"]
    assert info["dtype"] == "float32"  # read off the hidden states' bits: the fake runs float32
    body = {"sequences": SEQS, "start": [3, 0, 1, 0], "top_k": 10, "token_ids": [1, 5, LAST], "full": True}
    ours, ref = scores(exact_teacher.url, body), scores(teacher.url, body)
    assert ours.tail == "exact" and ours.tail_bound == 0
    for a, b in zip(ours.results, ref.results, strict=True):
        assert np.array_equal(a.top_ids, b.top_ids)
        for name in ("top_logprobs", "tail_logprob", "next_token_logprobs", "token_logprobs", "logprobs"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, err_msg=name)


def test_hidden_state_sessions_match_hf(exact_teacher: ServerProcess, teacher: ServerProcess,
                                       hidden_fake: FakeSGLang) -> None:
    """Per-token extends and all-position extends: the radix cache still serves the prefix (only the new
    tokens' rows come back), and the projected top-k and tails equal the hf teacher's."""
    servers, seen = (exact_teacher, teacher), len(hidden_fake.requests())
    ids = _sessions(servers, [[1, 5, 6], [2, 7, 8, 9]])
    worst = 0.0
    for t, all_positions in enumerate([False, True, False, True]):
        body = {"tokens": [[4 + t, 9], [30 + t]], "rows": [0, 1], "all_positions": all_positions}
        worst = max(worst, _extend_both(servers, ids, body))
    assert worst <= 1e-5, f"max |Δ| between hidden-state and hf sessions = {worst}"
    extends = hidden_fake.requests()[seen + 2:]
    assert extends and all(r["prompt_tokens"] - r["cached_tokens"] <= 2 for r in extends)


def test_hidden_states_need_the_flag_and_no_chunked_prefill() -> None:
    from teacher_server.backends.sglang_transport import hidden_states_served

    assert hidden_states_served({"enable_return_hidden_states": True, "chunked_prefill_size": -1})
    assert hidden_states_served({"return_hidden_states_mode": "full", "chunked_prefill_size": None})
    assert not hidden_states_served({"enable_return_hidden_states": False, "chunked_prefill_size": -1})
    assert not hidden_states_served({"enable_return_hidden_states": True, "chunked_prefill_size": 8192})


def test_top_k_path_says_its_tail_is_bounded(sglang_teacher: ServerProcess) -> None:
    from teacher_server.backends.base import TOPK_MASS_BOUND

    info = httpx.get(f"{sglang_teacher.url}/v1/model").json()
    assert info["tail"] == "bounded" and info["tail_bound"] == TOPK_MASS_BOUND
    assert scores(sglang_teacher.url, {"sequences": SEQS[:1]}).tail == "bounded"


def test_compat_route_over_sglang_answers_as_over_hf(sglang_teacher: ServerProcess, teacher: ServerProcess) -> None:
    """/v1/completions on the sglang backend: the hf backend's answer on the same model (docs/interop.md)."""
    from fake_vllm_process import assert_same_answers

    body = {"prompt": [[1, 5, 6, 7, 8, 9], [2, 30, 47, 32]], "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": 3}
    ours, ref = (httpx.post(f"{s.url}/v1/completions", json=body, timeout=120) for s in (sglang_teacher, teacher))
    assert ours.status_code == 200, ours.text
    assert_same_answers(ours.json(), ref.json(), 3, atol=TOL)
