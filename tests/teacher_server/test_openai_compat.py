"""The vLLM-compatible route (/v1/completions with prompt_logprobs, /v1/models) against /v1/score, against
the protocol-faithful fake vLLM on the same model, and against a slow obvious reference; its refusals,
and the two ways a client without a key of its own gets in (a key as HTTP Basic, or keyless loopback);
then TRL's own client code, unchanged, against our route and against the fake vLLM.

Processes on 127.0.0.1: the session's `teacher` (hf, tiny model, no keys), the fake vLLM on the same
model (`tests/fake_vllm.py`, --max-logprobs -1), and `keyed`: a teacher with API keys and
--compat-keyless-loopback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import ServerProcess, f32_diff
from fake_vllm_process import FakeVLLMProcess, assert_same_answers
from shared.protocol import ScoreResponse, SequenceScores
from teacher_server.app import create_app
from teacher_server.compat_routes import _param
from teacher_server.openai_compat import (
    CompatError,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    check_request,
    prompt_logprobs,
    sample_token,
)
from teacher_server.settings import ServerSettings

SEQS = [[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [1, 13, 14], [2, 30, 47, 32, 47], [7]]
KEYS = "alice:alice-secret-1\nbob:bob-secret-22\n"


def complete(url: str, body: dict, **kw: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60, **kw)


def body(prompt: object, k: int, **extra: object) -> dict:
    return {"prompt": prompt, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k, **extra}


# ---- the pure conversion against a slow obvious reference ------------------------------------------------


def reference_entries(seq: list[int], lp_L_V: np.ndarray, k: int) -> list[dict | None]:
    """vLLM's rule read off the full distribution: {actual: its rank by count, then top-k with ranks 1..k}."""
    out: list[dict | None] = [None]
    for i in range(1, len(seq)):
        row, actual = lp_L_V[i - 1], seq[i]
        entry = {str(actual): (float(row[actual]), int((row >= row[actual]).sum()))}
        for r, t in enumerate(np.argsort(-row, kind="stable")[:k]):
            entry[str(int(t))] = (float(row[t]), r + 1)
        out.append(entry)
    return out


def scores_of(seq: list[int], lp_L_V: np.ndarray, k: int) -> SequenceScores:
    """What /v1/score returns for `seq` from 0 with top_k = k (as the backends build it)."""
    top = np.argsort(-lp_L_V, axis=1, kind="stable")[:, :k]
    return SequenceScores(start=0, top_ids=top.astype(np.int32), top_logprobs=np.take_along_axis(lp_L_V, top, 1),
                          tail_logprob=np.zeros(len(seq), np.float32),
                          next_token_logprobs=lp_L_V[np.arange(len(seq) - 1), seq[1:]])


@pytest.mark.parametrize("k", [1, 3, 10])
def test_entries_equal_vllms_rule_but_the_rank_outside_the_top_k(k: int) -> None:
    rng = np.random.default_rng(k)
    for length in (1, 2, 17):
        seq = rng.integers(0, 10, length).tolist()
        logits = rng.normal(0, 3, (length, 10))
        lp_L_V = (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32)
        got = prompt_logprobs(seq, scores_of(seq, lp_L_V, k), k, lambda t: f"<{t}>")
        want = reference_entries(seq, lp_L_V, k)
        assert len(got) == length and got[0] is None
        for g, w in zip(got[1:], want[1:], strict=True):
            assert list(g) == list(w)  # same keys in the same order: the actual token first, merged when inside
            for key, (lp, rank) in w.items():
                assert g[key]["logprob"] == lp and g[key]["decoded_token"] == f"<{key}>"
                assert g[key]["rank"] == (rank if rank <= k else k + 1)  # outside: the least it can be


def test_minus_infinity_is_written_as_vllm_does() -> None:
    lp = np.array([[0.0, -np.inf, -np.inf]], np.float32)
    got = prompt_logprobs([0, 2], scores_of([0, 2], np.vstack([lp, lp]), 1), 1, str)
    assert got[1] == {"2": {"logprob": -9999.0, "rank": 2, "decoded_token": "2"},
                      "0": {"logprob": 0.0, "rank": 1, "decoded_token": "0"}}


