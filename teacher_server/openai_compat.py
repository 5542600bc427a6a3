"""vLLM's OpenAI-compatible scoring subset: the request and answer models and the pure conversions.

Why this exists: TRL's server-teacher distillation (`VLLMClient.get_sequence_logprobs`), its
AsyncDistillationTrainer (`_score_with_teacher`) and verl all ask a teacher for logprobs in one way,
vLLM's `POST /v1/completions` with token ids, `max_tokens: 1` and `prompt_logprobs: k`. Answering that
request from /v1/score's path lets those trainers share this server without a line changed on their side.

The shape is vLLM 0.32.0's (read in its source, cited in docs/interop.md):
- `choices[i]` answers prompt i; `prompt_logprobs` has one entry per prompt token, entry 0 `null`,
  entry i the distribution after ids[:i] as `{"<id>": {"logprob", "rank", "decoded_token"}}`;
- an entry is built as a dict of the actual token ids[i] first, then the top-k with ranks 1..k
  (`vllm/logprobs.py: append_logprobs_for_next_position`), so an actual token inside the top-k merges
  into its first key with the top-k's rank and an entry holds k or k + 1 keys;
- `-inf` is written as -9999.0 (`clamp_prompt_logprobs`); temperature never changes prompt logprobs;
- there is no entry for after the whole prompt: that distribution gives the one sampled token.

Where we differ, by construction: an actual token outside the top-k gets rank `fetched + 1` (the least
it can be; vLLM counts the whole vocabulary, which a top-k does not hold). Both TRL clients sort an
entry by rank, so any rank above k puts it after the top-k either way. The sampled token is drawn from
the top-k of the last position at the request's temperature, not from the whole vocabulary.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shared.protocol import ScoreRequest, SequenceScores

NEG_INF_AS = -9999.0  # vLLM's stand-in for -inf in JSON
SERVED_FIELDS = ("model", "prompt", "max_tokens", "temperature", "prompt_logprobs", "seed", "n", "stream",
                 "echo", "logprobs", "user")


class CompatError(ValueError):
    """A request outside the served subset: `param` names the field (vLLM's error `param`)."""

    def __init__(self, param: str | None, message: str, status: int = 400) -> None:
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.status = param, status


class CompletionRequest(BaseModel):
    """The fields of vLLM's CompletionRequest that distillation clients send; any other field is refused."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="The served model's id (GET /v1/models); null for the only one.")
    prompt: Any = Field(description="Token ids: one sequence `[ids]` or a batch `[[ids], ...]`, each non-empty.")
    max_tokens: int | None = Field(16, description="Must be 1: the one token sampled after the prompt (vLLM's "
                                   "default of 16 is refused, since this route scores, it does not generate).")
    temperature: float | None = Field(None, ge=0, description="Temperature of the one sampled token (0: greedy). "
                                      "As in vLLM, it never changes prompt_logprobs.")
    prompt_logprobs: int | None = Field(None, description="k: the top-k at every prompt position, plus the actual "
                                        "token; -1 for the whole vocabulary. Required.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="Seed of the sampled token.")
    n: int = Field(1, description="Must be 1.")
    stream: bool | None = Field(False, description="Must be false (vLLM refuses prompt logprobs when streaming).")
    echo: bool | None = Field(False, description="Must be false.")
    logprobs: int | None = Field(None, description="Must be null (logprobs of the sampled token are not served).")
    user: str | None = Field(None, description="Ignored (OpenAI's end-user id).")


class PromptLogprob(BaseModel):
    logprob: float = Field(description="Teacher logprob of this token at this position (-9999.0 for -inf).")
    rank: int = Field(description="1..k for the top-k; for an actual token outside it, fetched top-k + 1.")
    decoded_token: str | None = Field(description="The token's text, detokenized alone.")


class CompletionChoice(BaseModel):
    index: int
    text: str = Field(description="The sampled token's text.")
    logprobs: None = None
    finish_reason: str = Field(description="`length`, or `stop` when the sampled token is the EOS.")
    stop_reason: None = None
    token_ids: None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] = Field(
        description="One entry per prompt token; entry 0 null, entry i the distribution after ids[:i].")
    prompt_token_ids: None = None
    routed_experts: None = None


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int
    prompt_tokens_details: None = None
    completion_tokens_details: None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    service_tier: None = None
    system_fingerprint: None = None
    usage: Usage
    kv_transfer_params: None = None
    ec_transfer_params: None = None
    metrics: None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "vllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int = Field(description="Longest prompt + 1: vLLM's max_model_len leaves room for the one "
                               "sampled token, so the longest prompt is max_model_len - 1 (our max_context).")
    permission: list[dict[str, Any]] = Field(default_factory=list)


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def check_request(req: CompletionRequest) -> list[list[int]]:
    """The prompts as a batch, after refusing what the subset does not serve (naming the field)."""
    if extra := sorted(req.model_extra or {}):
        raise CompatError(extra[0], "not served by this route, which scores token ids "
                          f"(served fields: {', '.join(SERVED_FIELDS)}; docs/interop.md)")
    for name, value, served in (("n", req.n, 1), ("stream", bool(req.stream), False),
                                ("echo", bool(req.echo), False), ("logprobs", req.logprobs, None)):
        if value != served:
            raise CompatError(name, f"only {served!r} is served (got {value!r})")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens != 1:
        raise CompatError("max_tokens", f"only 1 is served (got {max_tokens}); this route scores a sequence and "
                          "samples the one token after it")
    if req.prompt_logprobs is None:
        raise CompatError("prompt_logprobs", "required: this route answers prompt logprobs (k >= 0, or -1 for "
                          "the whole vocabulary)")
    if req.prompt_logprobs < -1:
        raise CompatError("prompt_logprobs", f"must be a positive value or -1 (got {req.prompt_logprobs})")
    return batch_of(req.prompt)


def batch_of(prompt: Any) -> list[list[int]]:
    """`[ids]` or `[[ids], ...]` -> a list of id lists (vLLM's two token-id prompt forms)."""
    def ids(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)

    if ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(ids(p) for p in prompt):
        return prompt
    raise CompatError("prompt", "token ids only, `[ids]` or `[[ids], ...]`, each non-empty and >= 0 (no text: "
                      "this server does not tokenize)")


def score_request(prompts: list[list[int]], k: int) -> ScoreRequest:
    """The /v1/score request that holds every number of the answer: all positions, the top max(k, 1).

    Position p of /v1/score (after ids[:p+1]) is vLLM's entry p + 1; the last position, after the whole
    prompt, is where the sampled token comes from, so at least the top-1 is fetched even for k = 0.
    """
    return ScoreRequest(sequences=prompts, start=0, top_k=max(k, 1))


def prompt_logprobs(seq: Sequence[int], scores: SequenceScores, k: int,
                    decode: Callable[[int], str | None]) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs` of one prompt from its /v1/score rows (positions 0 .. L-1, start 0).

    Entry i >= 1: the actual token seq[i] first (logprob from next_token_logprobs, rank from its place in
    the fetched top-k, else fetched + 1), then the top-k with ranks 1..k; a duplicate keeps its first key
    and takes the later value, as vLLM's dict does.
    """
    top_ids = scores.top_ids.tolist()
    top_lp = _finite(scores.top_logprobs).tolist()
    actual_lp = _finite(scores.next_token_logprobs).tolist()
    entries: list[dict[str, dict[str, Any]] | None] = [None]
    for i in range(1, len(seq)):  # a plain loop of dict literals: an answer can hold 10^5 of them
        ids, lps, actual = top_ids[i - 1], top_lp[i - 1], seq[i]
        rank = ids.index(actual) + 1 if actual in ids else len(ids) + 1
        entry = {str(actual): {"logprob": actual_lp[i - 1], "rank": rank, "decoded_token": decode(actual)}}
        for r in range(k):
            entry[str(ids[r])] = {"logprob": lps[r], "rank": r + 1, "decoded_token": decode(ids[r])}
        entries.append(entry)
    return entries


def _finite(lp: np.ndarray) -> np.ndarray:
    """-inf as vLLM writes it in JSON (-9999.0)."""
    return np.where(np.isneginf(lp), NEG_INF_AS, lp)


def sample_token(top_ids: np.ndarray, top_lp: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """One token from a top-k at `temperature` (0: the most likely); the mass outside the top-k is not drawn."""
    if temperature == 0 or len(top_ids) == 1:
        return int(top_ids[0])
    lp = top_lp.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # a temperature near 0 sends the rest to -inf: greedy
        p = np.exp((lp - lp.max()) / temperature)
    if not np.isfinite(p).all() or p.sum() <= 0:
        return int(top_ids[0])
    return int(rng.choice(top_ids, p=p / p.sum()))


def completion_response(model: str, prompts: list[list[int]], results: list[SequenceScores], k: int,
                        temperature: float, seed: int | None, decode: Callable[[int], str | None],
                        text_of: Callable[[int], str], eos_ids: frozenset[int]) -> dict[str, Any]:
    """vLLM's CompletionResponse as plain data (built as dicts: an answer holds L x (k+1) entries per prompt)."""
    rng = np.random.default_rng(None if seed is None else seed % 2**64)  # vLLM takes any int64
    choices = []
    for i, (seq, scores) in enumerate(zip(prompts, results, strict=True)):
        token = sample_token(scores.top_ids[-1], scores.top_logprobs[-1], temperature, rng)
        stop = token in eos_ids
        choices.append({"index": i, "text": "" if stop else text_of(token), "logprobs": None,
                        "finish_reason": "stop" if stop else "length", "stop_reason": None, "token_ids": None,
                        "prompt_logprobs": prompt_logprobs(seq, scores, k, decode), "prompt_token_ids": None,
                        "routed_experts": None})
    n = sum(len(p) for p in prompts)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "service_tier": None, "system_fingerprint": None,
            "usage": {"prompt_tokens": n, "total_tokens": n + len(prompts), "completion_tokens": len(prompts),
                      "prompt_tokens_details": None, "completion_tokens_details": None},
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def model_list(name: str, root: str, max_context: int) -> ModelList:
    """GET /v1/models as vLLM answers it; `max_model_len` leaves room for the sampled token."""
    now = int(time.time())
    permission = {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": now,
                  "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                  "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                  "organization": "*", "group": None, "is_blocking": False}
    return ModelList(data=[ModelCard(id=name, created=now, root=root, max_model_len=max_context + 1,
                                     permission=[permission])])
