"""Async client of the teacher server: msgpack on the wire, `TeacherTopK` tensors out.

It retries what is safe to retry (connection errors, 503 and 429, honouring Retry-After), and it
keeps every session's full prefixes so a session lost to a restart, an eviction or a TTL is
rebuilt transparently. An extend that failed mid-flight is never resent (the server may have
applied it); the session is rebuilt from the prefixes instead, which is always correct.

Given several URLs (replicas of one teacher), each request goes to the least-loaded healthy
replica: fewest requests in flight from this client, then fewest sent. A replica that fails a
connection is marked down and left alone until a /health probe, after an exponential backoff,
finds it up again (with the tokenizer fingerprint checked again). A session lives on one replica,
so its extends go there; if that replica dies, the session is rebuilt on another from its prefixes.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable, Sequence
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
from student_trainer.config import TeacherCfg
from student_trainer.methods.topk import TeacherTopK

_RETRY_STATUS = {429, 502, 503, 504}  # never a 4xx: a 422 `quarantined` request would crash the teacher again
_TRANSPORT_ERRORS = (httpx.TransportError,)


def _unreachable(exc: httpx.TransportError) -> str:
    """One line on a connection failure, with the usual cause of the common one."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ConnectionRefusedError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return "connection refused (nothing listens there yet; a teacher still loading its model does not)"
    return f"cannot connect ({type(exc).__name__}: {exc or 'no detail'})"


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


@dataclass(eq=False)
class Replica:
    """One teacher server as this client sees it: its connections, its load, its health."""

    url: str
    http: httpx.AsyncClient
    in_flight: int = 0
    requests: int = 0
    failures: int = 0  # consecutive connection failures
    down_until: float | None = None  # loop time of the next health probe; None while up
    probe: asyncio.Task | None = None

    @property
    def up(self) -> bool:
        return self.down_until is None