def test_sampled_token_follows_the_temperature() -> None:
    ids, lps = np.array([4, 9, 2]), np.log(np.array([0.6, 0.3, 0.1], np.float32))
    assert sample_token(ids, lps, 0.0, np.random.default_rng(0)) == 4
    rng = np.random.default_rng(0)
    for temperature in (1.0, 2.0):
        draws = np.array([sample_token(ids, lps, temperature, rng) for _ in range(4000)])
        p = np.array([0.6, 0.3, 0.1]) ** (1 / temperature)
        freq = np.array([(draws == t).mean() for t in ids])
        assert np.abs(freq - p / p.sum()).max() < 0.03, (temperature, freq)


def test_sampling_survives_extreme_temperatures_and_seeds() -> None:
    ids, lps = np.array([4, 9]), np.array([-0.1, -2.4], np.float32)
    assert sample_token(ids, lps, 1e-300, np.random.default_rng(0)) == 4  # underflow: greedy, never NaN
    assert {sample_token(ids, lps, 1e300, np.random.default_rng(s)) for s in range(40)} == {4, 9}  # uniform
    for seed in (-(2**63), 2**63 - 1, None):
        CompletionRequest.model_validate({**body([1, 2], 1), "seed": seed})


@pytest.mark.parametrize(("fields", "param"), [
    ({"prompt": "2+2="}, "prompt"), ({"prompt": [[1, 2], []]}, "prompt"), ({"prompt": [1, -2]}, "prompt"),
    ({"max_tokens": 16}, "max_tokens"), ({"max_tokens": None}, "max_tokens"), ({"n": 2}, "n"),
    ({"stream": True}, "stream"), ({"echo": True}, "echo"), ({"logprobs": 2}, "logprobs"),
    ({"prompt_logprobs": None}, "prompt_logprobs"), ({"prompt_logprobs": -2}, "prompt_logprobs"),
    ({"top_p": 0.9}, "top_p"), ({"return_token_ids": True}, "return_token_ids"),
])
def test_requests_outside_the_subset_name_the_field(fields: dict, param: str) -> None:
    with pytest.raises(CompatError) as err:
        check_request(CompletionRequest.model_validate({**body([1, 2], 2), **fields}))
    assert err.value.param == param and err.value.status == 400


def test_field_names_are_the_clients() -> None:
    assert _param("sequences.0.3", flat=True) == "prompt.3" and _param("sequences.1.3", flat=False) == "prompt.1.3"
    assert _param("sequences", flat=True) == "prompt" and _param("top_k", flat=False) == "prompt_logprobs"


# ---- over HTTP: the route against /v1/score and against the fake vLLM ------------------------------------


@pytest.fixture(scope="module")
def engines(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeVLLMProcess,
                                                                                        ServerProcess]]:
    """The fake vLLM and `keyed` (a teacher with API keys and --compat-keyless-loopback), loading together."""
    logs = tmp_path_factory.mktemp("compat")
    (keys := logs / "keys").write_text(KEYS)
    fake = FakeVLLMProcess(tiny_model, logs / "fake_vllm.log", "--max-logprobs", "-1",
                           "--served-model-name", str(tiny_model))
    keyed = ServerProcess(tiny_model, "--api-keys-file", str(keys), "--compat-keyless-loopback",
                          log=logs / "teacher.log")
    yield fake.wait_up(), keyed.wait_ready()
    keyed.stop()
    fake.stop()


@pytest.fixture(scope="module")
def fake_vllm(engines: tuple[FakeVLLMProcess, ServerProcess]) -> FakeVLLMProcess:
    return engines[0]


@pytest.fixture(scope="module")
def keyed(engines: tuple[FakeVLLMProcess, ServerProcess]) -> ServerProcess:
    return engines[1]


