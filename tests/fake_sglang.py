"""A protocol-faithful fake of SGLang's native `/generate` logprob API, backed by a transformers model.

It models the subset the SGLang backend uses, with SGLang 0.5.23's behaviour as listed (with source
files) in docs/sglang.md: batches answer a JSON list in input order; entries are `[logprob, token_id,
null]`; with `logprob_start_len = s` each input list has `L - s` entries and entry 0 (about token s) is
null; `input_token_logprobs` reports ids >= vocab_size - 1 as 0; `output_*` lists cover the generated
tokens (after temperature); top-k only, never full logits; `cached_tokens` from a prefix cache, capped
at `s`. Limits: a prompt with L >= context_len or L >= max_req_input_len (min(context_len - 1,
KV tokens - 1) - 5, reported by /server_info) fails its whole batch with a 400, or is cut short with
--allow-auto-truncate. Error bodies: `{"error": "..."}` for a body that breaks the schema (e.g. an
unknown `sampling_params` key) or a missing API key, `{"error": {"message": ...}}` for a refused
request. `--api-key` guards every route but /health* and /ready; /health answers 503 for its first
`--starting-health-calls` calls, as while SGLang starts. Hidden states (`return_hidden_states: true`)
are refused unless launched with `--enable-return-hidden-states`; then `meta_info.hidden_states[0]` holds
one row (the final norm's output, the lm_head's input) per position the prefill computed, positions
cached_tokens..L-1, then one row per later decode step. /server_info reports the flag and
`chunked_prefill_size` (the fake never chunks; a real SGLang drops middle chunks' rows). With
`return_flat_raw_top_logprobs` the input top-k comes as flat arrays after a count of leading null rows
instead of `input_top_logprobs`, as JSON lists or, with `return_flat_raw_top_logprobs_b64`, as base64
float32 and int32 (the b64 flag alone is a 400); the output top-k stays nested.

It is stricter than SGLang in one way: any `sampling_params` key other than max_new_tokens and
temperature is a 400 (SGLang's answer to unknown keys), so a backend that starts sending e.g. top_p
fails here instead of silently passing.

`python tests/fake_sglang.py --model DIR --port N [--context-length N] [--api-key K] ...`.
`GET /fake/requests` (not SGLang, no key needed) lists what was asked and the cached_tokens answered.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from transformers import AutoModelForCausalLM

SAMPLING_KEYS = {"max_new_tokens", "temperature"}  # the ones modelled; any other key answers 400


class BadRequest(ValueError):
    """Refused by SGLang's tokenizer manager or scheduler: HTTP 400 {"error": {"message": ...}}."""


class ContractError(BadRequest):
    """A body that breaks SGLang's JSON schema: HTTP 400 {"error": "..."}."""


@dataclass
class Options:
    """SGLang's launch flags that the fake models (`sglang serve --context-length ...`)."""

    context_length: int | None = None  # None: the model's max_position_embeddings
    max_total_tokens: int = 1 << 20  # the KV pool's size in tokens
    allow_auto_truncate: bool = False
    api_key: str | None = None
    preferred_sampling_params: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    starting_health_calls: int = 0
    enable_return_hidden_states: bool = False
    chunked_prefill_size: int = 8192


def _lp(x: float) -> float | None:
    return x if math.isfinite(x) else None  # SGLang's orjson writes -inf as null


def _entry(lp_V: torch.Tensor, token: int) -> list:
    return [_lp(float(lp_V[token])), token, None]


def _top(lp_V: torch.Tensor, k: int) -> list[list]:
    values, ids = lp_V.topk(k)
    return [[_lp(v), i, None] for v, i in zip(values.tolist(), ids.tolist(), strict=True)]


def _by_ids(lp_V: torch.Tensor, ids: list[int]) -> list[list]:
    return [_entry(lp_V, t) for t in ids]


class PrefixCache:
    """A token trie of every sequence seen (prompt + output), like the radix cache's reuse count."""

    def __init__(self) -> None:
        self.root: dict[int, dict] = {}

    def match(self, ids: list[int]) -> int:
        node, n = self.root, 0
        for t in ids:
            if t not in node:
                break
            node, n = node[t], n + 1
        return n

    def insert(self, ids: list[int]) -> None:
        node = self.root
        for t in ids:
            node = node.setdefault(t, {})


