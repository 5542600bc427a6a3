"""Async client of the teacher server: msgpack on the wire, `TeacherTopK` tensors out.

It retries what is safe to retry (connection errors, 503 and 429, honouring Retry-After), and it
keeps every session's full prefixes so a session lost to a restart, an eviction or a TTL is
rebuilt transparently. An extend that failed mid-flight is never resent (the server may have
applied it); the session is rebuilt from the prefixes instead, which is always correct.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import torch
from pydantic import BaseModel

from shared import codec
from shared.fingerprint import tokenizer_fingerprint
from shared.protocol import (
    ErrorCode,
    LogprobDtype,
    ModelInfo,
    ScoreRequest,
    ScoreResponse,
    SessionCreateRequest,
    SessionExtendRequest,
    SessionStep,
)
from student_trainer.topk import TeacherTopK

_RETRY_STATUS = {429, 502, 503, 504}
_TRANSPORT_ERRORS = (httpx.TransportError,)


class TeacherError(RuntimeError):
    """The teacher answered with an error (or could not be reached after every retry)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.field = status, code, field


class TokenizerMismatch(TeacherError):
    pass


@dataclass
class ScoredSequence:
    """Positions start..L-1 of one sequence; row i is the distribution after ids[:start+i+1]."""

    start: int
    topk: TeacherTopK
    next_token_logprobs: torch.Tensor  # (n-1,)
    token_logprobs: torch.Tensor | None  # (n, m)
    logprobs: torch.Tensor | None  # (n, V)


