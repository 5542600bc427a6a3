"""The HTTP API of a real `trb-teacher serve` process on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ServerProcess, f32_diff
from shared import codec
from shared.protocol import ScoreResponse, SessionStep

SEQS = [[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [1, 13, 14], [2, 30, 31, 32, 33]]


def post(url: str, path: str, body: object, **kw: object) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=30, **kw)


def test_health_ready_and_model_info(teacher: ServerProcess) -> None:
    assert httpx.get(f"{teacher.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{teacher.url}/ready").status_code == 200
    info = httpx.get(f"{teacher.url}/v1/model").json()
    assert info["backend"] == "hf" and info["vocab_size"] == 48 and info["full_logprobs"] is True
    assert len(info["tokenizer_fingerprint"]) == 16 and info["dtype"] == "float32"


def test_score_equals_direct_forward_every_position(teacher: ServerProcess, tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    resp = post(teacher.url, "/v1/score", {"sequences": SEQS, "top_k": 10, "full": True})
    assert resp.status_code == 200, resp.text
    body = codec.decode(resp.content, ScoreResponse)
    for seq, res in zip(SEQS, body.results, strict=True):
        with torch.no_grad():
            ref = model(torch.tensor([seq])).logits[0].float().log_softmax(-1).numpy()
        assert res.logprobs.shape == (len(seq), 48)  # positions 0..L-1, the last after the whole sequence
        diff, tol = f32_diff(res.logprobs, ref)  # the server runs 1 torch thread, this process any number
        assert diff <= tol, f"max |Δ logprob| = {diff} > {tol}"
        assert np.array_equal(res.top_ids, np.argsort(-ref, -1, kind="stable")[:, :10])


def test_json_and_binary_agree_bit_for_bit(teacher: ServerProcess) -> None:
    req = {"sequences": SEQS, "start": [3, 0, 1], "top_k": 20, "token_ids": [4, 5]}
    as_json = codec.decode(post(teacher.url, "/v1/score", req).content, ScoreResponse)
    raw = post(teacher.url, "/v1/score", req, headers={"accept": codec.MSGPACK})
    assert raw.headers["content-type"] == codec.MSGPACK
    as_pack = codec.decode(raw.content, ScoreResponse, codec.MSGPACK)
    for a, b in zip(as_json.results, as_pack.results, strict=True):
        for name in ("top_ids", "top_logprobs", "tail_logprob", "next_token_logprobs", "token_logprobs"):
            x, y = getattr(a, name), getattr(b, name)
            assert np.array_equal(x.astype(y.dtype), y) and x.astype(y.dtype).tobytes() == y.tobytes()


def test_msgpack_request_and_float16(teacher: ServerProcess) -> None:
    body = msgpack.packb({"sequences": SEQS, "top_k": 4, "logprob_dtype": "float16"})
    resp = httpx.post(f"{teacher.url}/v1/score", content=body,
                      headers={"content-type": codec.MSGPACK, "accept": codec.MSGPACK})
    out = codec.decode(resp.content, ScoreResponse, codec.MSGPACK)
    assert out.results[0].top_logprobs.dtype == np.float16 and out.results[0].top_ids.dtype == np.int32


def test_server_timing_reports_queue_and_model_time(teacher: ServerProcess) -> None:
    resp = post(teacher.url, "/v1/score", {"sequences": SEQS, "top_k": 4})
    parts = dict(p.strip().split(";dur=") for p in resp.headers["server-timing"].split(","))
    assert set(parts) == {"queue", "model"} and float(parts["queue"]) >= 0 and float(parts["model"]) > 0


def test_sessions_over_http_match_scoring(teacher: ServerProcess) -> None:
    prompts = [[1, 5, 6], [2, 7, 8, 9]]
    created = codec.decode(post(teacher.url, "/v1/sessions", {"sequences": prompts, "top_k": 5}).content,
                           SessionStep)
    sid, prefixes = created.session_id, [list(p) for p in prompts]
    rng = np.random.default_rng(1)
    for t in range(64):
        rows = [0, 1] if t < 40 else [1]  # row 0 finishes at step 40
        tokens = [[int(rng.integers(4, 45))] for _ in rows]
        step = codec.decode(post(teacher.url, f"/v1/sessions/{sid}/extend",
                                 {"tokens": tokens, "rows": rows}).content, SessionStep)
        for r, tok in zip(rows, tokens, strict=True):
            prefixes[r] += tok
        assert step.rows == rows and step.lengths == [len(prefixes[r]) for r in rows]
        ref = codec.decode(post(teacher.url, "/v1/score", {
            "sequences": [prefixes[r] for r in rows], "start": [len(prefixes[r]) - 1 for r in rows],
            "top_k": 5}).content, ScoreResponse)
        for i, res in enumerate(ref.results):
            assert np.array_equal(res.top_ids[0], step.top_ids[i])
            diff, tol = f32_diff(step.top_logprobs[i], res.top_logprobs[0])
            assert diff <= tol, (t, diff, tol)
    assert httpx.delete(f"{teacher.url}/v1/sessions/{sid}").status_code == 200
    gone = post(teacher.url, f"/v1/sessions/{sid}/extend", {"tokens": [[5], [5]]})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "session_not_found"


BAD_SCORES = [
    ({"sequences": [[1, 48]]}, 422, "sequences.0.1"),
    ({"sequences": [[1, -3]]}, 422, "sequences.0.1"),
    ({"sequences": [[]]}, 422, "sequences.0"),
    ({"sequences": []}, 422, "sequences"),
    ({"sequences": [[1] * 513]}, 422, "sequences.0"),
    ({"sequences": [[1, 2]], "top_k": 49}, 422, "top_k"),
    ({"sequences": [[1, 2]], "top_k": -1}, 422, "top_k"),
    ({"sequences": [[1, 2]], "start": 2}, 422, "start.0"),
    ({"sequences": [[1, 2]], "start": [0, 0]}, 422, "start"),
    ({"sequences": [[1, 2]], "token_ids": [99]}, 422, "token_ids.0"),
    ({"sequences": [["a"]]}, 422, "sequences.0.0"),
    ({"sequences": [[1, 2]], "surprise": 1}, 422, "surprise"),
    ({"sequences": [[1] * 500] * 10, "full": True}, 413, "full"),  # 5000 x 48 > 100k values
    ({"sequences": [[1] * 500] * 200}, 413, "sequences"),  # 100k tokens > 65536
]


@pytest.mark.parametrize(("body", "status", "field"), BAD_SCORES)
def test_bad_score_input_names_the_field(teacher: ServerProcess, body: dict, status: int, field: str) -> None:
    resp = post(teacher.url, "/v1/score", body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["field"] == field and field.split(".")[0] in err["message"]
    assert httpx.get(f"{teacher.url}/health").status_code == 200


def test_full_logprobs_refused_when_disabled(tiny_model: Path) -> None:
    server = ServerProcess(tiny_model).wait_ready()
    try:
        resp = post(server.url, "/v1/score", {"sequences": [[1, 2]], "full": True})
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "full_logprobs_disabled"
    finally:
        server.stop()


@pytest.mark.parametrize(("content", "ctype", "status"), [
    (b"{not json", "application/json", 400),
    (b"\xc1\xc1", codec.MSGPACK, 400),
    (msgpack.packb([1, 2, 3]), codec.MSGPACK, 422),
    (b"sequences=1", "application/x-www-form-urlencoded", 415),
])
def test_malformed_bodies(teacher: ServerProcess, content: bytes, ctype: str, status: int) -> None:
    resp = httpx.post(f"{teacher.url}/v1/score", content=content, headers={"content-type": ctype})
    assert resp.status_code == status and resp.json()["error"]["message"]


def test_bad_session_input(teacher: ServerProcess) -> None:
    sid = post(teacher.url, "/v1/sessions", {"sequences": [[1, 2]], "top_k": 3}).json()["session_id"]
    for body, field in [({"tokens": [[99]]}, "tokens.0.0"), ({"tokens": [[5]], "rows": [3]}, "rows.0"),
                        ({"tokens": [[]]}, "tokens.0"), ({"tokens": [[5], [6]]}, "tokens")]:
        resp = post(teacher.url, f"/v1/sessions/{sid}/extend", body)
        assert resp.status_code == 422 and resp.json()["error"]["field"] == field, resp.text
    unknown = post(teacher.url, "/v1/sessions/deadbeef/extend", {"tokens": [[5]]})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "session_not_found"
    assert httpx.delete(f"{teacher.url}/v1/sessions/deadbeef").status_code == 404


def test_metrics_and_openapi(teacher: ServerProcess) -> None:
    post(teacher.url, "/v1/score", {"sequences": [[1, 2, 3]]}, headers={"x-client-id": "exp-a"})
    text = httpx.get(f"{teacher.url}/metrics").text
    for name in ("trb_teacher_requests_total", "trb_teacher_tokens_scored_total", "trb_teacher_queue_depth",
                 "trb_teacher_request_seconds_bucket", "trb_teacher_active_sessions",
                 "trb_teacher_session_cache_bytes", "trb_teacher_errors_total"):
        assert name in text
    assert 'client="exp-a"' in text
    schema = httpx.get(f"{teacher.url}/openapi.json").json()
    score_req = schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for field, spec in score_req["properties"].items():
        assert spec.get("description"), f"ScoreRequest.{field} is undocumented"
    for model in ("ScoreResponse", "SequenceScores", "SessionStep", "ModelInfo"):
        for field, spec in schema["components"]["schemas"][model]["properties"].items():
            assert spec.get("description"), f"{model}.{field} is undocumented"


def test_api_keys_guard_every_route_but_health_and_ready(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRB_TEACHER_API_KEYS", "alice:alice-secret-1,bob:bob-secret-22")
    server = ServerProcess(tiny_model).wait_ready()
    try:
        good = {"authorization": "Bearer alice-secret-1"}
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/ready").status_code == 200  # the probes need no key (OPEN_PATHS)
        routes = [("GET", "/v1/model"), ("GET", "/metrics"), ("POST", "/v1/score"),
                  ("POST", "/v1/sessions"), ("POST", "/v1/sessions/x/extend"), ("DELETE", "/v1/sessions/x"),
                  ("GET", "/openapi.json"), ("GET", "/docs")]
        for headers in ({}, {"authorization": "Bearer wrong-secret"}, {"x-api-key": "alice-secret-"}):
            for method, path in routes:
                resp = httpx.request(method, f"{server.url}{path}", headers=headers, json={"sequences": [[1]]})
                assert resp.status_code == 401, (method, path, headers)
                assert resp.json()["error"]["code"] == "unauthorized"
        ok = httpx.post(f"{server.url}/v1/score", json={"sequences": [[1, 2]]}, headers={"x-api-key": "bob-secret-22"})
        assert ok.status_code == 200
        text = httpx.get(f"{server.url}/metrics", headers=good).text
        assert 'client="bob"' in text and "secret" not in text
    finally:
        server.stop()


def test_oversized_body_is_refused(teacher: ServerProcess) -> None:
    blob = b"[" + b"1," * (40 << 20) + b"1]"  # ~80 MB, over the 64 MiB default
    resp = httpx.post(f"{teacher.url}/v1/score", content=blob, headers={"content-type": "application/json"},
                      timeout=60)
    assert resp.status_code == 413 and resp.json()["error"]["field"] == "body"
    assert httpx.get(f"{teacher.url}/health").status_code == 200


def test_cli_refuses_public_host_without_keys(tiny_model: Path) -> None:
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "teacher_server.cli", "serve", "--model", str(tiny_model),
                           "--host", "0.0.0.0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "without API keys" in proc.stderr
