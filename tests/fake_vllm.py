"""A protocol-faithful fake of vLLM's `/v1/completions` prompt-logprob API, backed by a transformers model.

It models the subset the vLLM backend uses, with vLLM 0.33.0's behaviour as listed (with source files)
in docs/vllm.md: token-id prompts (`[ids]` or `[[ids], ...]`, at most 1024), used as sent; `choices[i]`
is prompt i; `prompt_logprobs = k` gives one entry per prompt token, entry 0 null, entry i the
distribution after ids[:i] as `{"<id>": {"logprob", "rank", "decoded_token"}}` built as a dict of the
actual token ids[i] (rank = how many tokens have a logprob >= its own) then the top-k with ranks 1..k,
so a duplicate merges into the first key with the later rank; -inf written as -9999.0; temperature
never applies. Limits: `max_tokens` defaults to 16 and must end up >= 1 (a prompt of max_model_len
tokens leaves none), a prompt over max_model_len is refused, `prompt_logprobs` over `--max-logprobs`
(default 20, -1 = the vocabulary) is refused, ids outside the vocabulary are refused, `stream` with
prompt logprobs is refused. Errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP
status equal to `code`; `--api-key` guards /v1 (and /v2, /inference) with `401 {"error": "Unauthorized"}`,
never /health. `GET /v1/models` lists the served name with its `max_model_len`.

With `--runner pooling` it is a pooling runner instead (`--runner pooling --convert embed` with the pooler
task `token_embed` over ALL tokens, activation off): `POST /pooling {"model", "input": [ids] | [[ids], ...],
"task": "token_embed", "use_activation": false, "encoding_format": "float" | "base64", "embed_dtype":
"float32", "endianness": "little"}` answers `data[i] = {"index": i, "object": "pooling", "data": ...}` with
the (L, H) final hidden states of prompt i (a nested list, or base64 of little-endian float32); a pooling
runner answers /v1/completions 404, a generate server /pooling 404. `use_activation: true` L2-normalises
each row, as vLLM's token_embed pooler does.

It is stricter than vLLM in one way: a body key it does not model is a 400 (vLLM ignores unknown keys
with a log warning), so a misspelt key from the backend fails here instead of silently passing.

`python tests/fake_vllm.py --model DIR --port N [--max-model-len N] [--max-logprobs N] [--api-key K]`.
`GET /fake/requests` (not vLLM, no key needed) lists what was asked.
"""

from __future__ import annotations

import argparse
import base64
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from transformers import AutoModelForCausalLM, AutoTokenizer

GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")
MAX_PROMPTS = 1024
KNOWN_KEYS = {"model", "prompt", "max_tokens", "prompt_logprobs", "temperature", "stream", "n", "echo", "logprobs"}
POOLING_KEYS = {"model", "input", "task", "use_activation", "encoding_format", "embed_dtype", "endianness"}


class ApiError(ValueError):
    """vLLM's ErrorResponse: `{"error": {"message", "type", "param", "code"}}` with status `code`."""

    def __init__(self, message: str, param: str | None = None, value: Any = None, status: int = 400,
                 err_type: str = "BadRequestError") -> None:
        extras = [f"{k}={v}" for k, v in (("parameter", param), ("value", value)) if v is not None]
        super().__init__(f"{message} ({', '.join(extras)})" if extras and status == 400 else message)
        self.param, self.status, self.err_type = param, status, err_type

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.err_type, "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class Options:
    """vLLM's launch flags that the fake models (`vllm serve --max-model-len ...`)."""

    served_model_name: str
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_logprobs: int = 20
    api_key: str | None = None
    runner: str = "generate"  # or "pooling"


