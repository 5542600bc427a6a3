"""Rollouts: the student generates, a behavior policy picks each token, the teacher's top-k is kept.

Layout of a batch (B rows, prompts left-padded to width P):

    column   0 .. P-1         P .. P+n-1              P+n ..
    tokens   pad.. prompt     response (EOS incl.)    pad

Position p of the student's logits predicts column p+1, so the loss positions of a row are
P-1 .. P+n-2 (`loss_mask_B_T`), and `targets` holds the teacher's top-k at exactly those
positions: the one the behavior sampled from when the teacher was asked during the rollout
(docs/method.md §6), or for pure-student rollouts the teacher's answers to chunks of the response sent
while it is sampled (streamed_targets.py), else one `/v1/score` call per batch afterwards.

Each step's teacher `extend` is sent before the student's forward for the same new tokens runs,
so the teacher's latency hides behind student compute (docs/performance.md, target 4).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import torch

from shared.static_decode import make_decoder
from student_trainer.behaviors import Behavior, StepDiagnostics
from student_trainer.row_generators import Generator, rows_of
from student_trainer.streamed_targets import TargetStream
from student_trainer.teacher_client import TeacherClient
from student_trainer.topk import TeacherTopK, scored_logprob_of

T = TypeVar("T")


@dataclass
class Rollout:
    tokens_B_T: torch.Tensor  # long
    attention_mask_B_T: torch.Tensor  # long, 1 on prompt and response tokens
    loss_mask_B_T: torch.Tensor  # bool, positions whose next token is a response token
    prompt_width: int
    response_lens_B: torch.Tensor  # long
    targets: TeacherTopK | None = None  # (B, T, K) at loss positions; garbage elsewhere
    diagnostics: list[tuple[torch.Tensor, StepDiagnostics]] = field(default_factory=list)  # (rows, diag)
    teacher_rebuilds: int = 0

    def rows(self, start: int, stop: int) -> Rollout:
        """Rows start..stop-1 as a batch of their own (a backward micro-batch), without the columns
        that are padding in every one of them; targets and masks move with their columns."""
        real_T = self.attention_mask_B_T[start:stop].bool().any(0)
        cols = real_T.nonzero().squeeze(-1)
        first, last = int(cols[0]), int(cols[-1]) + 1
        targets = None
        if self.targets is not None:
            t = self.targets
            tail = None if t.tail_logprob is None else t.tail_logprob[start:stop, first:last]
            targets = TeacherTopK(t.ids[start:stop, first:last], t.logprobs[start:stop, first:last], tail)
        return Rollout(self.tokens_B_T[start:stop, first:last], self.attention_mask_B_T[start:stop, first:last],
                       self.loss_mask_B_T[start:stop, first:last], self.prompt_width - first,
                       self.response_lens_B[start:stop], targets)

    def responses(self) -> list[list[int]]:
        p = self.prompt_width
        return [self.tokens_B_T[b, p : p + int(n)].tolist() for b, n in enumerate(self.response_lens_B)]


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    return ids, mask


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

    A behavior that needs no teacher gets its targets through a `TargetStream`, `stream_chunk`
    tokens at a time, while it samples (0, or a rollout of at most one chunk, which would gain
    nothing but two requests: no targets here; the caller scores afterwards).
    """
    use_teacher = behavior.needs_teacher(eps)
    if use_teacher and teacher is None:
        raise ValueError(f"behavior {behavior.name!r} at eps={eps} needs a teacher client")
    batch = len(prompts)
    decoder = make_decoder(student, pad_id, capacity=max(map(len, prompts)) + max_new_tokens, kind=decoder)
    session_task = await _send(teacher.open_session(prompts, top_k), overlap) if use_teacher else None
    stream = None
    if not use_teacher and teacher is not None and 0 < stream_chunk < max_new_tokens and teacher.stream_targets:
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

    width = int(lengths.max())
    prompt_ids, prompt_mask = _left_pad(prompts, pad_id)
    p = prompt_ids.shape[1]
    response_mask = torch.arange(width)[None, :] < lengths[:, None]
    tokens = torch.cat([prompt_ids, new_tokens[:, :width]], dim=1)
    attention = torch.cat([prompt_mask, response_mask.long()], dim=1)
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss_mask[:, p - 1 : p - 1 + width] = response_mask
    rollout = Rollout(tokens, attention, loss_mask, p, lengths, diagnostics=_to_host(diagnostics),
                      teacher_rebuilds=session.rebuilds if session else stream.rebuilds if stream else 0)
    if use_teacher:
        rollout.targets = _place(target_ids[:, :width], target_lps[:, :width], target_tail[:, :width], p,
                                 tokens.shape[1])
    elif streamed is not None:
        rollout.targets = _place(streamed.ids[:, :width], streamed.logprobs[:, :width],
                                 streamed.tail_logprob[:, :width], p, tokens.shape[1])
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


def _place(ids_B_N_K: torch.Tensor, lps_B_N_K: torch.Tensor, tail_B_N: torch.Tensor, p: int, total: int) -> TeacherTopK:
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
    return _place(ids, lps, tail, p, rollout.tokens_B_T.shape[1])


def sampled_teacher_logprob(rollout: Rollout) -> tuple[float, int]:
    """(sum, count) of log π_T of the rollout's sampled response tokens, from its teacher targets
    (`scored_logprob_of`): how likely the teacher finds the prefixes it is asked to supervise."""
    if rollout.targets is None:
        return 0.0, 0
    mask_B_T = rollout.loss_mask_B_T[:, :-1]  # targets at t describe the token at t + 1
    t = rollout.targets
    tail = None if t.tail_logprob is None else t.tail_logprob[:, :-1][mask_B_T]
    topk = TeacherTopK(t.ids[:, :-1][mask_B_T], t.logprobs[:, :-1][mask_B_T], tail)
    lp_N = scored_logprob_of(topk, rollout.tokens_B_T[:, 1:][mask_B_T])
    return float(lp_N.sum()), int(lp_N.numel())


def summarize(diagnostics: list[tuple[torch.Tensor, StepDiagnostics]]) -> dict[str, Any]:
    """Token-level means and quantiles of the behavior diagnostics for logging."""
    if not diagnostics:
        return {}
    beta = torch.cat([d.beta for _, d in diagnostics]).float()
    kl = torch.cat([d.kl_to_student for _, d in diagnostics]).float()
    used = torch.cat([d.teacher_used for _, d in diagnostics]).float()
    tlp = torch.cat([d.teacher_logprob for _, d in diagnostics]).float()
    out: dict[str, Any] = {"teacher_used": used.mean().item()}
    finite_beta = beta[~beta.isnan()]
    if len(finite_beta):
        q = torch.quantile(finite_beta, torch.tensor([0.1, 0.5, 0.9]))
        # beta_one: the share of positions where the teacher itself lies inside the ball (no blending needed).
        out.update(beta_mean=finite_beta.mean().item(), beta_p10=q[0].item(), beta_p50=q[1].item(),
                   beta_p90=q[2].item(), beta_one=(finite_beta >= 1.0).float().mean().item())
    for name, x in (("kl_mu_student", kl), ("teacher_logprob", tlp)):
        x = x[~x.isnan()]
        if len(x):
            out[name] = x.mean().item()
    return out
