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


@dataclass
class StepArrays:
    """Next-token top-k for some rows of a session (float32)."""

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
        self, state: SessionState, rows: list[int], tokens: list[list[int]], top_k: int
    ) -> StepArrays:
        """Append tokens to the listed rows and return their next-token top-k."""

    @property
    def ready(self) -> bool:
        """False while the backend cannot serve (a model process being restarted): /ready answers 503."""
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources at shutdown."""


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
