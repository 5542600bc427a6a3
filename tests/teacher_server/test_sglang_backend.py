"""The SGLang backend against the HF backend, over HTTP, with a protocol-faithful fake SGLang server.

Three real processes on 127.0.0.1: the fake SGLang (tests/fake_sglang.py, the tiny model behind SGLang's
native /generate), a `trb-teacher serve --backend sglang` pointed at it, and the `teacher` fixture
(backend hf, same model). Both teachers must give the same answers at every position.
The fake runs with a default temperature of 0.7 (as a model's generation_config may set) so a
backend that forgot to send temperature 1.0 would get a different last position.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from conftest import ServerProcess, free_port
from shared import codec
from shared.protocol import ScoreRequest, ScoreResponse, SessionStep
from teacher_server.backends.sglang import TAIL_FLOOR, SGLangBackend, chunks, tail_from_top
from teacher_server.settings import ServerSettings

FAKE = Path(__file__).resolve().parents[1] / "fake_sglang.py"
SEQS = [[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [1, 13, 14], [2, 30, 31, 32, 33], [7]]
TOL = 1e-4  # same weights, both float32: they agree to ~1e-6 (real SGLang in bf16 would need far more)


class FakeSGLang:
    """`python tests/fake_sglang.py` as a child process with one torch thread."""

    def __init__(self, model: Path, log: Path) -> None:
        self.url = f"http://127.0.0.1:{(port := free_port())}"
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), "--model", str(model), "--port", str(port), "--default-temperature", "0.7"],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def requests(self) -> list[dict]:
        return httpx.get(f"{self.url}/fake/requests").json()

    def generate(self, body: dict) -> httpx.Response:
        return httpx.post(f"{self.url}/generate", json=body, timeout=30)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="module")
def fake(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeSGLang]:
    server = FakeSGLang(tiny_model, tmp_path_factory.mktemp("logs") / "fake_sglang.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sglang_teacher(fake: FakeSGLang, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory,
                   request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """Started right after the fake: it waits for the fake's /health itself, so the two load together."""
    log = tmp_path_factory.mktemp("logs") / "sglang_teacher.log"
    server = ServerProcess(tiny_model, "--backend", "sglang", "--sglang-url", fake.url, log=log)
    request.getfixturevalue("teacher")  # the hf teacher loads while these two start
    yield server.wait_ready(120)
    server.stop()


def post(url: str, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=30)


def scores(url: str, body: dict) -> ScoreResponse:
    resp = post(url, "/v1/score", body)
    assert resp.status_code == 200, resp.text
    return codec.decode(resp.content, ScoreResponse)


def test_model_info_matches_hf(sglang_teacher: ServerProcess, teacher: ServerProcess) -> None:
    ours, ref = (httpx.get(f"{s.url}/v1/model").json() for s in (sglang_teacher, teacher))
    assert ours["backend"] == "sglang" and ours["full_logprobs"] is False
    for key in ("vocab_size", "tokenizer_fingerprint", "max_context"):
        assert ours[key] == ref[key]


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


def test_sessions_match_hf(sglang_teacher: ServerProcess, teacher: ServerProcess, fake: FakeSGLang) -> None:
    prompts = [[1, 5, 6], [2, 7, 8, 9]]
    ids, seen = [], len(fake.requests())
    for server in (sglang_teacher, teacher):
        resp = post(server.url, "/v1/sessions", {"sequences": prompts, "top_k": 5})
        ids.append(codec.decode(resp.content, SessionStep).session_id)
    rng, worst = np.random.default_rng(3), 0.0
    for t in range(20):
        rows = [0, 1] if t < 12 else [1]  # row 0 finishes at step 12
        body = {"tokens": [[int(x) for x in rng.integers(4, 45, size=1 + t % 3)] for _ in rows], "rows": rows}
        a, b = (codec.decode(post(s.url, f"/v1/sessions/{sid}/extend", body).content, SessionStep)
                for s, sid in zip((sglang_teacher, teacher), ids, strict=True))
        assert a.rows == b.rows == rows and a.lengths == b.lengths
        assert np.array_equal(a.top_ids, b.top_ids)
        worst = max(worst, float(np.abs(a.top_logprobs - b.top_logprobs).max()),
                    float(np.abs(a.tail_logprob - b.tail_logprob).max()))
    assert worst <= TOL, f"max |Δ| between sglang and hf sessions = {worst}"
    extends = fake.requests()[seen + len(prompts):]
    assert len(extends) == 12 * 2 + 8
    # The radix-cache pattern: every extend reuses the whole prefix sent before, capped at s = L - 1.
    assert all(r["cached_tokens"] > 0 for r in extends)
    new_tokens = [r["prompt_tokens"] - r["cached_tokens"] for r in extends]
    assert max(new_tokens) <= 3 and all(r["logprob_start_len"] == r["prompt_tokens"] - 1 for r in extends)


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
    assert bad.status_code == 400 and "top_q" in bad.json()["error"]


