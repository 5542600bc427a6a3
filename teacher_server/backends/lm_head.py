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
from pathlib import Path

import numpy as np
import torch

from shared.protocol import ScoreRequest, SequenceScores
from teacher_server.backends.base import topk_with_tail

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


def scores_from_hidden(head: LMHead, hidden: list[np.ndarray], items: list[tuple[list[int], int]],
                       req: ScoreRequest) -> list[SequenceScores]:
    """Scores of (sequence, start) items from the hidden states of positions start..L-1 of each."""
    return [scores_from_logprobs(head.logprobs(h), seq, start, req)
            for h, (seq, start) in zip(hidden, items, strict=True)]
