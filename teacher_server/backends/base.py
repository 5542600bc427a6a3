"""What a teacher backend must do. No web framework here: backends are plain, testable objects.

Backends run on one worker thread owned by the scheduler, so they need no locking of their own.
They return float32 numpy arrays; the app casts to the dtype a client asked for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.protocol import ScoreRequest, SequenceScores


@dataclass(frozen=True)
class BackendInfo:
    name: str
    backend: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_context: int
    dtype: str
    device: str
    supports_full: bool = True  # False: the backend has top-k only, so `full` requests get a 4xx
    kv_sessions: bool = True  # sessions keep a KV cache, so a long prefill can run as several extends
    supports_sessions: bool = True  # False: /v1/sessions gets a 422 (vLLM: prompt logprobs skip its prefix cache)
    max_top_k: int | None = None  # the backend's own cap on top_k (vLLM's --max-logprobs); None: the vocab
    supports_token_ids: bool = True  # False: `token_ids` scoring gets a 422 (vLLM returns top-k + actual token only)
    tail_bound: float = 0.0  # 0: tails are exact; else the bound on a rebuilt tail's mass (`tail_from_top`)
    engine_urls: tuple[str, ...] = ()  # engines whose /health decides /ready (SGLang, vLLM servers)


@dataclass
class StepArrays:
    """Next-token top-k for some rows of a session (float32): one entry per row, or per new token."""

    top_ids: np.ndarray  # (R, k) int32
    top_logprobs: np.ndarray  # (R, k)
    tail_logprob: np.ndarray  # (R,)


class SessionState(ABC):
    """Backend-owned state of one session (e.g. a KV cache)."""

    lengths: list[int]

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Memory held, for the session cap and the metrics."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the state now (the session store calls this on delete, expiry and eviction)."""


class EngineUnavailable(RuntimeError):
    """The engine behind the backend does not answer (stopped, restarting): a 503 the client retries."""


class UnsupportedRequest(ValueError):
    """The backend cannot serve this kind of request (e.g. full logprobs over SGLang)."""


class Backend(ABC):
    info: BackendInfo

    @abstractmethod
    def score(self, requests: list[ScoreRequest]) -> list[list[SequenceScores]]:
        """Score several validated requests at once (they may share one forward pass)."""

    @abstractmethod
    def open_session(self, sequences: list[list[int]], top_k: int) -> tuple[SessionState, StepArrays]:
        """Prefill every row and return the next-token top-k after each full prompt."""

    @abstractmethod
    def extend_session(
        self, state: SessionState, rows: list[int], tokens: list[list[int]], top_k: int,
        all_positions: bool = False,
    ) -> StepArrays:
        """Append tokens to the listed rows and return their next-token top-k (with `all_positions`:
        after every new token, row by row)."""

    @property
    def ready(self) -> bool:
        """False while the backend cannot serve (a model process being restarted): /ready answers 503."""
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources at shutdown."""


# How far 1 - sum(exp(top)) of an engine's float32 top-k may sit from the true tail mass: its log-softmax
# rounds each logprob to about one float32 ulp of the log-normaliser, so the summed mass carries an error
# of that size. Measured on real vLLM 0.32, float32, the shipped teacher (2,121 positions): |1 - sum of all
# 79 exp(logprob)| at most 5.2e-7 (docs/engines.md). Below this bound the tail is unresolvable.
TOPK_MASS_BOUND = 1e-6


def tail_from_top(top_lp_N_K: np.ndarray, bound: float = TOPK_MASS_BOUND) -> np.ndarray:
    """log(1 - sum(exp(top))) per row, for engines that return the top-k but no tail and no hidden states.

    Computed in float64 as log(-expm1(logsumexp(top))). The true mass is within `bound` of the rebuilt
    one; where the rebuilt mass falls below `bound` (the top-k's rounding swallowed the tail) the row
    gets log(bound), the largest mass it can hold, instead of a float32-tiny floor: a teacher tail
    too small is what biases a reverse-KL loss up (log p_tail -> -87), one at the bound errs by at most
    q_tail * (log bound - log p_tail). Exact tails come from hidden states (`lm_head.py`).
    """
    lse_N = np.logaddexp.reduce(top_lp_N_K.astype(np.float64), axis=1)  # -inf for k = 0: all mass in the tail
    return np.log(np.maximum(-np.expm1(np.minimum(lse_N, 0.0)), bound)).astype(np.float32)


def topk_with_tail(logprobs: Any, k: int) -> tuple[Any, Any, Any]:
    """Top-k of log-prob rows plus the exact log-mass of everything else (torch tensors).

    The tail is a logsumexp over the non-top entries, not log(1 - sum(top)), so it stays exact
    when the top-k holds almost all the mass.
    """
    import torch

    top_lp, top_ids = logprobs.topk(k, dim=-1)
    rest = logprobs.scatter(-1, top_ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1)
    return top_ids, top_lp, tail
