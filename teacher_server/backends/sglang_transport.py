"""How calls reach SGLang: a server over HTTP, or an in-process `sglang.Engine`.

Both transports answer the same three things the backend needs: the parsed `meta_info` of a batched
`/generate` call, the longest prompt SGLang accepts, and the dtype it runs the model in. Every SGLang
behaviour relied on here is listed, with its source file, in docs/sglang.md.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import simdjson
from pydantic import BaseModel, ConfigDict, TypeAdapter

from teacher_server.backends.engine_http import call, connect, error_message

log = logging.getLogger("teacher_server.engine")
Entry = tuple[float | None, int, str | None]  # [logprob, token_id, text]; a null logprob (orjson's -inf) is -inf
Rows = list[list[Entry] | None]  # one entry list per position; null where SGLang has none (input entry 0)
DTYPE_NAMES = {"half": "float16", "float16": "float16", "float": "float32", "float32": "float32",
               "bfloat16": "bfloat16"}  # SGLang's --dtype choices besides "auto"


class SGLangError(RuntimeError):
    """SGLang refused a call, or answered something that breaks the documented alignment."""


class MetaInfo(BaseModel):
    """The part of SGLang's `meta_info` we read (pydantic ignores the rest)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    prompt_tokens: int
    cached_tokens: int = 0
    input_token_logprobs: list[Entry] = []
    input_top_logprobs: Rows = []
    output_top_logprobs: Rows = []
    # The input top-k as flat base64 arrays (`return_flat_raw_top_logprobs_b64`), which replace the nested
    # `input_top_logprobs`: [rows, k] float32 values and int32 ids after `null_prefix` null positions.
    input_top_logprobs_val_flat_b64: str | None = None
    input_top_logprobs_idx_flat_b64: str | None = None
    input_top_logprobs_val_flat_b64_dtype: str = "float32"
    input_top_logprobs_idx_flat_b64_dtype: str = "int32"
    input_top_logprobs_shape: tuple[int, int] | None = None
    input_top_logprobs_null_prefix: int = 0
    input_token_ids_logprobs: Rows = []
    output_token_ids_logprobs: Rows = []
    # The prefill's hidden rows, (computed positions, H) float32: the first entry of SGLang's `hidden_states`
    # ([prefill rows, decode rows...]); None where the call did not ask for them.
    hidden: np.ndarray | None = None


class _Output(BaseModel):
    meta_info: MetaInfo


_OUTPUTS = TypeAdapter(list[_Output])
_SMALL_FIELDS = [name for name in MetaInfo.model_fields if name != "hidden"]


def _validated(raw: Any, n: int, from_json: bool) -> list[MetaInfo]:
    outs = _OUTPUTS.validate_json(raw) if from_json else _OUTPUTS.validate_python(raw)
    if len(outs) != n:
        raise SGLangError(f"SGLang answered {len(outs)} results for a batch of {n}")
    return [o.meta_info for o in outs]


def with_hidden_rows(raw: bytes, n: int) -> list[MetaInfo]:
    """An answer that carries hidden states, parsed with simdjson: the rows go from the JSON text straight
    into one float buffer (`as_buffer`), never through a Python float each.

    Why not pydantic as for the rest: the rows are nearly all of the answer (H floats per position, 128
    for the shipped teacher, thousands for real models), and a Python float per number took 1.8-2.2x the
    CPU of the buffer (`bench/bench_sglang_parse.py`). The small fields still go through `MetaInfo`.
    """
    try:
        outs = simdjson.Parser().parse(raw)
    except ValueError as exc:
        raise SGLangError(f"SGLang's /generate answer is not JSON: {exc}") from exc
    if not isinstance(outs, simdjson.Array) or len(outs) != n:
        got = len(outs) if isinstance(outs, simdjson.Array) else "no list of"
        raise SGLangError(f"SGLang answered {got} results for a batch of {n}")
    metas = []
    for out in outs:
        info = out.get("meta_info") if isinstance(out, simdjson.Object) else None
        if info is None:
            raise SGLangError("SGLang answered a result without meta_info")
        small = {k: v.as_list() if isinstance(v, simdjson.Array) else v
                 for k in _SMALL_FIELDS if (v := info.get(k)) is not None}
        meta = MetaInfo.model_validate(small)
        hidden = info.get("hidden_states")
        meta.hidden = _rows(hidden[0]) if isinstance(hidden, simdjson.Array) and len(hidden) else None
        metas.append(meta)
    return metas