class FakeSGLang:
    def __init__(self, model_dir: str, options: Options) -> None:
        self.model_dir, self.options = model_dir, options
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.vocab = self.model.get_output_embeddings().weight.shape[0]
        config = self.model.config.get_text_config()
        self.config_vocab = config.vocab_size  # SGLang's ModelConfig.vocab_size
        self.context_len = options.context_length or config.max_position_embeddings
        self.max_req_input_len = min(self.context_len - 1, options.max_total_tokens - 1) - 5
        self.health_calls = 0
        self.cache = PrefixCache()
        self.log: list[dict[str, Any]] = []

    def fit(self, ids: list[int]) -> list[int]:
        """The two length checks: the tokenizer manager's (context_len) and the scheduler's."""
        L = len(ids)
        if L >= self.context_len and not self.options.allow_auto_truncate:
            raise BadRequest(f"The input ({L} tokens) is longer than the model's context length "
                             f"({self.context_len} tokens).")
        if L >= self.max_req_input_len:
            if not self.options.allow_auto_truncate:
                raise BadRequest(f"Input length ({L} tokens) exceeds the maximum allowed length "
                                 f"({self.max_req_input_len} tokens). Use a shorter input or enable "
                                 "--allow-auto-truncate.")
            return ids[:self.max_req_input_len]
        return ids

    @torch.inference_mode()
    def logprobs(self, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
        """(len(ids), V) float32 next-token logprobs after ids[:1] .. ids[:L]."""
        logits = self.model(torch.tensor([ids])).logits[0].float()
        return (logits / temperature).log_softmax(-1)

    @torch.inference_mode()
    def hidden(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), H) final hidden states (after the final norm), as SGLang's logits processor sees them."""
        return self.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].float()

    def item(self, ids: Any, sp: Any, s: int, k: int, token_ids: list[int] | None) -> dict[str, Any]:
        """One batch item, validated first: a bad item fails the whole batch, as in SGLang."""
        sent = sp  # logged as sent, before the preferred sampling params are merged in
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ContractError("input_ids must be a list of token ids")
        if not ids:
            raise BadRequest("input_ids cannot be empty.")
        if any(not 0 <= t < self.vocab for t in ids):
            raise BadRequest("input_ids holds a token id outside the vocabulary")
        if not isinstance(sp, dict):
            raise ContractError("sampling_params must be an object")
        if set(sp) - SAMPLING_KEYS:
            raise ContractError(f"unknown field `{sorted(set(sp) - SAMPLING_KEYS)[0]}` in sampling_params")
        if not isinstance(s, int) or not isinstance(k, int) or not isinstance(sp.get("max_new_tokens", 16), int):
            raise ContractError("logprob_start_len, top_logprobs_num and max_new_tokens must be integers")
        sp = {**self.options.preferred_sampling_params, **sp}  # native /generate merges only these
        ids = self.fit(ids)
        L, n_new = len(ids), sp.get("max_new_tokens", 16)
        temperature = float(sp.get("temperature", 1.0))
        s = L - 1 if s == -1 else s
        if not 0 <= s <= L:
            raise BadRequest(f"logprob_start_len {s} is outside 0..{L} (the prompt length)")
        if k < 0 or k > self.vocab or n_new < 0:
            raise BadRequest("bad top_logprobs_num or max_new_tokens")
        if token_ids is not None and any(not 0 <= t < self.vocab for t in token_ids):
            raise BadRequest("token_ids_logprob holds an id outside the vocabulary")
        return dict(ids=ids, L=L, s=s, k=k, n_new=n_new, temperature=temperature, token_ids=token_ids,
                    sampling_params=sent)

    def run(self, it: dict[str, Any], return_logprob: bool, return_hidden: bool = False,
            flat: str | None = None) -> dict[str, Any]:
        ids, L, s, k, token_ids = it["ids"], it["L"], it["s"], it["k"], it["token_ids"]
        cached = min(self.cache.match(ids), L - 1, s if return_logprob else L - 1)
        lp_L_V = self.logprobs(ids)  # prompt logprobs are raw: no temperature
        meta: dict[str, Any] = {"prompt_tokens": L, "cached_tokens": cached}
        if return_hidden:  # the computed positions only: a radix-cache hit is not recomputed
            meta["hidden_states"] = [self.hidden(ids)[cached:].tolist()]
        if return_logprob:
            rows = range(s, L)  # entry i is about token s + i; its distribution is row s + i - 1
            last = self.config_vocab - 1  # SGLang's logprob result processor reports ids >= last as 0
            meta["input_token_logprobs"] = [[None if p == s else _lp(float(lp_L_V[p - 1, ids[p]])),
                                             ids[p] if ids[p] < last else 0, None] for p in rows]
            if k > 0:
                top = [None if p == s else _top(lp_L_V[p - 1], k) for p in rows]
                meta.update(_flat_fields(top, k, flat == "b64") if flat else {"input_top_logprobs": top})
            if token_ids is not None:
                meta["input_token_ids_logprobs"] = [None if p == s else _by_ids(lp_L_V[p - 1], token_ids)
                                                    for p in rows]
        output = self.generate(ids, it, meta, return_logprob)
        if return_hidden and len(output) > 1:  # decode steps: one row each (the first token needs none)
            meta["hidden_states"] += self.hidden(ids + output[:-1])[L:].tolist()
        self.cache.insert(ids + output)
        meta.update(completion_tokens=len(output), finish_reason={"type": "length", "length": it["n_new"]})
        self.log.append({"prompt_tokens": L, "cached_tokens": cached, "logprob_start_len": s,
                         "sampling_params": it["sampling_params"]})
        return {"text": "", "output_ids": output, "meta_info": meta}

    def generate(self, ids: list[int], it: dict[str, Any], meta: dict[str, Any], return_logprob: bool) -> list[int]:
        """Sample (greedy at temperature 0) n_new tokens; output logprobs are taken after temperature."""
        t = it["temperature"]
        out: list[int] = []
        fields: dict[str, list] = {"output_token_logprobs": [], "output_top_logprobs": [],
                                   "output_token_ids_logprobs": []}
        gen = torch.Generator().manual_seed(len(ids))
        for _ in range(it["n_new"]):
            lp_V = self.logprobs(ids + out, t if t > 0 else 1.0)[-1]
            tok = int(lp_V.argmax()) if t == 0 else int(torch.multinomial(lp_V.exp(), 1, generator=gen))
            fields["output_token_logprobs"].append(_entry(lp_V, tok))
            fields["output_top_logprobs"].append(_top(lp_V, it["k"]))
            fields["output_token_ids_logprobs"].append(_by_ids(lp_V, it["token_ids"] or []))
            out.append(tok)
        if return_logprob:
            meta["output_token_logprobs"] = fields["output_token_logprobs"]
            if it["k"] > 0:
                meta["output_top_logprobs"] = fields["output_top_logprobs"]
            if it["token_ids"] is not None:
                meta["output_token_ids_logprobs"] = fields["output_token_ids_logprobs"]
        return out