class FakeVLLM:
    def __init__(self, model_dir: str, options: Options) -> None:
        self.options = options
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vocab = self.model.config.get_text_config().vocab_size  # vLLM's ModelConfig.get_vocab_size()
        self.max_model_len = options.max_model_len or self.model.config.max_position_embeddings
        self.log: list[dict[str, Any]] = []

    @torch.inference_mode()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), V) float32 next-token logprobs after ids[:1] .. ids[:L] (raw: no temperature)."""
        return self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    @torch.inference_mode()
    def pooling(self, body: dict[str, Any]) -> dict[str, Any]:
        """token_embed over ALL tokens: every position's final hidden state (after the final norm)."""
        if unknown := set(body) - POOLING_KEYS:
            raise ApiError(f"fake vLLM: unmodelled key {sorted(unknown)[0]!r}")
        if body.get("task") != "token_embed":
            raise ApiError(f"Unsupported task: {body.get('task')!r}", "task")
        if body.get("embed_dtype", "float32") != "float32" or body.get("endianness", "native") not in ("little",
                                                                                                        "native"):
            raise ApiError("fake vLLM: only float32, little-endian is modelled", "embed_dtype")
        prompt = body.get("input")
        prompts = [prompt] if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else prompt
        if not isinstance(prompts, list) or not all(isinstance(p, list) and p for p in prompts):
            raise ApiError("fake vLLM: input must be token ids, [ids] or [[ids], ...], non-empty", "input")
        data = []
        for i, ids in enumerate(prompts):
            if len(ids) > self.max_model_len:
                raise ApiError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                               f"request has {len(ids)} input tokens. Please reduce the length of the input.",
                               "input_tokens", len(ids))
            h = self.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].float()
            if body.get("use_activation", True):
                h = torch.nn.functional.normalize(h, dim=-1)
            out = base64.b64encode(h.numpy().astype("<f4").tobytes()).decode() \
                if body.get("encoding_format", "float") == "base64" else h.tolist()
            data.append({"index": i, "object": "pooling", "data": out})
            self.log.append({"prompt_tokens": len(ids), "pooling": True, "keys": sorted(body)})
        n = sum(len(p) for p in prompts)
        return {"id": "pool-fake", "object": "list", "created": int(time.time()),
                "model": self.options.served_model_name, "data": data,
                "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0}}

    def entry(self, lp_V: torch.Tensor, actual: int, k: int) -> dict[str, dict[str, Any]]:
        """One position, built like vLLM's append_logprobs_for_next_position (a dict: duplicates merge)."""
        k = lp_V.numel() if k == -1 else k
        values, top = lp_V.topk(k)
        rank = int((lp_V >= lp_V[actual]).sum())
        ids = [actual, *top.tolist()]
        lps = [float(lp_V[actual]), *values.tolist()]
        ranks = [rank, *range(1, k + 1)]
        out = {t: {"logprob": -9999.0 if lp == -math.inf else lp, "rank": r,
                   "decoded_token": self.tokenizer.decode([t])} for t, lp, r in zip(ids, lps, ranks, strict=True)}
        return {str(t): v for t, v in out.items()}  # json.dumps turns the int keys into strings

    def check(self, body: dict[str, Any]) -> list[list[int]]:
        """The request checks, in vLLM's order; any failure refuses the whole request."""
        if unknown := set(body) - KNOWN_KEYS:
            raise ApiError(f"fake vLLM: unmodelled key {sorted(unknown)[0]!r}")
        if body.get("model") not in (None, self.options.served_model_name):
            raise ApiError(f"The model `{body['model']}` does not exist. Valid aliases: "
                           f"{self.options.served_model_name}.", "model", status=404, err_type="NotFoundError")
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else prompt
        if (not isinstance(prompts, list) or not prompts
                or not all(isinstance(p, list) and p and all(isinstance(t, int) and t >= 0 for t in p)
                           for p in prompts)):
            raise ApiError("fake vLLM: prompt must be token ids, [ids] or [[ids], ...], non-empty", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise ApiError(f"prompt list length {len(prompts)} exceeds the maximum allowed count of {MAX_PROMPTS}.",
                           "prompt")
        k = body.get("prompt_logprobs")
        if k is not None:
            if not isinstance(k, int):
                raise ApiError("`prompt_logprobs` must be an integer.", "prompt_logprobs", k)
            if body.get("stream") and (k > 0 or k == -1):
                raise ApiError("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
            if k < 0 and k != -1:
                raise ApiError("`prompt_logprobs` must be a positive value or -1.", "prompt_logprobs", k)
            cap = self.vocab if self.options.max_logprobs == -1 else self.options.max_logprobs
            asked = self.vocab if k == -1 else k
            if asked > cap:
                raise ApiError(f"Requested prompt logprobs of {asked}, which is greater than max allowed: {cap}",
                               "prompt_logprobs", asked)
        for p in prompts:
            if max(p) > self.vocab - 1:
                raise ApiError(f"Token id {max(p)} is out of vocabulary")  # vLLM names no param here
            if len(p) > self.max_model_len:
                raise ApiError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                               f"prompt contains {len(p)} input tokens, which exceeds this limit even without any "
                               "output tokens. Please reduce the length of the input prompt.", "input_tokens", len(p))
            max_tokens = min(self.max_model_len - len(p), body.get("max_tokens", 16))
            if max_tokens < 1:
                raise ApiError(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens)
        return prompts

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        prompts, k = self.check(body), body.get("prompt_logprobs")
        choices = []
        for i, ids in enumerate(prompts):
            lp_L_V = self.logprobs(ids)
            entries = None if k is None else [None] + [self.entry(lp_L_V[p - 1], ids[p], k) for p in range(1, len(ids))]
            token = int(lp_L_V[-1].argmax())  # the generated token (greedy; its value is never read)
            choices.append({"index": i, "text": self.tokenizer.decode([token]), "logprobs": None,
                            "finish_reason": "length", "stop_reason": None, "prompt_logprobs": entries})
            self.log.append({"prompt_tokens": len(ids), "prompt_logprobs": k, "keys": sorted(body),
                             "max_tokens": body.get("max_tokens"), "temperature": body.get("temperature")})
        n = sum(len(p) for p in prompts)
        return {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                "model": self.options.served_model_name, "choices": choices,
                "usage": {"prompt_tokens": n, "completion_tokens": len(prompts), "total_tokens": n + len(prompts)}}


def create_app(fake: FakeVLLM) -> FastAPI:
    app = FastAPI(title="fake vLLM")

    @app.middleware("http")
    async def api_key(request: Request, call_next: Any) -> Response:
        """vLLM's --api-key: a Bearer token (scheme in any case) on every path under /v1, /v2, /inference."""
        if fake.options.api_key and request.url.path.startswith(GUARDED_PREFIX):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token != fake.options.api_key:
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    async def answer(request: Request, handler: Any) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return ApiError("Bad Request").response()
        try:
            return JSONResponse(handler(body))
        except ApiError as exc:
            return exc.response()

    if fake.options.runner == "pooling":
        @app.post("/pooling")
        async def pooling(request: Request) -> JSONResponse:
            return await answer(request, fake.pooling)
    else:
        @app.post("/v1/completions")
        async def completions(request: Request) -> JSONResponse:
            return await answer(request, fake.completions)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        name = fake.options.served_model_name
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "vllm",
                                            "root": name, "parent": None, "max_model_len": fake.max_model_len}]}

    @app.get("/fake/requests")
    async def requests_seen() -> list[dict[str, Any]]:
        return fake.log

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-logprobs", type=int, default=20)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--runner", default="generate", choices=["generate", "pooling"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    import uvicorn

    options = Options(args.served_model_name or args.model, args.max_model_len, args.max_logprobs, args.api_key,
                      args.runner)
    uvicorn.run(create_app(FakeVLLM(args.model, options)), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
