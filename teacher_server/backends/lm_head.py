"""Exact logprobs from an engine's hidden states: the checkpoint's own lm_head, applied here.

Why: SGLang and vLLM return float32 top-k logprobs, and their sum rounds to >= 1 wherever the top-k
holds almost all the mass, so no arithmetic on them can recover a tail far below their rounding
(log 1e-8 on the shipped teacher, where `1 - sum(exp(top))` gives 0). Both engines can instead return
the final hidden state of every position (the lm_head's input, after the final norm). Projecting it
with the lm_head read from the same checkpoint and taking a float32 log-softmax gives the same
distribution a transformers forward gives: exact top-k, exact tail, full logprobs and any chosen ids.

Only the lm_head weight is read (one tensor, from the shard that holds it), never the whole model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from shared.protocol import ScoreRequest, SequenceScores
from teacher_server.backends.base import topk_with_tail

LOGITS_BUDGET = 1 << 26  # logits projected at once (256 MiB of float32); a longer sequence goes alone
_UNSUPPORTED_HEADS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


class LMHeadError(RuntimeError):
    """The checkpoint's output layer cannot be reproduced by a plain projection."""


def _model_file(model: str, name: str) -> Path:
    """A file of a local checkpoint folder, or fetched from the hub (only that file)."""
    local = Path(model) / name
    if local.is_file():
        return local
    if Path(model).is_dir():
        raise FileNotFoundError(local)
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model, name))


def _candidates(config: dict) -> list[str]:
    """Where the output projection lives: `lm_head.weight`, or the embeddings when they are tied."""
    text = config.get("text_config") or config
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return ["lm_head.weight", "model.embed_tokens.weight"] if tied else ["lm_head.weight"]


def load_lm_head(model: str) -> torch.Tensor:
    """The (V, H) float32 output projection of a causal-LM checkpoint (safetensors).

    Refuses heads that scale or cap the logits after the projection (Gemma's softcapping, Cohere's
    logit_scale): the hidden states alone would then not give the model's distribution.
    """
    from safetensors import safe_open

    config = json.loads(_model_file(model, "config.json").read_text())
    text = config.get("text_config") or config
    for key in _UNSUPPORTED_HEADS:
        if text.get(key) not in (None, 1, 1.0):
            raise LMHeadError(f"{model}: {key}={text[key]} is applied after the lm_head; exact logprobs from "
                              "hidden states are not supported for this model (serve it with --backend hf)")
    names = _candidates(config)
    try:
        weight_map = json.loads(_model_file(model, "model.safetensors.index.json").read_text())["weight_map"]
        found = [(n, weight_map[n]) for n in names if n in weight_map]
    except FileNotFoundError:
        found = [(n, "model.safetensors") for n in names]
    for name, shard in found:
        with safe_open(str(_model_file(model, shard)), framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name).float().contiguous()
    raise LMHeadError(f"{model}: none of {names} is in its safetensors")


