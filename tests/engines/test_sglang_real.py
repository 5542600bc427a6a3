"""Real SGLang 0.5.23 (CPU, float32, hidden states on) behind the teacher, against hf and against the fake.

One engine of the shipped teacher with an API key (tests/engines/sglang_engine.py has its flags and why),
tests/fake_sglang.py launched with the same limits, and teachers in front of the real one.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import sglang_engine
from real import (
    KEY,
    REAL_ONLY,
    TEACHER,
    Engine,
    hf_teacher,  # noqa: F401 - a fixture
    steps_logged,
    teacher_on,
    trainer,
    write_run,
)

from conftest import ServerProcess, free_port, wait_for
from shared import codec
from shared.protocol import ScoreRequest, ScoreResponse, SessionStep
from teacher_server.backends import sglang_transport
from teacher_server.backends.base import TOPK_MASS_BOUND
from teacher_server.backends.sglang import SGLangBackend

pytestmark = REAL_ONLY
FAKE = Path(__file__).resolve().parents[1] / "fake_sglang.py"
TOL = 1e-4  # real SGLang vs transformers, float32: measured up to 1.14e-5 (batching rounds differently)
LIMIT = 249  # SGLang's max_req_input_len 250 (context 256, 32768 KV tokens) less one
SEQS = [[69, 22, 25, 6, 14, 7, 16, 8, 26], [69, 22, 17, 5, 12, 8, 26, 11], [78, 3, 4, 78, 5]]


def scores(url: str, body: dict) -> ScoreResponse:
    resp = httpx.post(f"{url}/v1/score", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return codec.decode(resp.content, ScoreResponse)


def generate(url: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/generate", json=body, headers=headers, timeout=300)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(sglang_engine, tmp_path_factory.mktemp("logs") / "sglang.log", api_key=KEY)
    yield eng.wait_healthy()
    eng.stop()


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path_factory.mktemp("logs") / "fake_sglang.log", "w")
    proc = subprocess.Popen([sys.executable, str(FAKE), "--model", str(TEACHER), "--port", str(port), "--api-key", KEY,
                             "--max-total-tokens", str(sglang_engine.MAX_TOTAL_TOKENS), "--dtype", "float32",
                             "--enable-return-hidden-states", "--chunked-prefill-size", "-1"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _up(url), 120, "the fake SGLang")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def teacher(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = teacher_on("sglang", engine.url, tmp_path_factory.mktemp("logs") / "teacher.log").wait_ready()
    yield server
    server.stop()


# ---- the fake against the real thing: the same raw requests ------------------------------------
def test_server_info_agrees(engine: Engine, fake: str) -> None:
    real, ours = (httpx.get(f"{u}/server_info", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
                  for u in (engine.url, fake))
    for key in ("dtype", "max_req_input_len", "context_length", "enable_return_hidden_states", "chunked_prefill_size"):
        assert real[key] == ours[key], key
    assert real["max_req_input_len"] == LIMIT + 1


@pytest.mark.parametrize("starts", [[0, 0, 0], [3, 0, 4], [8, 7, 4]])
def test_fake_answers_generate_like_real_sglang(engine: Engine, fake: str, starts: list[int]) -> None:
    body = {"input_ids": SEQS, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0}, "return_logprob": True,
            "logprob_start_len": starts, "top_logprobs_num": 5, "return_hidden_states": True}
    real, ours = generate(engine.url, body), generate(fake, body)
    assert real.status_code == ours.status_code == 200, (real.text, ours.text)
    for r, f, seq, s in zip(real.json(), ours.json(), SEQS, starts, strict=True):
        rm, fm = r["meta_info"], f["meta_info"]
        assert rm["prompt_tokens"] == fm["prompt_tokens"] == len(seq)
        for m in (rm, fm):  # the L - s rule, null first, the last id reported as 0
            assert len(m["input_token_logprobs"]) == len(m["input_top_logprobs"]) == len(seq) - s
            assert m["input_top_logprobs"][0] is None and m["input_token_logprobs"][0][0] is None
            assert [e[1] for e in m["input_token_logprobs"]] == [t if t < 78 else 0 for t in seq[s:]]
            assert len(m["output_top_logprobs"]) == 1 and len(m["output_top_logprobs"][0]) == 5
            assert len(m["hidden_states"]) == 1 and len(m["hidden_states"][0]) == len(seq) - m["cached_tokens"]
        for a, b in zip(rm["input_top_logprobs"][1:] + rm["output_top_logprobs"],
                        fm["input_top_logprobs"][1:] + fm["output_top_logprobs"], strict=True):
            assert [e[1] for e in a] == [e[1] for e in b]
            assert max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True)) <= TOL
        rows = min(len(rm["hidden_states"][0]), len(fm["hidden_states"][0]))
        h_real, h_fake = np.array(rm["hidden_states"][0][-rows:]), np.array(fm["hidden_states"][0][-rows:])
        assert np.abs(h_real - h_fake).max() <= 1e-3 * np.abs(h_fake).max()


@pytest.mark.parametrize("case", ["too_long", "no_key", "unknown_sampling_param"])
def test_fake_refuses_like_real_sglang(engine: Engine, fake: str, case: str) -> None:
    body = {"input_ids": SEQS, "sampling_params": {"max_new_tokens": 1}, "return_logprob": True,
            "logprob_start_len": 0, "top_logprobs_num": 2}
    key: str | None = KEY
    if case == "too_long":
        body["input_ids"] = [SEQS[0], [5] * (LIMIT + 1)]
    elif case == "no_key":
        key = None
    else:
        body["sampling_params"] = {"max_new_tokens": 1, "top_q": 0.5}
    real, ours = generate(engine.url, body, key), generate(fake, body, key)
    assert real.status_code == ours.status_code != 200, (real.text, ours.text)
    assert type(real.json()["error"]) is type(ours.json()["error"])


# ---- the teacher on real SGLang ----------------------------------------------------------------
def test_model_info_says_what_the_engine_serves(teacher: ServerProcess) -> None:
    info = httpx.get(f"{teacher.url}/v1/model").json()
    assert info["dtype"] == "float32" and info["sessions"] and info["full_logprobs"] and info["tail"] == "exact"
    assert info["max_context"] == LIMIT and info["max_top_k"] == 79


@pytest.mark.parametrize("top_k", [1, 5, 20])
def test_scores_match_hf(teacher: ServerProcess, hf_teacher: ServerProcess, top_k: int) -> None:
    rng = np.random.default_rng(top_k)
    seqs = SEQS + [[69, *rng.integers(3, 79, size=int(n)).tolist()] for n in rng.integers(10, 200, size=12)]
    body = {"sequences": seqs, "start": [int(rng.integers(0, len(s))) for s in seqs], "top_k": top_k,
            "token_ids": [2, 78]}
    ours, ref = scores(teacher.url, body), scores(hf_teacher.url, body)
    assert ours.tail == "exact"
    for a, b in zip(ours.results, ref.results, strict=True):
        ties = np.abs(np.diff(b.top_logprobs, axis=1)).min(initial=1.0) < 1e-4
        assert ties or np.array_equal(a.top_ids, b.top_ids)
        for name in ("top_logprobs", "next_token_logprobs", "token_logprobs"):
            assert np.abs(getattr(a, name) - getattr(b, name)).max(initial=0) <= TOL, name
        assert np.abs(a.tail_logprob - b.tail_logprob).max() <= 1e-2  # logs of masses down to e^-25


def test_full_vocabulary_gives_an_empty_tail(teacher: ServerProcess, hf_teacher: ServerProcess) -> None:
    body = {"sequences": SEQS, "top_k": 79, "full": True}
    for a, b in zip(scores(teacher.url, body).results, scores(hf_teacher.url, body).results, strict=True):
        assert np.all(a.tail_logprob < -1e30)
        assert np.abs(a.logprobs - b.logprobs).max() <= TOL


def test_the_top_k_path_keeps_its_tail_within_the_bound(engine: Engine, hf_teacher: ServerProcess,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Without hidden states (here: told not to use them) the tail is rebuilt from SGLang's top-k."""
    monkeypatch.setattr(sglang_transport, "hidden_states_served", lambda info: False)
    backend = SGLangBackend(str(TEACHER), url=engine.url, api_key=KEY)
    try:
        assert backend.info.tail_bound == TOPK_MASS_BOUND and backend.head is None
        rng = np.random.default_rng(0)
        seqs = [[69, *rng.integers(3, 79, size=int(n)).tolist()] for n in rng.integers(10, 200, size=16)]
        ours = backend.score([ScoreRequest(sequences=seqs, top_k=20)])[0]
        ref = scores(hf_teacher.url, {"sequences": seqs, "top_k": 20}).results
        for a, b in zip(ours, ref, strict=True):
            assert np.abs(np.exp(a.tail_logprob) - np.exp(b.tail_logprob)).max() <= TOPK_MASS_BOUND
            assert np.array_equal(a.top_ids[:, 0], b.top_ids[:, 0])
            assert np.abs(a.top_logprobs - b.top_logprobs).max() <= TOL
        # and the input top-k came as SGLang's flat base64 arrays, not the nested lists
        meta = backend.transport.generate(sglang_transport.GenerateCall([seqs[0]], [0], 20))[0]
        assert meta.input_top_logprobs_shape == (len(seqs[0]) - 1, 20) and meta.input_top_logprobs == []
    finally:
        backend.close()


