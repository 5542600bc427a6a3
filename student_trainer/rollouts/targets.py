"""How a rollout gets the teacher's targets: the decision, the three routes, and their fallbacks.

Every response position needs the teacher's top-k at its prefix (the loss's target). `route` picks how:

    "session"  the behavior needs the teacher to pick each token (TRB at ε > 0, fixed_eps, SKD, the
               warmups' teacher rollouts): a decoding session, one `extend` per generated token, whose
               answers are the targets. Fallback: a session the server lost (restart, TTL, memory cap;
               404) is rebuilt from `/v1/score` over the prefixes so far (`TeacherSession.extend`,
               teacher/client.py); other errors fail the step, which the client's retries cover.
    "stream"   a student-only rollout (OPD, TRB at ε = 0, Veto): the sampled tokens are sent through a
               session `chunk` tokens at a time (`SessionExtendRequest.all_positions`), so the teacher
               scores chunk c while the student samples chunk c+1 and the step waits only for the last
               chunk (`TargetStream`). Fallback: a failed request leaves the rollout without targets and
               it takes the "score" route; a refusal (a teacher without sessions, such as vLLM, or one
               over its session memory cap) also turns streaming off for the client's later rollouts.
    "score"    one `/v1/score` call for the finished batch (`score_targets`): `teacher.stream_chunk_tokens`
               is 0, the rollout is at most one chunk long, or streaming was turned off.

A row's token is streamed once the row samples another one after it: the distribution after a row's
last token (its EOS, or the last step) is never a target. The routes give the same distributions (a
KV-cached forward instead of a full one: equal to float rounding).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal

import torch

from shared.protocol import ErrorCode
from student_trainer.methods.behaviors import Behavior
from student_trainer.methods.topk import TeacherTopK
from student_trainer.rollouts.rollout import Rollout
from student_trainer.teacher.client import TeacherClient, TeacherError, TeacherSession

log = logging.getLogger(__name__)

Route = Literal["session", "stream", "score"]
Send = Callable[[Coroutine[Any, Any, Any]], Awaitable[asyncio.Future]]


def route(behavior: Behavior, eps: float, teacher: TeacherClient | None, stream_chunk: int,
          max_new_tokens: int) -> Route:
    """How this rollout gets its targets (the module docstring says why each route)."""
    if behavior.needs_teacher(eps):
        if teacher is None:
            raise ValueError(f"behavior {behavior.name!r} at eps={eps} needs a teacher client")
        return "session"
    if teacher is not None and 0 < stream_chunk < max_new_tokens and teacher.stream_targets:
        return "stream"
    return "score"


def refused(exc: TeacherError) -> bool:
    """Would the next rollout's stream fail the same way? A 422 for the field or for sessions (a server
    from before `all_positions`, the vLLM backend), or a session over the server's memory cap (413)."""
    return (exc.status == 422 and exc.code in (ErrorCode.INVALID_REQUEST, ErrorCode.UNSUPPORTED)) or (
        exc.status == 413 and exc.code == ErrorCode.TOO_LARGE)