class LMHead:
    """Float32 projection of hidden states to log-probabilities, with the checkpoint's weight."""

    def __init__(self, model: str, chunk_positions: int = 4096) -> None:
        self.weight_V_H = load_lm_head(model)
        self.chunk_positions = chunk_positions  # bounds the (n, V) logits held at once

    @property
    def vocab_size(self) -> int:
        return int(self.weight_V_H.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight_V_H.shape[1])

    @torch.inference_mode()
    def logprobs(self, hidden_N_H: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, V) float32 log-softmax of `hidden @ W^T`."""
        h = torch.as_tensor(hidden_N_H, dtype=torch.float32)
        if h.ndim != 2 or h.shape[1] != self.hidden_size:
            raise LMHeadError(f"hidden states of shape {tuple(h.shape)} do not fit the lm_head "
                              f"({self.vocab_size} x {self.hidden_size}): is the engine serving this checkpoint?")
        return torch.cat([(part @ self.weight_V_H.T).log_softmax(-1)
                          for part in h.split(self.chunk_positions)]) if len(h) else h.new_zeros(0, self.vocab_size)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def scores_from_logprobs(lp_N_V: torch.Tensor, seq: list[int], start: int, req: ScoreRequest) -> SequenceScores:
    """What /v1/score returns for positions start..L-1 of `seq`, from their full float32 logprobs."""
    top_ids, top_lp, tail = topk_with_tail(lp_N_V, req.top_k)
    nxt = torch.tensor(seq[start + 1:], dtype=torch.long, device=lp_N_V.device)
    next_lp = lp_N_V[: len(nxt)].gather(-1, nxt[:, None]).squeeze(-1)
    token_lp = None
    if req.token_ids is not None:
        token_lp = _np(lp_N_V[:, torch.tensor(req.token_ids, dtype=torch.long, device=lp_N_V.device)])
    return SequenceScores(start=start, top_ids=_np(top_ids.int()), top_logprobs=_np(top_lp), tail_logprob=_np(tail),
                          next_token_logprobs=_np(next_lp), token_logprobs=token_lp,
                          logprobs=_np(lp_N_V) if req.full else None)


def stored_dtype(values: np.ndarray) -> str:
    """The narrowest float type that holds every value exactly: what an engine's hidden states were
    computed in before it sent them as float32 (no engine route reports the dtype it runs)."""
    f32 = np.ascontiguousarray(values, dtype=np.float32)
    if not (f32.view(np.uint32) & 0xFFFF).any():
        return "bfloat16"
    if np.array_equal(f32.astype(np.float16).astype(np.float32), f32):
        return "float16"
    return "float32"


def chunks(costs: list[int], budget: int) -> Iterator[slice]:
    """Consecutive slices of `costs` whose summed cost stays within budget (at least one item each)."""
    lo, total = 0, 0
    for i, cost in enumerate(costs):
        if i > lo and total + cost > budget:
            yield slice(lo, i)
            lo, total = i, 0
        total += cost
    if lo < len(costs):
        yield slice(lo, len(costs))


def scores_from_hidden(head: LMHead, hidden: list[np.ndarray], items: list[tuple[list[int], int]],
                       req: ScoreRequest) -> list[SequenceScores]:
    """Scores of (sequence, start) items from the hidden states of positions start..L-1 of each.

    Sequences are projected together, up to LOGITS_BUDGET logits at a time: on a small model a torch
    call costs more than its arithmetic, so one projection, top-k and tail per group, not per sequence.
    Every row is computed on its own, so the answers are those of one sequence at a time.
    """
    out: list[SequenceScores] = []
    for part in chunks([len(h) * head.vocab_size for h in hidden], LOGITS_BUDGET):
        out += stacked_scores(head.logprobs(np.concatenate(hidden[part])), items[part], req)
    return out


def stacked_scores(lp_N_V: torch.Tensor, items: list[tuple[list[int], int]], req: ScoreRequest) -> list[SequenceScores]:
    """`scores_from_logprobs` of each (sequence, start) item at once, from the logprobs of positions
    start..L-1 of every item, stacked item after item."""
    ends = np.cumsum([len(seq) - start for seq, start in items])[:-1]

    def split(t: torch.Tensor) -> list[np.ndarray]:
        return np.split(_np(t), ends)

    top_ids, top_lp, tail = topk_with_tail(lp_N_V, req.top_k)
    following = torch.tensor([t for seq, start in items for t in [*seq[start + 1:], 0]], dtype=torch.long)
    next_lp = lp_N_V.gather(-1, following[:, None]).squeeze(-1)  # an item's last row: after all of it, dropped
    none: list[np.ndarray | None] = [None] * len(items)
    token_lp = none if req.token_ids is None else split(lp_N_V[:, torch.tensor(req.token_ids, dtype=torch.long)])
    full = split(lp_N_V) if req.full else none
    return [SequenceScores(start=start, top_ids=ids, top_logprobs=lp, tail_logprob=t, next_token_logprobs=nxt[:-1],
                           token_logprobs=tok, logprobs=f)
            for (_, start), ids, lp, t, nxt, tok, f in zip(items, split(top_ids.int()), split(top_lp), split(tail),
                                                          split(next_lp), token_lp, full, strict=True)]