class TeacherClient:
    def __init__(self, url: str | Sequence[str], client_id: str = "trainer", timeout: float = 120.0,
                 retries: int = 6, backoff_s: float = 0.5, max_backoff_s: float = 10.0, api_key: str | None = None,
                 binary: bool = True, retry_for_s: float = 0.0) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("TeacherClient needs at least one teacher URL")
        self.client_id = client_id  # a producer process opens its own client under the same id (fair share)
        headers = {"x-client-id": client_id}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.media = codec.MSGPACK if binary else codec.JSON
        headers["accept"] = self.media
        self.replicas = [Replica(u.rstrip("/"), httpx.AsyncClient(base_url=u.rstrip("/"), headers=headers,
                                                                  timeout=timeout)) for u in urls]
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.retry_for_s = retry_for_s  # keep retrying past `retries` until this long after the first failure
        self.url = ", ".join(r.url for r in self.replicas)
        self._fingerprint: str | None = None  # the student's, once check_tokenizer has passed
        self.stream_targets = True  # False once a server refused a streamed-targets session (rollouts/targets.py)

    @classmethod
    def for_run(cls, cfg: TeacherCfg, urls: Sequence[str], client_id: str) -> TeacherClient:
        """A trainer's client of one teacher, with the run's timeouts, retries and key."""
        return cls(urls, client_id=client_id, timeout=cfg.timeout_s, retries=cfg.retries,
                   retry_for_s=cfg.retry_for_s, api_key=cfg.api_key)

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for r in self.replicas:
            if r.probe is not None:
                r.probe.cancel()
            await r.http.aclose()

    def requests_per_replica(self) -> dict[str, int]:
        """Requests sent to each replica so far (each retry counts; health probes do not)."""
        return {r.url: r.requests for r in self.replicas}

    # ---- routing ------------------------------------------------------------------------
    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _pick(self) -> Replica:
        """The least-loaded replica that is up; with none up, the one due for a probe first."""
        for r in self.replicas:
            if not r.up and r.probe is None and self._now() >= r.down_until:
                r.probe = asyncio.create_task(self._probe(r))
        up = [r for r in self.replicas if r.up]
        if up:
            return min(up, key=lambda r: (r.in_flight, r.requests))
        return min(self.replicas, key=lambda r: r.down_until)

    def _mark_down(self, r: Replica) -> None:
        r.failures += 1
        r.down_until = self._now() + min(self.max_backoff_s, self.backoff_s * 2 ** (r.failures - 1))

    def _mark_up(self, r: Replica) -> None:
        r.failures, r.down_until = 0, None

    async def _probe(self, r: Replica) -> None:
        """Back into rotation if /ready answers and the tokenizer still matches; else back off more."""
        try:
            healthy = (await r.http.get("/ready", timeout=5.0)).status_code == 200
            if healthy and self._fingerprint is not None:
                resp = await r.http.get("/v1/model", timeout=5.0)
                healthy = resp.status_code == 200 and \
                    ModelInfo.model_validate_json(resp.content).tokenizer_fingerprint == self._fingerprint
        except (httpx.TransportError, ValueError):
            healthy = False
        r.probe = None
        if healthy:
            self._mark_up(r)
        else:
            self._mark_down(r)

    async def _pause(self, delay: float) -> None:
        """Back off before a retry, unless another replica is up to take it at once."""
        if not any(r.up for r in self.replicas):
            await asyncio.sleep(delay)

    # ---- transport ----------------------------------------------------------------------
    async def _request(self, method: str, path: str, body: BaseModel | None = None,
                       retry_transport: bool = True, replica: Replica | None = None) -> tuple[httpx.Response, Replica]:
        """Send to `replica`, or route each attempt; returns the answer and the replica that gave it."""
        content = codec.encode(body, self.media) if body is not None else None
        headers = {"content-type": self.media} if body is not None else {}
        started = self._now()
        for attempt in itertools.count():
            last = not self.may_retry(attempt, started)
            delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
            target = replica or self._pick()
            target.in_flight += 1
            target.requests += 1
            try:
                resp = await target.http.request(method, path, content=content, headers=headers)
            except _TRANSPORT_ERRORS as exc:
                self._mark_down(target)
                if not retry_transport or last:
                    raise TeacherError(f"teacher at {target.url} unreachable: {exc!r}") from exc
                await (asyncio.sleep(delay) if replica else self._pause(delay))
                continue
            finally:
                target.in_flight -= 1
            self._mark_up(target)
            if resp.status_code in _RETRY_STATUS and not last:
                retry_after = resp.headers.get("retry-after")
                await asyncio.sleep(float(retry_after) if retry_after and retry_after.isdigit() else delay)
                continue
            if resp.status_code >= 400:
                raise self._error(resp)
            return resp, target
        raise AssertionError("unreachable")

    def may_retry(self, attempt: int, started: float) -> bool:
        """Another try after `attempt` failed ones: within `retries`, or within `retry_for_s` of the first
        try (an engine behind the teacher takes a minute or more to restart)."""
        return attempt < self.retries or self._now() - started < self.retry_for_s

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
    async def wait_ready(self, timeout_s: float = 300.0, report: Callable[[str], None] | None = None,
                         first_report_s: float = 2.0, report_every_s: float = 10.0) -> ModelInfo:
        """Poll /ready until every replica has loaded the model (servers may still be starting).

        Waiting is right while a server loads (compose starts it with the trainer), but not in
        silence: after `first_report_s`, and then every `report_every_s`, `report` gets what is
        awaited and why. A refused API key or a URL that is no teacher fails at once.
        """
        deadline = self._now() + timeout_s
        infos = await asyncio.gather(*(self._wait_one(r, deadline, timeout_s, report, first_report_s,
                                                      report_every_s) for r in self.replicas))
        return infos[0]

    async def _wait_one(self, r: Replica, deadline: float, timeout_s: float, report: Callable[[str], None] | None,
                        first_report_s: float, report_every_s: float) -> ModelInfo:
        started = self._now()
        next_report, reported = started + first_report_s, False
        while True:
            try:
                resp = await r.http.get("/ready", timeout=min(5.0, timeout_s))
                if resp.status_code == 200:
                    if reported and report:
                        report(f"teacher at {r.url} is ready after {self._now() - started:.0f}s")
                    return await self.model_info(r)
                why = self._not_ready(r, resp)
            except _TRANSPORT_ERRORS as exc:
                why = _unreachable(exc)
            now = self._now()
            if now > deadline:
                raise TeacherError(f"teacher at {r.url} not ready after {timeout_s:.0f}s: {why}; "
                                   "teacher.ready_timeout_s sets how long to wait")
            if report and now >= next_report:
                report(f"waiting for the teacher at {r.url}: {why} ({now - started:.0f}s of {timeout_s:.0f}s)")
                next_report, reported = now + report_every_s, True
            await asyncio.sleep(0.25)

    def _not_ready(self, r: Replica, resp: httpx.Response) -> str:
        """Why a /ready answer other than 200 is worth waiting out; raises when waiting will not help."""
        err = self._error(resp)
        detail = str(err).removeprefix(f"teacher {resp.status_code} ")
        if resp.status_code in (401, 403):
            what = "the API key" if "authorization" in r.http.headers else "a request without an API key"
            raise TeacherError(f"teacher at {r.url} refused {what} ({resp.status_code} {detail}); set "
                               "teacher.api_key or $TRB_API_KEY to a key the server accepts",
                               resp.status_code, err.code)
        if resp.status_code == 404:
            raise TeacherError(f"teacher at {r.url} has no /ready route (404): is teacher.url a trb-teacher "
                               "server (scheme, host, port, no path)?", 404)
        if resp.status_code == 503:
            return f"503, the server is up but its model is not loaded ({detail})"
        return f"{resp.status_code} {detail}"

    async def model_info(self, replica: Replica | None = None) -> ModelInfo:
        resp, _ = await self._request("GET", "/v1/model", replica=replica)
        return ModelInfo.model_validate_json(resp.content)

    async def check_tokenizer(self, tokenizer: Any) -> ModelInfo:
        """Refuse to train when student and teacher token ids would mean different strings (every replica)."""
        mine = tokenizer_fingerprint(tokenizer)
        infos = [await self.model_info(r) for r in self.replicas]
        for r, info in zip(self.replicas, infos, strict=True):
            if mine != info.tokenizer_fingerprint:
                raise TokenizerMismatch(
                    f"tokenizer mismatch: the student's tokenizer fingerprint is {mine} but the teacher "
                    f"{info.model!r} at {r.url} uses {info.tokenizer_fingerprint}. Distillation needs one "
                    "shared vocabulary: load the student with the teacher's tokenizer.")
        self._fingerprint = mine
        return infos[0]

    async def score(self, sequences: Sequence[Sequence[int]], start: int | Sequence[int] = 0, top_k: int = 20,
                    token_ids: Sequence[int] | None = None, full: bool = False,
                    logprob_dtype: LogprobDtype = "float32") -> list[ScoredSequence]:
        req = ScoreRequest(sequences=[list(map(int, s)) for s in sequences],
                           start=start if isinstance(start, int) else list(start), top_k=top_k,
                           token_ids=list(token_ids) if token_ids is not None else None, full=full,
                           logprob_dtype=logprob_dtype)
        resp, _ = await self._request("POST", "/v1/score", req)
        out: ScoreResponse = self._decode(resp, ScoreResponse)
        return [ScoredSequence(r.start, _topk(r.top_ids, r.top_logprobs, r.tail_logprob),
                               _tensor(r.next_token_logprobs), _tensor(r.token_logprobs), _tensor(r.logprobs))
                for r in out.results]

    async def open_session(self, prompts: Sequence[Sequence[int]], top_k: int = 20) -> TeacherSession:
        session = TeacherSession(self, [list(map(int, p)) for p in prompts], top_k)
        await session.open()
        return session

    async def _session_call(self, path: str, body: BaseModel,
                            replica: Replica | None = None) -> tuple[SessionStep, Replica]:
        resp, where = await self._request("POST", path, body, retry_transport=False, replica=replica)
        return self._decode(resp, SessionStep), where