def _extend_both(servers: tuple[ServerProcess, ServerProcess], ids: list[str], body: dict) -> float:
    a, b = (codec.decode(httpx.post(f"{s.url}/v1/sessions/{sid}/extend", json=body, timeout=120).content, SessionStep)
            for s, sid in zip(servers, ids, strict=True))
    assert a.rows == b.rows and a.lengths == b.lengths and np.array_equal(a.top_ids, b.top_ids)
    return max(float(np.abs(a.top_logprobs - b.top_logprobs).max()), float(np.abs(a.tail_logprob - b.tail_logprob)
                                                                           .max()))


def test_sessions_and_all_position_extends_match_hf(teacher: ServerProcess, hf_teacher: ServerProcess) -> None:
    servers = (teacher, hf_teacher)
    prompts = [[69, 22, 25, 6], [69, 22, 17, 5, 12], [69, 3]]
    ids = [codec.decode(httpx.post(f"{s.url}/v1/sessions", json={"sequences": prompts, "top_k": 20}, timeout=120)
                        .content, SessionStep).session_id for s in servers]
    rng, worst = np.random.default_rng(5), 0.0
    for t in range(12):
        rows = [0, 1, 2] if t < 8 else [2, 0]
        body = {"tokens": [[int(x) for x in rng.integers(3, 79, size=1 + (t + r) % 3)] for r in rows], "rows": rows,
                "all_positions": t % 2 == 1}
        worst = max(worst, _extend_both(servers, ids, body))
    assert worst <= 1e-2, f"max |Δ| between sglang and hf sessions = {worst}"