def _rows(rows: Any) -> np.ndarray:
    """A JSON array of equal-length number arrays as a (rows, width) float32 array."""
    if not isinstance(rows, simdjson.Array):
        raise SGLangError("SGLang's hidden states are not a list of rows")
    widths = {len(row) if isinstance(row, simdjson.Array) else -1 for row in rows}  # one pass; -1: not a row
    if -1 in widths:
        raise SGLangError("SGLang's hidden states are not a list of rows")
    if len(widths) > 1:  # as_buffer would flatten ragged rows without a word
        raise SGLangError("SGLang's hidden-state rows are not all the same length")
    width = widths.pop() if widths else 0
    try:
        flat = np.frombuffer(rows.as_buffer(of_type="d"), dtype=np.float64)
    except (TypeError, ValueError) as exc:  # a null (orjson's NaN/inf) or a number out of range
        raise SGLangError(f"SGLang returned a hidden state that is not a finite number ({exc})") from exc
    return flat.astype(np.float32).reshape(len(rows), width)


@dataclass(frozen=True)
class GenerateCall:
    """One batched native `/generate` call, always with max_new_tokens = 1 (for the last position)."""

    input_ids: list[list[int]]
    logprob_start_len: list[int]
    top_logprobs_num: int
    token_ids_logprob: list[int] | None = None
    return_hidden_states: bool = False

    def payload(self) -> dict[str, Any]:
        """The body. temperature 1.0 is explicit: output logprobs (our last position) are taken after
        temperature, and an SGLang started with --preferred-sampling-params fills in the keys a request
        leaves out (native /generate ignores generation_config; its own default is 1.0). The input
        top-k comes back flat and base64-encoded (SGLang >= 0.5.19, `srt/managers/io_struct.py`), which
        costs the teacher a base64 decode instead of a parsed triple per entry; the output side's flat
        form needs 0.5.22, and it is one row per sequence, so it stays nested."""
        body: dict[str, Any] = {
            "input_ids": self.input_ids, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
            "return_logprob": True, "logprob_start_len": self.logprob_start_len,
            "top_logprobs_num": self.top_logprobs_num}
        if self.top_logprobs_num:  # the input top-k as two base64 arrays, not a JSON triple per entry
            body.update(return_flat_raw_top_logprobs=True, return_flat_raw_top_logprobs_b64=True)
        if self.token_ids_logprob:
            body["token_ids_logprob"] = self.token_ids_logprob
        if self.return_hidden_states:
            body["return_hidden_states"] = True
        return body


def resolve_dtype(launch: str, config_dtype: Any, model_type: str = "") -> str:
    """The dtype SGLang runs the model in, from its `--dtype` (which /server_info reports as given,
    e.g. "auto") and the model config's dtype: "auto" keeps the config's dtype, except that float32
    checkpoints run in float16 (bfloat16 for gemma models). Mirrors model_config._get_and_verify_dtype."""
    if launch != "auto":
        return DTYPE_NAMES.get(launch, launch)
    name = str(config_dtype).removeprefix("torch.") if config_dtype is not None else "float32"
    if name == "float32":
        return "bfloat16" if model_type.startswith("gemma") else "float16"
    return name


def max_prompt_len(max_req_input_len: int | None, context_len: int | None = None) -> int | None:
    """The longest prompt SGLang serves: the tokenizer manager refuses L >= context_len and the
    scheduler refuses L >= max_req_input_len (about min(context_len - 1, KV tokens - 1) - 5)."""
    limits = [n - 1 for n in (max_req_input_len, context_len) if n is not None]
    return min(limits) if limits else None


def hidden_states_served(server_info: dict[str, Any]) -> bool:
    """Whether every prompt position's hidden state comes back: SGLang launched with
    `--enable-return-hidden-states` (or `--return-hidden-states-mode full`) and chunked prefill off
    (`--chunked-prefill-size -1`): a prompt split into chunks loses the rows of its middle chunks."""
    enabled = bool(server_info.get("enable_return_hidden_states")) or \
        server_info.get("return_hidden_states_mode") == "full"
    chunk = server_info.get("chunked_prefill_size")
    if enabled and chunk is not None and chunk > 0:
        log.warning("SGLang returns hidden states but chunks prefills of over %d tokens, which drops rows: "
                    "restart it with --chunked-prefill-size -1 for exact tails; until then the tail is rebuilt "
                    "from the top-k", chunk)
        return False
    return enabled