def test_completions_equal_score_top_k(teacher: ServerProcess) -> None:
    k = 5
    resp = complete(teacher.url, body(SEQS, k), headers={"x-client-id": "exp-compat"})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    CompletionResponse.model_validate(answer)
    scored = ScoreResponse.model_validate(httpx.post(f"{teacher.url}/v1/score", json={
        "sequences": SEQS, "top_k": k}, timeout=60).json())
    assert [c["index"] for c in answer["choices"]] == list(range(len(SEQS)))
    assert answer["usage"] == {"prompt_tokens": 21, "total_tokens": 25, "completion_tokens": 4,
                               "prompt_tokens_details": None, "completion_tokens_details": None}
    for seq, choice, want in zip(SEQS, answer["choices"], scored.results, strict=True):
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(seq) and entries[0] is None
        for i in range(1, len(seq)):
            ranked = sorted(entries[i].items(), key=lambda kv: kv[1]["rank"])[:k]
            assert [int(t) for t, _ in ranked] == want.top_ids[i - 1].tolist()
            diff, tol = f32_diff([e["logprob"] for _, e in ranked], want.top_logprobs[i - 1])
            assert diff <= tol
            diff, tol = f32_diff(entries[i][str(seq[i])]["logprob"], want.next_token_logprobs[i - 1])
            assert diff <= tol
    one = complete(teacher.url, body(SEQS[0], k)).json()  # the flat form is prompt 0 of a batch
    for a, b in zip(one["choices"][0]["prompt_logprobs"][1:], answer["choices"][0]["prompt_logprobs"][1:],
                    strict=True):
        assert [(t, e["rank"]) for t, e in a.items()] == [(t, e["rank"]) for t, e in b.items()]
        assert max(abs(a[t]["logprob"] - b[t]["logprob"]) for t in a) <= 1e-5
    metrics = httpx.get(f"{teacher.url}/metrics").text
    assert 'trb_teacher_tokens_scored_total{client="exp-compat"} 21.0' in metrics
    assert 'route="/v1/completions"' in metrics and 'trb_teacher_model_seconds_total{client="exp-compat"}' in metrics


@pytest.mark.parametrize("k", [0, 3])
def test_answers_equal_vllms_shape_on_the_same_model(teacher: ServerProcess, fake_vllm: FakeVLLMProcess, k: int) -> None:
    request = body(SEQS, k, temperature=0.0)
    ours, theirs = complete(teacher.url, request).json(), fake_vllm.complete(request).json()
    assert set(ours) >= set(theirs) and ours["model"] == theirs["model"] and ours["usage"]["prompt_tokens"] == 21
    assert_same_answers(ours, theirs, k)
    listed = httpx.get(f"{teacher.url}/v1/models").json()
    ModelList.model_validate(listed)
    assert listed["data"][0]["id"] == fake_vllm.models()["data"][0]["id"]
    assert listed["data"][0]["max_model_len"] == 513  # max_context 512 + the sampled token