class TargetStream:
    """Per-row targets (B, N, K) of a rollout of at most N new tokens, filled chunk by chunk."""

    def __init__(self, client: TeacherClient, batch: int, max_new_tokens: int, top_k: int, send: Send) -> None:
        self.client, self.top_k, self._send = client, top_k, send
        self.ids = torch.zeros((batch, max_new_tokens, top_k), dtype=torch.long)
        self.logprobs = torch.zeros((batch, max_new_tokens, top_k))
        self.tail = torch.zeros((batch, max_new_tokens))
        self.session: TeacherSession | None = None
        self.failed = False
        self._unsent: list[list[int]] = [[] for _ in range(batch)]
        self._sent = [0] * batch  # a row's tokens already sent: its next entry is target sent + 1
        self._opening: asyncio.Future | None = None  # the session's prefill, until the first chunk awaits it
        self._pending: tuple[asyncio.Future, list[int], list[int], list[int]] | None = None  # answer, rows, n, offset

    @property
    def rebuilds(self) -> int:
        """Times the session was lost and rebuilt (`TeacherSession.extend`)."""
        return self.session.rebuilds if self.session is not None else 0

    async def open(self, prompts: list[list[int]]) -> None:
        """Send the session's prefill (the targets of every row's first token); its answer is awaited
        by the first chunk, so sampling starts at once."""
        self._opening = await self._guard(self._send(self.client.open_session(prompts, self.top_k)))

    async def _opened(self) -> None:
        request, self._opening = self._opening, None
        if request is not None and (session := await self._guard(request)) is not None:
            self.session, first = session, session.first
            self.ids[:, 0], self.logprobs[:, 0], self.tail[:, 0] = first.ids, first.logprobs, first.tail()

    def add(self, rows: list[int], tokens: list[list[int]]) -> None:
        """Tokens just sampled by `rows` that will be followed by another token of theirs."""
        for row, toks in zip(rows, tokens, strict=True):
            self._unsent[row] += toks

    async def flush(self) -> None:
        """Collect the previous chunk's answer (or the session), then send the tokens gathered since."""
        await self._opened()
        await self._collect()
        rows = [r for r, toks in enumerate(self._unsent) if toks]
        if self.failed or self.session is None or not rows:
            return
        tokens = [self._unsent[r] for r in rows]
        offsets = [self._sent[r] for r in rows]
        for r, toks in zip(rows, tokens, strict=True):
            self._sent[r] += len(toks)
            self._unsent[r] = []
        request = await self._guard(self._send(self.session.extend(tokens, rows, all_positions=True)))
        if request is not None:
            self._pending = (request, rows, [len(t) for t in tokens], offsets)

    async def finish(self) -> TeacherTopK | None:
        """Send what is left and wait for every answer; the (B, N, K) targets, or None if it failed."""
        await self.flush()
        await self._collect()
        return None if self.failed else TeacherTopK(self.ids, self.logprobs, self.tail)

    async def close(self) -> None:
        """Close the session, after the requests still in flight (an error ended the rollout) land."""
        in_flight = [f for f in (self._opening, self._pending and self._pending[0]) if f is not None]
        await asyncio.gather(*in_flight, return_exceptions=True)
        if self._opening is not None and not self._opening.cancelled() and self._opening.exception() is None:
            self.session = self._opening.result()
        self._opening = self._pending = None
        if self.session is not None:
            await self.session.close()

    async def _collect(self) -> None:
        if self._pending is None:
            return
        request, rows, counts, offsets = self._pending
        self._pending = None
        answer = await self._guard(request)
        if answer is None:
            return
        at, tail = 0, answer.tail()
        for row, n, offset in zip(rows, counts, offsets, strict=True):
            where = slice(offset + 1, offset + 1 + n)  # the entry after token j is the target of token j + 1
            self.ids[row, where], self.logprobs[row, where] = answer.ids[at : at + n], answer.logprobs[at : at + n]
            self.tail[row, where] = tail[at : at + n]
            at += n

    async def _guard(self, request: Awaitable[Any]) -> Any:
        """`await request`, or None once the stream has failed (the rollout then scores afterwards)."""
        try:
            result = await request
        except TeacherError as exc:
            if not self.failed and refused(exc):
                self.client.stream_targets = False
                log.warning("the teacher refused a streamed-targets session (%s); rollouts score their targets "
                            "after sampling from now on", exc)
            self.failed, result = True, None
        return None if self.failed else result


def place(ids_B_N_K: torch.Tensor, lps_B_N_K: torch.Tensor, tail_B_N: torch.Tensor, p: int, total: int) -> TeacherTopK:
    """Put per-step targets at their logit positions p-1 .. p-1+N-1 of a (B, total) layout."""
    batch, n, k = ids_B_N_K.shape
    ids = torch.zeros((batch, total, k), dtype=torch.long)
    lps = torch.zeros((batch, total, k))
    tail = torch.zeros((batch, total))
    ids[:, p - 1 : p - 1 + n], lps[:, p - 1 : p - 1 + n], tail[:, p - 1 : p - 1 + n] = ids_B_N_K, lps_B_N_K, tail_B_N
    return TeacherTopK(ids, lps, tail)


async def score_targets(rollout: Rollout, teacher: TeacherClient, top_k: int, pad_id: int) -> TeacherTopK:
    """One `/v1/score` call for a finished batch: the teacher at every loss position."""
    p, n_max = rollout.prompt_width, int(rollout.response_lens_B.max())
    sequences, starts = [], []
    for b in range(rollout.tokens_B_T.shape[0]):
        real = rollout.attention_mask_B_T[b].bool()
        seq = rollout.tokens_B_T[b][real].tolist()
        n = int(rollout.response_lens_B[b])
        sequences.append(seq[:-1])  # the distribution after the last token is never a target
        starts.append(len(seq) - n - 1)
    scored = await teacher.score(sequences, start=starts, top_k=top_k)
    batch = len(sequences)
    ids = torch.zeros((batch, n_max, top_k), dtype=torch.long)
    lps, tail = torch.zeros((batch, n_max, top_k)), torch.zeros((batch, n_max))
    for b, s in enumerate(scored):
        n = s.topk.ids.shape[0]
        ids[b, :n], lps[b, :n], tail[b, :n] = s.topk.ids, s.topk.logprobs, s.topk.tail()
    return place(ids, lps, tail, p, rollout.tokens_B_T.shape[1])