def _flat_fields(top: list[list[list] | None], k: int, b64: bool) -> dict[str, Any]:
    """The input top-k in SGLang's flat format (`return_flat_raw_top_logprobs`, tokenizer_manager.py's
    `_build_flat_top_logprobs_fields`): the leading null rows counted, then [rows, k] values and ids,
    as JSON lists or (with `_b64`) base64 of little-endian float32 and int32."""
    nulls = next((i for i, row in enumerate(top) if row), len(top))
    rows = top[nulls:]
    values = [-math.inf if e[0] is None else e[0] for row in rows for e in row]  # the arrays keep -inf
    ids = [e[1] for row in rows for e in row]
    shape = {"input_top_logprobs_shape": [len(rows), len(rows[0]) if rows else k],
             "input_top_logprobs_null_prefix": nulls}
    if not b64:
        return {"input_top_logprobs_val_flat": values, "input_top_logprobs_idx_flat": ids, **shape}
    return {"input_top_logprobs_val_flat_b64": base64.b64encode(np.asarray(values, "<f4").tobytes()).decode(),
            "input_top_logprobs_idx_flat_b64": base64.b64encode(np.asarray(ids, "<i4").tobytes()).decode(),
            "input_top_logprobs_val_flat_b64_dtype": "float32", "input_top_logprobs_idx_flat_b64_dtype": "int32",
            **shape}


def _per_item(value: Any, n: int, default: Any, is_list: bool = False) -> list[Any]:
    """SGLang takes one value for the whole batch or a list with one value per item."""
    if value is None:
        return [default] * n
    if isinstance(value, list) and (not is_list or (value and isinstance(value[0], list))):
        if len(value) != n:
            raise BadRequest(f"a per-item list has {len(value)} entries for a batch of {n}")
        return value
    return [value] * n


