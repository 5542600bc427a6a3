"""What our teacher costs in front of a real engine: the same top-20 work through /v1/score vs sent straight
to the engine's own HTTP API, alternating in one run.

The work: 32 arithmetic sequences (about 1,100 tokens), the top-20 at every position. Straight to the engine
that is vLLM's `/v1/completions` with `prompt_logprobs: 20` (what a vLLM user sends for it) and SGLang's
`/generate` with `top_logprobs_num: 20` from position 0, the input top-k as flat base64 arrays
(`return_flat_raw_top_logprobs_b64`, its fastest form, the one the teacher asks for; a row without a target
shows what SGLang's default nested JSON costs instead). Through our teacher, /v1/score (msgpack), which
talks to a vLLM generate server, a vLLM pooling runner (hidden states, exact), SGLang with hidden states
(exact), or a second SGLang launched without them, which the teacher asks for the same top-20 as the direct
call (its tail bounded): that row is the proxy's own cost, the exact rows add the price of the exact tail.
Engines come from the venvs of scripts/engines/*.sh; an engine whose venv is missing is left out.

SGLang runs with `--sleep-on-idle` (tests/engines/sglang_engine.py): without it its scheduler polls at 100%
of a core while idle, which on a 2-core machine takes that core from whatever shares it (here our teacher,
while it parses SGLang's answer) and from SGLang's own tokenizer and detokenizer processes.

The teacher sends a request to an engine whole: for an engine backend its token budget per call
(`max_batch_tokens`) defaults to the largest request it accepts (teacher_server/settings.py). The
`--max-batch-tokens 1024` rows (no target) are a second teacher on the same engine at the old default,
which cut this work (1,067 tokens) into two engine calls, one after the other: what that split costs.

    .venv/bin/python -m bench.bench_engine_proxy [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.common import REPO, Section, base_parser, limit_threads, machine_info, report, spread
from shared import codec
from shared.protocol import ScoreRequest
from student_trainer.tasks import arithmetic
from student_trainer.teacher.local import LocalTeacher, free_port

sys.path.insert(0, str(REPO / "tests" / "engines"))
import sglang_engine  # noqa: E402
import vllm_engine  # noqa: E402

MODEL = "models/arith-teacher"
TOP_K = 20
TARGET = "<= 1.15"
SPLIT = ("--max-batch-tokens", "1024")  # the old default budget: this request in two engine calls
OLD = " ".join(SPLIT) + ": "  # the name of a row at that budget
NESTED = "the same /generate with the top-k as nested JSON"  # SGLang's default form: no target


def missing_engines() -> list[str]:
    """The engines whose venv is absent (scripts/engines/*.sh build them): the bench skips those."""
    return [name for name, module in (("vLLM", vllm_engine), ("SGLang", sglang_engine)) if module.venv_python() is None]


def engines_dir() -> Path:
    return sglang_engine.engines_dir()


def sequences() -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / MODEL)
    return [tok(p.prompt + p.solution, add_special_tokens=False)["input_ids"]
            for p in arithmetic.generate(32, seed=11, split="train")]


def wait_healthy(url: str, proc, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the engine at {url} exited with {proc.returncode}")
        time.sleep(0.5)
    raise TimeoutError(f"the engine at {url} did not start")


def alternate(calls: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Each call once per round, in turn, after one warm-up round; wall seconds per call."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds + 1):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            if r:
                times[name].append(time.perf_counter() - started)
    return times


def post(client: httpx.Client, path: str, **kw) -> None:
    resp = client.post(path, **kw)
    resp.raise_for_status()
    resp.read()


def teacher_call(client: httpx.Client, seqs: list[list[int]]) -> Callable[[], None]:
    body = codec.encode(ScoreRequest(sequences=seqs, top_k=TOP_K), codec.MSGPACK)
    headers = {"content-type": codec.MSGPACK, "accept": codec.MSGPACK}
    return lambda: post(client, "/v1/score", content=body, headers=headers)


class Engine:
    """An engine of a launcher module on a free port, and a teacher in front of it."""

    def __init__(self, module, name: str, logs: Path, **kw) -> None:
        self.module, self.port = module, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = module.launch(MODEL, self.port, log_path=logs / f"{name}.log", **kw)
        self.teachers: list[LocalTeacher] = []

    def front(self, backend: str, *extra: str) -> str:
        """A teacher in front of the engine (`extra`: its flags); its URL."""
        wait_healthy(self.url, self.proc)
        self.teachers.append(LocalTeacher(MODEL, "--backend", backend, f"--{backend}-url", self.url, *extra,
                                          threads=1).wait_ready(900))
        return self.teachers[-1].url

    def stop(self) -> None:
        for teacher in self.teachers:
            teacher.stop()
        self.module.stop(self.proc)


def add_rows(section: Section, times: dict[str, list[float]], baseline: str) -> None:
    base = statistics.median(times[baseline])
    for name, ts in times.items():
        if name != baseline:
            section.add(f"{name} / {baseline}", f"{spread(ts)} vs {spread(times[baseline])}",
                        statistics.median(ts) / base, "" if name.startswith(OLD) or name == NESTED else TARGET)


def run(threads: int = 1, quick: bool = False) -> Section:
    limit_threads(threads)
    rounds = 3 if quick else 15
    seqs = sequences()
    tokens = sum(map(len, seqs))
    section = Section(f"7. The teacher in front of a real engine: top-{TOP_K} of {len(seqs)} sequences ({tokens} "
                      "tokens)", f"Medians of {rounds} alternating rounds; engines float32 on this CPU, each from "
                      "its own venv (SGLang with --sleep-on-idle); the baseline is vLLM's /v1/completions "
                      "(prompt_logprobs 20) or SGLang's /generate (top_logprobs_num 20, flat base64 top-k); "
                      "teachers at their default budget send the request whole, one engine call; "
                      "`--max-batch-tokens 1024` (the old default) cuts it into two.")
    logs = REPO / "runs" / "bench-engine-proxy"
    logs.mkdir(parents=True, exist_ok=True)
    completions = {"model": MODEL, "prompt": seqs, "max_tokens": 1, "prompt_logprobs": TOP_K}
    nested = {"input_ids": seqs, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
              "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": TOP_K}
    generate = {**nested, "return_flat_raw_top_logprobs": True, "return_flat_raw_top_logprobs_b64": True}
    if vllm_engine.venv_python() is None:
        section.add("vLLM: venv missing (scripts/engines/vllm.sh)", "-")
    else:
        gen = Engine(vllm_engine, "vllm-generate", logs)
        pool = Engine(vllm_engine, "vllm-pooling", logs, runner="hidden")
        try:
            flags = ("--vllm-dtype", "float32")
            a, a2, b = gen.front("vllm", *flags), gen.front("vllm", *flags, *SPLIT), pool.front("vllm")
            with httpx.Client(base_url=gen.url, timeout=600) as direct, httpx.Client(base_url=a, timeout=600) as ta, \
                    httpx.Client(base_url=a2, timeout=600) as ta2, httpx.Client(base_url=b, timeout=600) as tb:
                times = alternate({"vLLM /v1/completions": lambda: post(direct, "/v1/completions", json=completions),
                                   "teacher on a vLLM generate server": teacher_call(ta, seqs),
                                   OLD + "teacher on a vLLM generate server": teacher_call(ta2, seqs),
                                   "teacher on a vLLM pooling runner (exact)": teacher_call(tb, seqs)}, rounds)
            add_rows(section, times, "vLLM /v1/completions")
        finally:
            gen.stop()
            pool.stop()
    if sglang_engine.venv_python() is None:
        section.add("SGLang: venv missing (scripts/engines/sglang.sh)", "-")
    else:
        sgl = Engine(sglang_engine, "sglang", logs)
        try:
            url, url2 = sgl.front("sglang"), sgl.front("sglang", *SPLIT)
            with httpx.Client(base_url=sgl.url, timeout=600) as direct, httpx.Client(base_url=url, timeout=600) as t, \
                    httpx.Client(base_url=url2, timeout=600) as t2:
                times = alternate({"SGLang /generate": lambda: post(direct, "/generate", json=generate),
                                   NESTED: lambda: post(direct, "/generate", json=nested),
                                   "teacher on SGLang, hidden states (exact)": teacher_call(t, seqs),
                                   OLD + "teacher on SGLang, hidden states (exact)": teacher_call(t2, seqs)},
                                  rounds)
            add_rows(section, times, "SGLang /generate")
        finally:
            sgl.stop()
        # The same work like for like: SGLang without the exact path's flags, so the teacher asks it for the
        # top-20 the direct call asks for (its tail then bounded, not exact): the proxy's own cost.
        topk = Engine(sglang_engine, "sglang-topk", logs, hidden_states=False)
        try:
            url = topk.front("sglang")
            with httpx.Client(base_url=topk.url, timeout=600) as direct, httpx.Client(base_url=url, timeout=600) as t:
                base = "SGLang /generate (no hidden states)"
                times = alternate({base: lambda: post(direct, "/generate", json=generate),
                                   NESTED: lambda: post(direct, "/generate", json=nested),
                                   "teacher on SGLang, top-k (bounded tail)": teacher_call(t, seqs)}, rounds)
            add_rows(section, times, base)
        finally:
            topk.stop()
    return section


def main() -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    info = machine_info(args.threads)
    print(report([run(args.threads, args.quick)], info))


if __name__ == "__main__":
    main()