class TeacherSession:
    """A server-side KV cache over `prefixes`; `extend` returns the teacher's next-token top-k."""

    def __init__(self, client: TeacherClient, prefixes: list[list[int]], top_k: int) -> None:
        self.client, self.prefixes, self.top_k = client, prefixes, top_k
        self.session_id: str | None = None
        self.replica: Replica | None = None  # the server holding it
        self.first: TeacherTopK | None = None
        self.rebuilds = 0

    async def open(self) -> TeacherTopK:
        """(Re)create the session from the full prefixes, on the least-loaded healthy replica;
        returns every row's next-token top-k."""
        req = SessionCreateRequest(sequences=self.prefixes, top_k=self.top_k)
        started = self.client._now()
        for attempt in itertools.count():
            try:
                step, self.replica = await self.client._session_call("/v1/sessions", req)
                break
            except TeacherError as exc:
                if exc.status is not None or not self.client.may_retry(attempt, started):
                    raise
                await self.client._pause(attempt)
        self.session_id = step.session_id
        self.first = _topk(step.top_ids, step.top_logprobs, step.tail_logprob)
        return self.first

    async def extend(self, tokens: Sequence[Sequence[int]], rows: Sequence[int] | None = None,
                     all_positions: bool = False) -> TeacherTopK:
        """Append tokens to `rows` (default all) and return those rows' next-token top-k, in order;
        with `all_positions`, the top-k after every new token, row by row (Σ len(tokens[i]) entries)."""
        rows = list(range(len(self.prefixes))) if rows is None else list(rows)
        tokens = [list(map(int, t)) for t in tokens]
        req = SessionExtendRequest(tokens=tokens, rows=rows, all_positions=all_positions)
        starts = [len(self.prefixes[r]) for r in rows]
        for row, toks in zip(rows, tokens, strict=True):
            self.prefixes[row].extend(toks)
        entries = sum(map(len, tokens)) if all_positions else len(rows)
        try:
            step, _ = await self.client._session_call(f"/v1/sessions/{self.session_id}/extend", req, self.replica)
            if step.lengths == [len(self.prefixes[r]) for r in rows] and len(step.tail_logprob) == entries:
                return _topk(step.top_ids, step.top_logprobs, step.tail_logprob)
        except TeacherError as exc:
            if exc.status is not None and exc.code != ErrorCode.SESSION_NOT_FOUND:
                raise
        self.rebuilds += 1  # lost, expired, its replica gone, or out of step: start again from the prefixes
        if all_positions:  # those positions from /v1/score, then a fresh session for the steps to come
            scored = await self.client.score([self.prefixes[r] for r in rows], start=starts, top_k=self.top_k)
            await self.open()
            return TeacherTopK(torch.cat([s.topk.ids for s in scored]), torch.cat([s.topk.logprobs for s in scored]),
                               torch.cat([s.topk.tail() for s in scored]))
        full = await self.open()
        index = torch.tensor(rows, dtype=torch.long)
        return TeacherTopK(full.ids[index], full.logprobs[index], full.tail_logprob[index])

    async def close(self) -> None:
        if self.session_id is None:
            return
        try:
            await self.client._request("DELETE", f"/v1/sessions/{self.session_id}", retry_transport=False,
                                       replica=self.replica)
        except TeacherError:
            pass  # already gone: the TTL would have freed it anyway
        self.session_id = None