def _tensor(arr: np.ndarray | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    return None if arr is None else torch.from_numpy(np.array(arr)).to(dtype)


def _topk(ids: np.ndarray, lps: np.ndarray, tail: np.ndarray) -> TeacherTopK:
    return TeacherTopK(_tensor(ids, torch.long), _tensor(lps), _tensor(tail))  # type: ignore[arg-type]


class TeacherClient:
    def __init__(self, url: str, client_id: str = "trainer", timeout: float = 120.0, retries: int = 6,
                 backoff_s: float = 0.5, max_backoff_s: float = 10.0, api_key: str | None = None,
                 binary: bool = True) -> None:
        headers = {"x-client-id": client_id}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.media = codec.MSGPACK if binary else codec.JSON
        headers["accept"] = self.media
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.url = url

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- transport ----------------------------------------------------------------------
    async def _request(self, method: str, path: str, body: BaseModel | None = None,
                       retry_transport: bool = True) -> httpx.Response:
        content = codec.encode(body, self.media) if body is not None else None
        headers = {"content-type": self.media} if body is not None else {}
        for attempt in range(self.retries + 1):
            delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
            try:
                resp = await self._http.request(method, path, content=content, headers=headers)
            except _TRANSPORT_ERRORS as exc:
                if not retry_transport or attempt == self.retries:
                    raise TeacherError(f"teacher at {self.url} unreachable: {exc!r}") from exc
                await asyncio.sleep(delay)
                continue
            if resp.status_code in _RETRY_STATUS and attempt < self.retries:
                retry_after = resp.headers.get("retry-after")
                await asyncio.sleep(float(retry_after) if retry_after and retry_after.isdigit() else delay)
                continue
            if resp.status_code >= 400:
                raise self._error(resp)
            return resp
        raise AssertionError("unreachable")

    def _error(self, resp: httpx.Response) -> TeacherError:
        try:
            err = resp.json()["error"]
            return TeacherError(f"teacher {resp.status_code} {err['code']}: {err['message']}",
                                resp.status_code, err["code"], err.get("field"))
        except (ValueError, KeyError, TypeError):
            return TeacherError(f"teacher {resp.status_code}: {resp.text[:300]}", resp.status_code)

    def _decode(self, resp: httpx.Response, model_type: type[Any]) -> Any:
        media = codec.media_type_of(resp.headers.get("content-type")) or codec.JSON
        return codec.decode(resp.content, model_type, media)

    # ---- API ----------------------------------------------------------------------------
    async def wait_ready(self, timeout_s: float = 300.0) -> ModelInfo:
        """Poll /ready until the model is loaded (the server may still be starting)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                resp = await self._http.get("/ready")
                if resp.status_code == 200:
                    return await self.model_info()
            except _TRANSPORT_ERRORS:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TeacherError(f"teacher at {self.url} not ready after {timeout_s:.0f}s")
            await asyncio.sleep(0.25)

    async def model_info(self) -> ModelInfo:
        return ModelInfo.model_validate_json((await self._request("GET", "/v1/model")).content)

    async def check_tokenizer(self, tokenizer: Any) -> ModelInfo:
        """Refuse to train when student and teacher token ids would mean different strings."""
        info = await self.model_info()
        mine = tokenizer_fingerprint(tokenizer)
        if mine != info.tokenizer_fingerprint:
            raise TokenizerMismatch(
                f"tokenizer mismatch: the student's tokenizer fingerprint is {mine} but the teacher "
                f"{info.model!r} at {self.url} uses {info.tokenizer_fingerprint}. Distillation needs one "
                "shared vocabulary: load the student with the teacher's tokenizer.")
        return info

    async def score(self, sequences: Sequence[Sequence[int]], start: int | Sequence[int] = 0, top_k: int = 20,
                    token_ids: Sequence[int] | None = None, full: bool = False,
                    logprob_dtype: LogprobDtype = "float32") -> list[ScoredSequence]:
        req = ScoreRequest(sequences=[list(map(int, s)) for s in sequences],
                           start=start if isinstance(start, int) else list(start), top_k=top_k,
                           token_ids=list(token_ids) if token_ids is not None else None, full=full,
                           logprob_dtype=logprob_dtype)
        out: ScoreResponse = self._decode(await self._request("POST", "/v1/score", req), ScoreResponse)
        return [ScoredSequence(r.start, _topk(r.top_ids, r.top_logprobs, r.tail_logprob),
                               _tensor(r.next_token_logprobs), _tensor(r.token_logprobs), _tensor(r.logprobs))
                for r in out.results]

    async def open_session(self, prompts: Sequence[Sequence[int]], top_k: int = 20) -> TeacherSession:
        session = TeacherSession(self, [list(map(int, p)) for p in prompts], top_k)
        await session.open()
        return session

    async def _session_call(self, path: str, body: BaseModel) -> SessionStep:
        return self._decode(await self._request("POST", path, body, retry_transport=False), SessionStep)


class TeacherSession:
    """A server-side KV cache over `prefixes`; `extend` returns the teacher's next-token top-k."""

    def __init__(self, client: TeacherClient, prefixes: list[list[int]], top_k: int) -> None:
        self.client, self.prefixes, self.top_k = client, prefixes, top_k
        self.session_id: str | None = None
        self.first: TeacherTopK | None = None
        self.rebuilds = 0

    async def open(self) -> TeacherTopK:
        """(Re)create the session from the full prefixes; returns every row's next-token top-k."""
        req = SessionCreateRequest(sequences=self.prefixes, top_k=self.top_k)
        for attempt in range(self.client.retries + 1):
            try:
                step = await self.client._session_call("/v1/sessions", req)
                break
            except TeacherError as exc:
                if exc.status is not None or attempt == self.client.retries:
                    raise
                await asyncio.sleep(min(self.client.max_backoff_s, self.client.backoff_s * 2**attempt))
        self.session_id = step.session_id
        self.first = _topk(step.top_ids, step.top_logprobs, step.tail_logprob)
        return self.first

    async def extend(self, tokens: Sequence[Sequence[int]], rows: Sequence[int] | None = None) -> TeacherTopK:
        """Append tokens to `rows` (default all) and return those rows' next-token top-k, in order."""
        rows = list(range(len(self.prefixes))) if rows is None else list(rows)
        tokens = [list(map(int, t)) for t in tokens]
        req = SessionExtendRequest(tokens=tokens, rows=rows)
        for row, toks in zip(rows, tokens, strict=True):
            self.prefixes[row].extend(toks)
        try:
            step = await self.client._session_call(f"/v1/sessions/{self.session_id}/extend", req)
            if step.lengths == [len(self.prefixes[r]) for r in rows]:
                return _topk(step.top_ids, step.top_logprobs, step.tail_logprob)
        except TeacherError as exc:
            if exc.status is not None and exc.code != ErrorCode.SESSION_NOT_FOUND:
                raise
        self.rebuilds += 1  # lost, expired, or out of step with our prefixes: start again from them
        full = await self.open()
        index = torch.tensor(rows, dtype=torch.long)
        return TeacherTopK(full.ids[index], full.logprobs[index], full.tail_logprob[index])

    async def close(self) -> None:
        if self.session_id is None:
            return
        try:
            await self.client._request("DELETE", f"/v1/sessions/{self.session_id}", retry_transport=False)
        except TeacherError:
            pass  # already gone: the TTL would have freed it anyway
        self.session_id = None