@pytest.mark.parametrize(("fields", "status", "param"), [
    ({"prompt": [1, 99]}, 400, "prompt.1"), ({"prompt": [[1, 2], [3, 99]]}, 400, "prompt.1.1"),
    ({"prompt": list(range(1, 40)) * 14}, 400, "prompt"), ({"prompt_logprobs": 50}, 400, "prompt_logprobs"),
    ({"model": "gpt-4"}, 404, "model"), ({"temperature": -1}, 400, "temperature"),
    ({"max_tokens": 16}, 400, "max_tokens"), ({"seed": "x"}, 400, "seed"), ({"top_k": 5}, 400, "top_k"),
])
def test_refusals_are_4xx_in_vllms_error_shape(teacher: ServerProcess, fields: dict, status: int, param: str) -> None:
    resp = complete(teacher.url, {**body([1, 2], 2), **fields})
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["param"] == param
    assert param.split(".")[0] in err["message"]
    bad_json = httpx.post(f"{teacher.url}/v1/completions", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "BadRequestError"


# ---- keys: the default guard, a key as HTTP Basic, keyless loopback by flag -------------------------------


def test_keys_as_bearer_basic_or_keyless_loopback(keyed: ServerProcess) -> None:
    url, port = keyed.url, keyed.port
    assert httpx.post(f"{url}/v1/score", json={"sequences": [[1, 2]]}).status_code == 401  # the default holds
    assert httpx.get(f"{url}/v1/model").status_code == 401 and httpx.get(f"{url}/metrics").status_code == 401
    assert complete(url, body([1, 2, 3], 2)).status_code == 200  # keyless: loopback, compat route, flag on
    assert httpx.get(f"{url}/v1/models").status_code == 200
    assert complete(url, body([1, 2, 3], 2), headers={"authorization": "Bearer alice-secret-1"}).status_code == 200
    basic = complete(f"http://trl:bob-secret-22@127.0.0.1:{port}", body([1, 2, 3, 4], 2))  # a URL's user:password
    assert basic.status_code == 200
    for headers in ({"authorization": "Bearer wrong-secret"}, {"authorization": "Basic bm8tY29sb24="}):
        denied = complete(url, body([1, 2], 2), headers=headers)  # a key presented must be valid
        assert denied.status_code == 401 and denied.json()["error"]["code"] == 401
    assert httpx.post(f"http://x:alice-secret-1@127.0.0.1:{port}/v1/score",
                      json={"sequences": [[1, 2]]}).status_code == 200  # Basic works on every route
    metrics = httpx.get(f"{url}/metrics", headers={"authorization": "Bearer alice-secret-1"}).text
    assert 'trb_teacher_tokens_scored_total{client="bob"} 4.0' in metrics
    assert 'trb_teacher_tokens_scored_total{client="anonymous"} 3.0' in metrics and "secret" not in metrics


@pytest.mark.parametrize(("keyless", "peer", "status"), [
    (False, "127.0.0.1", 401), (True, "127.0.0.1", 503), (True, "10.1.2.3", 401), (True, "::1", 503),
])
async def test_keyless_is_for_loopback_peers_and_only_by_flag(keyless: bool, peer: str, status: int) -> None:
    """The gate alone, in process (no lifespan: no model, so a request let through answers 503 not ready)."""
    cfg = ServerSettings(model="unused", api_keys="alice:alice-secret-1", compat_keyless_loopback=keyless)
    transport = httpx.ASGITransport(app=create_app(cfg), client=(peer, 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://teacher") as client:
        resp = await client.post("/v1/completions", json=body([1, 2], 2))
        assert resp.status_code == status and resp.json()["error"]["code"] == status
        assert (await client.post("/v1/score", json={"sequences": [[1]]})).status_code == 401


def test_the_openapi_schema_lists_the_compat_routes(teacher: ServerProcess) -> None:
    paths = httpx.get(f"{teacher.url}/openapi.json").json()["paths"]
    assert "/v1/completions" in paths and "/v1/models" in paths
    assert json.dumps(paths["/v1/completions"]).count("CompletionResponse") >= 1


# ---- TRL's clients, unchanged: VLLMClient.get_sequence_logprobs and AsyncDistillationTrainer's scoring ------

PROMPT_LENGTHS = [4, 1, 2, 1]  # completion = seq[p:]; the last sequence is all prompt but one token


def trl_vllm_client(monkeypatch: pytest.MonkeyPatch, base_url: str) -> object:
    vc = pytest.importorskip("trl.generation.vllm_client")
    # VLLMClient refuses to start unless the vllm package is installed, though the HTTP calls it makes
    # here need nothing of it: only that gate is answered, every line that sends and parses runs as shipped.
    monkeypatch.setattr(vc, "is_vllm_available", lambda *a, **k: True)
    return vc.VLLMClient(base_url=base_url)


def test_trl_vllm_client_reads_the_same_from_us_and_from_vllm(
        teacher: ServerProcess, keyed: ServerProcess, fake_vllm: FakeVLLMProcess,
        monkeypatch: pytest.MonkeyPatch) -> None:
    k = 4
    got = {name: trl_vllm_client(monkeypatch, url).get_sequence_logprobs(SEQS, PROMPT_LENGTHS, top_logprobs=k)
           for name, url in [("vllm", fake_vllm.wait_up().url), ("ours", teacher.url),
                             ("ours-basic-key", f"http://trl:bob-secret-22@127.0.0.1:{keyed.port}"),
                             ("ours-keyless", keyed.url)]}
    want = got.pop("vllm")
    for name, result in got.items():
        assert result["logprob_token_ids"] == want["logprob_token_ids"], name
        assert result["actual_token_ids"] == want["actual_token_ids"], name
        for key in ("logprobs", "actual_logprobs"):
            for a, b in zip(result[key], want[key], strict=True):
                assert np.allclose(np.ravel(a), np.ravel(b), atol=1e-5), (name, key)
    scored = ScoreResponse.model_validate(httpx.post(f"{teacher.url}/v1/score", json={
        "sequences": SEQS, "top_k": k}, timeout=60).json())
    for seq, p, ids, lps, actual, res in zip(SEQS, PROMPT_LENGTHS, got["ours"]["logprob_token_ids"],
                                              got["ours"]["logprobs"], got["ours"]["actual_logprobs"],
                                              scored.results, strict=True):
        rows = slice(p - 1, len(seq) - 1)  # TRL's position q (q >= p) is /v1/score's row q - 1
        assert ids == res.top_ids[rows].tolist()
        assert np.allclose(lps, res.top_logprobs[rows], atol=1e-5) if ids else not lps
        assert np.allclose(np.ravel(actual), res.next_token_logprobs[rows], atol=1e-5) if ids else not actual


def test_trl_async_distillation_scoring_with_a_teacher_per_row(
        keyed: ServerProcess, fake_vllm: FakeVLLMProcess) -> None:
    aiohttp = pytest.importorskip("aiohttp")
    worker = pytest.importorskip("trl.experimental.async_distillation.async_rollout_worker")
    from accelerate import PartialState

    PartialState()  # the worker logs through accelerate's logger, which the trainer's process has set up
    teachers = {"alice": f"http://trl:alice-secret-1@127.0.0.1:{keyed.port}", "open": keyed.url,
                "vllm": fake_vllm.wait_up().url}
    loop = worker._AsyncRolloutLoop(
        model_name="student", dataset=[], processing_class=None, eos_token_ids=[], rollout_buffer=None,
        model_version_value=None, heartbeat_value=None, failed_event=None, exception_info_queue=None,
        metrics_queue=None, teacher_server_urls=teachers, teacher_top_k=4)

    async def score_every_row() -> dict[str, list]:
        out: dict[str, list] = {}
        async with aiohttp.ClientSession() as session:
            loop.session = session
            await loop._resolve_teacher_model_names()
            for row_teacher in teachers:  # MOPD: each row names its teacher, routed by TRL's own code
                teacher_id, url = loop._resolve_teacher_server_url({"teacher_id": row_teacher})
                out[teacher_id] = [await loop._score_with_teacher(seq[:p], seq[p:], url, loop.teacher_model_names[
                    teacher_id]) for seq, p in zip(SEQS, PROMPT_LENGTHS, strict=True)]
        return out

    before = tokens_scored(keyed, "alice")
    try:
        got = loop._loop.run_until_complete(score_every_row())
    finally:
        loop._loop.close()
    want = got.pop("vllm")
    for name, rows in got.items():
        for (ids, lps), (want_ids, want_lps) in zip(rows, want, strict=True):
            assert ids == want_ids, name  # the actual token kept at its place after the top-k
            assert all(len(a) == len(b) and np.allclose(a, b, atol=1e-5) for a, b in zip(lps, want_lps, strict=True))
    assert tokens_scored(keyed, "alice") - before == 21  # one key per experiment: its own standing and figures


def tokens_scored(server: ServerProcess, client: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers={"authorization": "Bearer alice-secret-1"}).text
    line = f'trb_teacher_tokens_scored_total{{client="{client}"}} '
    return sum(float(x.removeprefix(line)) for x in text.splitlines() if x.startswith(line))