def generate_response(fake: FakeSGLang, body: dict[str, Any]) -> Any:
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise BadRequest("input_ids must be given and non-empty")
    batch = isinstance(ids[0], list)
    items = ids if batch else [ids]
    n = len(items)
    sps = _per_item(body.get("sampling_params") or {}, n, {})
    starts = _per_item(body.get("logprob_start_len"), n, -1)
    ks = _per_item(body.get("top_logprobs_num"), n, 0)
    token_ids = _per_item(body.get("token_ids_logprob"), n, None, is_list=True)
    ret = _per_item(body.get("return_logprob"), n, False)
    hidden = bool(body.get("return_hidden_states"))
    flat = "b64" if body.get("return_flat_raw_top_logprobs_b64") else "lists" if body.get(
        "return_flat_raw_top_logprobs") else None
    if flat == "b64" and not body.get("return_flat_raw_top_logprobs"):
        raise BadRequest("return_flat_raw_top_logprobs_b64 requires return_flat_raw_top_logprobs "
                         "or return_flat_raw_output_top_logprobs.")
    if hidden and not fake.options.enable_return_hidden_states:
        raise BadRequest("The server is not configured to return the hidden states. Please set "
                         "`--enable-return-hidden-states` to enable this feature.")
    checked = [fake.item(*args) for args in zip(items, sps, starts, ks, token_ids, strict=True)]
    outs = [fake.run(it, bool(r), hidden, flat) for it, r in zip(checked, ret, strict=True)]
    return outs if batch else outs[0]


def create_app(fake: FakeSGLang) -> FastAPI:
    app = FastAPI(title="fake SGLang")

    @app.middleware("http")
    async def api_key(request: Request, call_next: Any) -> Response:
        """SGLang's --api-key: a Bearer token on every route but /health*, /ready and /metrics."""
        free = request.url.path.startswith(("/health", "/ready", "/metrics", "/fake/"))
        if fake.options.api_key and not free:
            if request.headers.get("authorization", "") != f"Bearer {fake.options.api_key}":
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    @app.post("/generate")
    async def generate(request: Request) -> JSONResponse:
        try:
            return JSONResponse(generate_response(fake, await request.json()))
        except ContractError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except BadRequest as exc:
            return JSONResponse({"error": {"message": str(exc)}}, status_code=400)

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> Response:
        fake.health_calls += 1
        return Response(status_code=503 if fake.health_calls <= fake.options.starting_health_calls else 200)

    @app.get("/model_info")
    async def model_info() -> dict[str, Any]:
        return {"model_path": fake.model_dir, "tokenizer_path": fake.model_dir, "is_generation": True,
                "preferred_sampling_params": fake.options.preferred_sampling_params or None,
                "architectures": list(fake.model.config.architectures or [])}

    @app.get("/server_info")
    async def server_info() -> dict[str, Any]:
        """The launch flags as given (dtype "auto" stays "auto") plus the scheduler's limits."""
        o = fake.options
        return {"model_path": fake.model_dir, "dtype": o.dtype, "context_length": o.context_length,
                "allow_auto_truncate": o.allow_auto_truncate, "max_total_num_tokens": o.max_total_tokens,
                "max_req_input_len": fake.max_req_input_len, "version": "0.5.23-fake",
                "enable_return_hidden_states": o.enable_return_hidden_states,
                "chunked_prefill_size": o.chunked_prefill_size}

    @app.post("/flush_cache")
    async def flush_cache() -> dict[str, str]:
        fake.cache = PrefixCache()
        return {"status": "ok"}

    @app.get("/fake/requests")
    async def requests_seen() -> list[dict[str, Any]]:
        return fake.log

    @app.get("/fake/health_calls")
    async def health_calls() -> int:
        return fake.health_calls

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--max-total-tokens", type=int, default=1 << 20, help="The KV pool's size in tokens.")
    parser.add_argument("--allow-auto-truncate", action="store_true")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--preferred-sampling-params", type=json.loads, default={})
    parser.add_argument("--dtype", default="auto", help="Reported by /server_info only; the fake runs float32.")
    parser.add_argument("--starting-health-calls", type=int, default=0,
                        help="Answer 503 to this many /health calls first, as SGLang does while starting.")
    parser.add_argument("--enable-return-hidden-states", action="store_true")
    parser.add_argument("--chunked-prefill-size", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import uvicorn

    options = Options(args.context_length, args.max_total_tokens, args.allow_auto_truncate, args.api_key,
                      args.preferred_sampling_params, args.dtype, args.starting_health_calls,
                      args.enable_return_hidden_states, args.chunked_prefill_size)
    uvicorn.run(create_app(FakeSGLang(args.model, options)), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