class Transport(Protocol):
    """How calls reach SGLang: blocking, from the scheduler's model thread."""

    dtype: str  # SGLang's --dtype as launched ("auto" unless set)
    max_req_input_len: int | None  # SGLang's own limit (None: it did not say)
    context_len: int | None
    hidden_states: bool  # launched with --enable-return-hidden-states and without chunked prefill

    def generate(self, call: GenerateCall) -> list[MetaInfo]: ...

    def close(self) -> None: ...


class HTTPTransport:
    """A running SGLang server (`sglang serve`): native `/generate` through a synchronous client.

    `api_key` is the server's `--api-key`, sent as `Authorization: Bearer ...` on every call (SGLang
    lets /health through without it). It is kept in the client's headers only, never in a message.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0,
                 ready_timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.client = connect(self.url, api_key, timeout_s, ready_timeout_s, "SGLang", SGLangError)
        resp = call(self.client, "GET", "/server_info", "SGLang")
        if resp.status_code != 200:
            hint = " (is SGLang started with --api-key? set TRB_TEACHER_SGLANG_API_KEY or --sglang-api-key-file)"
            raise SGLangError(f"SGLang /server_info answered {resp.status_code}: {error_message(resp)}"
                              + (hint if resp.status_code in (401, 403) else ""))
        info = resp.json()
        self.dtype = str(info.get("dtype") or "auto")
        self.max_req_input_len: int | None = info.get("max_req_input_len")
        self.context_len: int | None = info.get("context_length")  # the launch flag; None: the model's
        self.hidden_states = hidden_states_served(info)

    def generate(self, request: GenerateCall) -> list[MetaInfo]:
        resp = call(self.client, "POST", "/generate", "SGLang", json=request.payload())
        if resp.status_code != 200:
            raise SGLangError(f"SGLang /generate answered {resp.status_code}: {error_message(resp)}")
        if request.return_hidden_states:
            return with_hidden_rows(resp.content, len(request.input_ids))
        return _validated(resp.content, len(request.input_ids), from_json=True)

    def close(self) -> None:
        self.client.close()


class EngineTransport:
    """An in-process `sglang.Engine`. UNTESTED with a real SGLang (it needs a GPU): CI drives the bridge
    below with a stub Engine only.

    Bridge: the Engine adopts the event loop running when it is built (`_ensure_event_loop`) and its
    tokenizer manager stays bound to it, while our calls come from the scheduler's worker thread. So
    the transport owns one private loop on a daemon thread, builds the Engine in a coroutine there and
    runs every `async_generate` on it with `run_coroutine_threadsafe(...).result()`. Only coroutine
    methods may be called that way: Engine's synchronous methods (`generate`, `get_server_info`,
    `open_session`, `flush_cache`, ...) call `loop.run_until_complete` on that same loop, which fails
    while it runs. So the limits are read as plain attributes of its tokenizer manager.

    What loading SGLang does to this process: `import sglang` is cheap (`sglang.Engine` is a lazy
    import); the first `sglang.Engine(...)` loads the engine module, which sets the process-wide uvloop
    event loop policy (our loop already exists), and the Engine's launch sets the multiprocessing start
    method to spawn (force=True). Off the main thread SGLang skips its SIGQUIT/SIGTERM handlers (it
    logs a warning). `shutdown()` kills every child process of this process; in the teacher server's
    model worker those are SGLang's own.
    """

    def __init__(self, model: str, dtype: str) -> None:
        import sglang  # optional extra `sglang`

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sglang-engine-loop", daemon=True)
        self._thread.start()

        async def build() -> Any:
            engine = sglang.Engine(model_path=model, dtype=dtype)
            manager = engine.tokenizer_manager
            return engine, manager.max_req_input_len, manager.context_len

        self.dtype = dtype
        self.hidden_states = False  # the in-process Engine is built without --enable-return-hidden-states
        self.engine, self.max_req_input_len, self.context_len = self._run(build())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, call: GenerateCall) -> list[MetaInfo]:
        try:
            out = self._run(self.engine.async_generate(**call.payload()))
        except ValueError as exc:  # what SGLang's HTTP server would answer as a 400
            raise SGLangError(f"SGLang refused the call: {exc}") from exc
        return _validated(out if isinstance(out, list) else [out], len(call.input_ids), from_json=False)

    def close(self) -> None:
        self.engine.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
