"""Sampling a rollout: the student decodes, a behavior policy picks each token, the teacher's top-k is kept.

Each step's teacher `extend` is sent before the student's forward for the same new tokens runs,
so the teacher's latency hides behind student compute (docs/performance.md, target 4).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import fields
from typing import Any, TypeVar

import torch

from decoders.choose import make_decoder
from student_trainer.methods.behaviors import Behavior, StepDiagnostics
from student_trainer.methods.row_generators import Generator, rows_of
from student_trainer.rollouts.rollout import Rollout
from student_trainer.rollouts.targets import TargetStream, place, route
from student_trainer.teacher.client import TeacherClient

T = TypeVar("T")


async def generate(student: torch.nn.Module, prompts: list[list[int]], behavior: Behavior, eps: float,
                   teacher: TeacherClient | None, top_k: int, max_new_tokens: int, eos_id: int, pad_id: int,
                   generator: Generator, overlap: bool = True, decoder: str = "auto",
                   stream_chunk: int = 0) -> Rollout:
    """Sample one response per prompt under `behavior` at budget `eps`.

    `generator` is one stream for the batch, or a `RowGenerators` with one stream per prompt (rows
    then sample the same tokens however the batch is split).

    With `overlap`, each step's teacher request goes out before the student's forward runs, so the
    server computes while the student does; the student runs inline (no worker thread), because
    the tiny forward and the HTTP client would otherwise take turns on the GIL.

    Its targets come by the route `targets.route` picks: the session the behavior samples with, a
    `TargetStream` of `stream_chunk` tokens at a time, or none here (`targets.score_targets` afterwards).
    """
    how = route(behavior, eps, teacher, stream_chunk, max_new_tokens)
    use_teacher = how == "session"
    batch = len(prompts)
    decoder = make_decoder(student, pad_id, capacity=max(map(len, prompts)) + max_new_tokens, kind=decoder)
    session_task = await _send(teacher.open_session(prompts, top_k), overlap) if use_teacher else None
    stream = None
    if how == "stream":
        stream = TargetStream(teacher, batch, max_new_tokens, top_k, lambda request: _send(request, overlap))
        await stream.open(prompts)
    logits_A_V = decoder.prefill(prompts)
    session = await session_task if session_task else None
    streamed = None
    topk_A = session.first if session else None

    new_tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long)
    target_ids = torch.zeros((batch, max_new_tokens, top_k), dtype=torch.long)
    target_lps = torch.zeros((batch, max_new_tokens, top_k))
    target_tail = torch.zeros((batch, max_new_tokens))
    lengths = torch.zeros(batch, dtype=torch.long)
    active = torch.arange(batch)
    diagnostics: list[tuple[torch.Tensor, StepDiagnostics]] = []
    try:
        for t in range(max_new_tokens):
            # The student may sit on a GPU; teacher targets and the rollout's buffers stay on the CPU.
            topk_dev = topk_A.to(logits_A_V.device) if topk_A is not None else None
            tokens_A, diag = behavior.sample(logits_A_V, topk_dev, eps, rows_of(generator, active))
            tokens_A = tokens_A.cpu()  # the step's one host sync: the teacher request needs the tokens
            diagnostics.append((active, diag))
            new_tokens[active, t] = tokens_A
            lengths[active] += 1
            if topk_A is not None:
                target_ids[active, t], target_lps[active, t] = topk_A.ids, topk_A.logprobs
                target_tail[active, t] = topk_A.tail()
            keep = tokens_A != eos_id
            active, tokens_A = active[keep], tokens_A[keep]
            if len(active) == 0 or t == max_new_tokens - 1:
                break
            rows, toks = active.tolist(), [[x] for x in tokens_A.tolist()]
            pending = await _send(session.extend(toks, rows), overlap) if session is not None else None
            if stream is not None:
                stream.add(rows, toks)
                if (t + 1) % stream_chunk == 0:
                    await stream.flush()
            logits_A_V = decoder.extend(rows, toks)
            if pending is not None:
                topk_A = await pending
        streamed = await stream.finish() if stream is not None else None
    finally:
        if session is not None:
            await session.close()
        if stream is not None:
            await stream.close()

    rollout = Rollout.of_responses(prompts, new_tokens, lengths, pad_id)
    rollout.diagnostics = _to_host(diagnostics)
    rollout.teacher_rebuilds = session.rebuilds if session else stream.rebuilds if stream else 0
    targets = (target_ids, target_lps, target_tail) if use_teacher else \
        (streamed.ids, streamed.logprobs, streamed.tail_logprob) if streamed is not None else None
    if targets is not None:
        width, p = int(lengths.max()), rollout.prompt_width
        rollout.targets = place(*(x[:, :width] for x in targets), p, rollout.tokens_B_T.shape[1])
    return rollout


def _to_host(diagnostics: list[tuple[torch.Tensor, StepDiagnostics]]) -> list[tuple[torch.Tensor, StepDiagnostics]]:
    """Per-step diagnostics kept on the student's device during the rollout, copied in one go."""
    if not diagnostics:
        return []
    sizes = [len(rows) for rows, _ in diagnostics]
    columns = [torch.cat([getattr(d, f.name) for _, d in diagnostics]).cpu().split(sizes)
               for f in fields(StepDiagnostics)]
    return [(rows, StepDiagnostics(*(c[i] for c in columns))) for i, (rows, _) in enumerate(diagnostics)]


async def _send(request: Coroutine[Any, Any, T], overlap: bool) -> asyncio.Future[T]:
    """Start a teacher request; with `overlap`, return once it is on the wire, else once answered.

    httpx needs a few event-loop turns to write a request (4 with httpx 0.28); 8 are given.
    """
    future = asyncio.ensure_future(request)
    if overlap:
        for _ in range(8):
            await asyncio.sleep(0)
    else:
        await asyncio.wait([future])
    return future
