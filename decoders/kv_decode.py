"""Incremental decoding of a batch of rows with a KV cache: the teacher's sessions and the student's
rollouts both need it, with rows of different lengths that advance (or stop) independently.

Rows are left-padded at prefill, so every row's newest token sits in the last column. Each extend
appends one block of columns to every row; rows that get fewer tokens (or none) are padded with
masked columns *before* their tokens, so the last column is again real for every extended row.
Masked columns are invisible to attention, and position ids count real tokens only, so a row
sees exactly what an unpadded forward of its own prefix would see.

The cache grows in place: transformers' default layer appends with `torch.cat`, which copies the
whole cache of every layer at every step (O(prefix) bytes per token, which made an 8-row extend at
prefix 1024 five times slower than at prefix 32). `GrowingLayer` writes into a buffer whose capacity
doubles when full and hands attention a view of the filled part, so a step copies only its tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

try:  # the layer API of transformers >= 4.56; older releases keep the default cache
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover
    DynamicCache = DynamicLayer = None

MIN_CAPACITY = 64


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers >= 5.2x names the KV-cache argument `cache`; older releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


if DynamicLayer is not None:

    class GrowingLayer(DynamicLayer):
        """One layer's keys/values in a (B, H, capacity, D) buffer; `keys`/`values` view the filled part."""

        _keys_buf: torch.Tensor | None = None
        _values_buf: torch.Tensor | None = None
        _filled = 0

        @property
        def nbytes(self) -> int:
            bufs = (self._keys_buf, self._values_buf)
            return sum(b.numel() * b.element_size() for b in bufs if b is not None)

        def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
            old = 0 if self._keys_buf is None else self._keys_buf.shape[-2]
            if needed <= old:
                return
            capacity = max(needed, 2 * old, MIN_CAPACITY)
            b, h, _, d = key_states.shape
            keys = key_states.new_empty((b, h, capacity, d))
            values = value_states.new_empty((b, h, capacity, value_states.shape[-1]))
            if self._filled:
                keys[..., : self._filled, :] = self._keys_buf[..., : self._filled, :]
                values[..., : self._filled, :] = self._values_buf[..., : self._filled, :]
            self._keys_buf, self._values_buf = keys, values

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
                   **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            needed = self._filled + key_states.shape[-2]
            self._reserve(key_states, value_states, needed)
            self._keys_buf[..., self._filled : needed, :] = key_states
            self._values_buf[..., self._filled : needed, :] = value_states
            self._filled = needed
            self.keys, self.values = self._keys_buf[..., :needed, :], self._values_buf[..., :needed, :]
            return self.keys, self.values


def new_cache(model: torch.nn.Module) -> object | None:
    """A cache whose plain layers grow in place; None (the model's default) where that cannot apply.

    Only exact `DynamicLayer`s are swapped: sliding-window or quantised layers keep their own logic.
    """
    if DynamicLayer is None:
        return None
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # an exotic config: let the model build its own cache
        return None
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class KVDecoder:
    def __init__(self, model: torch.nn.Module, pad_id: int = 0, grow_in_place: bool = True) -> None:
        self.model, self.pad_id, self.grow_in_place = model, pad_id, grow_in_place
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
            if isinstance(getattr(layer, "nbytes", None), int):  # a growing layer: count its capacity
                total += layer.nbytes
                continue
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    @torch.inference_mode()
    def prefill(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run the prompts; returns the next-token logits after each full prompt, (B, V)."""
        self.cache = new_cache(self.model) if self.grow_in_place else None
        self.lengths = [0] * len(sequences)
        self.mask_B_S = torch.zeros((len(sequences), 0), dtype=torch.long, device=self.device)
        self.next_pos_B = torch.zeros(len(sequences), dtype=torch.long, device=self.device)
        return self.extend(list(range(len(sequences))), sequences)

    @torch.inference_mode()
    def extend(self, rows: Sequence[int], tokens: Sequence[Sequence[int]], all_positions: bool = False) -> torch.Tensor:
        """Append `tokens[i]` to row `rows[i]`; returns those rows' next-token logits, (len(rows), V),
        or with `all_positions` the logits after every new token, row by row: (Σ len(tokens[i]), V)."""
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
        if all_positions:
            return block_positions(out.logits, rows, tokens)
        return out.logits[list(rows), -1]


def block_positions(logits_B_M_V: torch.Tensor, rows: Sequence[int], tokens: Sequence[Sequence[int]]) -> torch.Tensor:
    """The logits after each real token of a right-aligned extend block, row by row: (Σ len(tokens[i]), V)."""
    width = logits_B_M_V.shape[1]
    return torch.cat([logits_B_M_V[row, width - len(toks) :] for row, toks in zip(rows, tokens, strict=True)])


def position_ids(mask_B_T: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (left padding and holes do not advance them)."""
    return (mask_B_T.cumsum(-1) - 1).clamp(min=0)