def test_limits_and_the_last_id(teacher: ServerProcess) -> None:
    assert scores(teacher.url, {"sequences": [[5] * LIMIT], "top_k": 3}).results[0].top_ids.shape == (LIMIT, 3)
    resp = httpx.post(f"{teacher.url}/v1/score", json={"sequences": [SEQS[0], [5] * (LIMIT + 1)]}, timeout=60)
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "sequences.1"
    last = scores(teacher.url, {"sequences": [[69, 78, 78, 5]], "top_k": 3}).results[0]
    assert np.isfinite(last.next_token_logprobs).all() and last.next_token_logprobs.shape == (3,)


def test_a_missing_engine_key_fails_the_start_naming_the_setting(engine: Engine, tmp_path: Path) -> None:
    server = teacher_on("sglang", engine.url, tmp_path / "teacher.log", key=None)
    assert server.proc.wait(timeout=120) == 1
    assert "TRB_TEACHER_SGLANG_API_KEY" in (tmp_path / "teacher.log").read_text()


@pytest.mark.parametrize("method", [{"name": "opd"}, {"name": "trb", "eps0": 0.5, "horizon": 10}])
def test_ten_steps_train(teacher: ServerProcess, tmp_path: Path, method: dict) -> None:
    out = tmp_path / "run"
    log, _ = trainer(write_run(tmp_path / "cfg.yaml", teacher.url, out, method)).communicate(timeout=1200)
    steps = steps_logged(out)
    assert [r["step"] for r in steps] == list(range(1, 11)), log
    assert all(np.isfinite(r["loss"]) for r in steps)
    print(f"{method['name']} on real SGLang: loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}")


def test_a_run_survives_sglang_killed_and_restarted(tmp_path_factory: pytest.TempPathFactory) -> None:
    """kill -9 the engine after step 3 of a 10-step TRB run (per-token sessions), restart it on its port:
    the teacher answers 503 meanwhile, the trainer retries and rebuilds its sessions, every step is logged."""
    logs = tmp_path_factory.mktemp("kill")
    engine = Engine(sglang_engine, logs / "engine.log").wait_healthy()
    teacher = teacher_on("sglang", engine.url, logs / "teacher.log", key=None).wait_ready()
    out = logs / "run"
    proc = trainer(write_run(logs / "cfg.yaml", teacher.url, out, {"name": "trb", "eps0": 0.5, "horizon": 10}))
    try:
        wait_for(lambda: len(steps_logged(out)) >= 3, 900, "three steps")
        engine.kill()
        killed = time.monotonic()
        time.sleep(3)
        engine = engine.restart().wait_healthy()
        log, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, log
        assert [r["step"] for r in steps_logged(out)] == list(range(1, 11))
        print(f"SGLang down for {time.monotonic() - killed:.0f}s (restart {engine.ready_s:.0f}s); the run finished")
    finally:
        proc.kill()
        teacher.stop()
        engine.stop()


def test_the_training_signal_matches_hf(teacher: ServerProcess, hf_teacher: ServerProcess) -> None:
    """OPD's step-1 loss on identical rollouts and the initial probe KL within 0.5% of the hf teacher's."""
    from bench.engine_tails import measure

    rows = asyncio.run(measure([("hf", hf_teacher.url), ("sglang", teacher.url)], "models/arith-student", 20, 32,
                               96, 0))
    for r in rows:
        print(f"{r['name']:<8} tail {r['tail']:<6} probe KL {r['probe_kl']:.4f} ({r['probe_ratio']:.4f}) "
              f"rollout KL {r['rollout_kl']:.4f} ({r['rollout_ratio']:.4f})")
    assert abs(rows[1]["probe_ratio"] - 1) <= 0.005 and abs(rows[1]["rollout_ratio"] - 1) <= 0.005