def test_compatible_requests_share_one_generate_call(fake: FakeSGLang, tiny_model: Path) -> None:
    backend = SGLangBackend(str(tiny_model), url=fake.url)
    calls = []
    generate = backend.transport.generate
    backend.transport.generate = lambda call: calls.append(call) or generate(call)  # type: ignore[method-assign]
    reqs = [ScoreRequest(sequences=SEQS[:2], top_k=4), ScoreRequest(sequences=SEQS[2:], start=[1, 0], top_k=4),
            ScoreRequest(sequences=SEQS[:1], top_k=4, token_ids=[3])]
    out = backend.score(reqs)
    assert [len(c.input_ids) for c in calls] == [4, 1] and calls[0].logprob_start_len == [0, 0, 1, 0]
    assert [r.start for r in out[1]] == [1, 0] and out[2][0].token_logprobs.shape == (len(SEQS[0]), 1)
    backend.close()


class StubEngine:
    """Stands in for `sglang.Engine` (which needs a GPU): async_generate forwards to the fake server."""

    def __init__(self, url: str, **kwargs: object) -> None:
        self.url, self.kwargs, self.loop = url, kwargs, asyncio.get_running_loop()
        self.shut = False

    async def async_generate(self, **body: object) -> list:
        assert asyncio.get_running_loop() is self.loop, "every call must run on the loop the Engine was built on"
        async with httpx.AsyncClient() as client:
            return (await client.post(f"{self.url}/generate", json=body)).json()

    def shutdown(self) -> None:
        self.shut = True


def test_engine_transport_bridges_to_its_own_loop(fake: FakeSGLang, tiny_model: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(Engine=lambda **kw: StubEngine(fake.url, **kw)))
    via_engine = SGLangBackend(str(tiny_model), engine=True, dtype="bfloat16")
    via_http = SGLangBackend(str(tiny_model), url=fake.url)
    req = ScoreRequest(sequences=SEQS, start=[2, 1, 0, 0], top_k=6, token_ids=[5])
    for a, b in zip(via_engine.score([req])[0], via_http.score([req])[0], strict=True):
        assert np.array_equal(a.top_ids, b.top_ids) and np.array_equal(a.top_logprobs, b.top_logprobs)
        assert np.array_equal(a.token_logprobs, b.token_logprobs)
    engine = via_engine.transport.engine  # type: ignore[union-attr]
    assert engine.kwargs == {"model_path": str(tiny_model), "dtype": "bfloat16"}
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
        assert resp.status_code == 400 and resp.json()["error"], body


def test_tail_from_top_matches_exact_tail() -> None:
    logits = np.random.default_rng(0).normal(size=(6, 50)) * 2
    lp = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)).astype(np.float32)
    order = np.argsort(-lp, axis=1)
    for k in (0, 1, 5, 30):
        top = np.take_along_axis(lp, order[:, :k], 1)
        exact = np.logaddexp.reduce(np.take_along_axis(lp, order[:, k:], 1).astype(np.float64), axis=1)
        assert np.abs(tail_from_top(top) - exact).max() <= 1e-4, k
    everything = tail_from_top(lp)  # all mass in the top-k: float32 rounding noise, clamped, never nan
    assert np.all(np.isfinite(everything)) and np.all(np.exp(everything) <= 1e-5)
    assert tail_from_top(np.zeros((1, 1), np.float32))[0] == np.float32(np.log(TAIL_FLOOR))  # mass 1 exactly


def test_chunks_cover_in_order_within_budget() -> None:
    costs = [3, 5, 2, 9, 1, 1, 4]
    parts = list(chunks(costs, 6))
    assert [i for part in parts for i in range(len(costs))[part]] == list(range(len(costs)))
    assert all(sum(costs[p]) <= 6 or len(costs[p]) == 1 for p in parts) and list(chunks([], 6)) == []


def test_settings_need_exactly_one_sglang_target() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        ServerSettings(model="m", backend="sglang")
    with pytest.raises(ValidationError, match="exactly one"):
        ServerSettings(model="m", backend="sglang", sglang_url="http://127.0.0.1:30000", sglang_engine=True)
    assert ServerSettings(model="m", backend="sglang", sglang_url="http://127.0.0.1:30000").backend == "sglang"
