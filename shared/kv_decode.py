"""Incremental decoding of a batch of rows with a KV cache: the teacher's sessions and the student's
rollouts both need it, with rows of different lengths that advance (or stop) independently.

Rows are left-padded at prefill, so every row's newest token sits in the last column. Each extend
appends one block of columns to every row; rows that get fewer tokens (or none) are padded with
masked columns *before* their tokens, so the last column is again real for every extended row.
Masked columns are invisible to attention, and position ids count real tokens only, so a row
sees exactly what an unpadded forward of its own prefix would see.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers >= 5.2x names the KV-cache argument `cache`; older releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class KVDecoder:
    def __init__(self, model: torch.nn.Module, pad_id: int = 0) -> None:
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self._kw = cache_kwarg(model)
        self.cache: object | None = None
        self.mask_B_S = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.next_pos_B = torch.zeros(0, dtype=torch.long, device=self.device)
        self.lengths: list[int] = []

    @property
    def nbytes(self) -> int:
        """Bytes held by the KV cache and the mask (for caps and metrics)."""
        total = self.mask_B_S.numel() * self.mask_B_S.element_size()
        for layer in getattr(self.cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    @torch.inference_mode()
    def prefill(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run the prompts; returns the next-token logits after each full prompt, (B, V)."""
        self.cache, self.lengths = None, [0] * len(sequences)
        self.mask_B_S = torch.zeros((len(sequences), 0), dtype=torch.long, device=self.device)
        self.next_pos_B = torch.zeros(len(sequences), dtype=torch.long, device=self.device)
        return self.extend(list(range(len(sequences))), sequences)

    @torch.inference_mode()
    def extend(self, rows: Sequence[int], tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append `tokens[i]` to row `rows[i]`; returns those rows' next-token logits, (len(rows), V)."""
        batch, width = self.mask_B_S.shape[0], max(len(t) for t in tokens)
        ids_B_M = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask_B_M = torch.zeros((batch, width), dtype=torch.long)
        for row, toks in zip(rows, tokens, strict=True):
            ids_B_M[row, width - len(toks) :] = torch.as_tensor(toks, dtype=torch.long)
            mask_B_M[row, width - len(toks) :] = 1
            self.lengths[row] += len(toks)
        ids_B_M, mask_B_M = ids_B_M.to(self.device), mask_B_M.to(self.device)
        pos_B_M = (self.next_pos_B[:, None] + mask_B_M.cumsum(-1) - 1).clamp(min=0)
        self.next_pos_B = self.next_pos_B + mask_B_M.sum(-1)
        self.mask_B_S = torch.cat([self.mask_B_S, mask_B_M], dim=1)
        out = self.model(input_ids=ids_B_M, attention_mask=self.mask_B_S, position_ids=pos_B_M,
                         use_cache=True, **{self._kw: self.cache})
        self.cache = getattr(out, self._kw)
        return out.logits[list(rows), -1]


def position_ids(mask_B_T: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (left padding and holes do not advance them)."""
    return (mask_B_T.cumsum(-1) - 1).clamp(min=0)
