"""A measured prototype of the fix proposed for `shared/kv_decode.py`: a KV cache that grows in place.

transformers' `DynamicLayer.update` appends with `torch.cat`, which allocates a new tensor and
copies the whole cache of every layer at every decode step: O(prefix) bytes copied per token, plus
fresh page faults for every large allocation. Here each layer writes the new keys/values into a
buffer whose capacity doubles when full, and attention reads a view of the filled part, so an
extend copies only the new tokens (O(1) amortised). The benchmarks use it only to measure the
effect of the change next to the shipped decoder; the outputs are equal (checked in `check`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from shared.kv_decode import KVDecoder

MIN_CAPACITY = 64


class GrowingLayer(DynamicLayer):
    """One layer's keys/values in a (B, H, capacity, D) buffer; `keys`/`values` view the filled part."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._keys_buf: torch.Tensor | None = None
        self._values_buf: torch.Tensor | None = None
        self._filled = 0

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


class GrowingKVDecoder(KVDecoder):
    """`KVDecoder` whose prefill starts a cache of `GrowingLayer`s instead of the default layers."""

    @torch.inference_mode()
    def prefill(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        self.lengths = [0] * len(sequences)
        self.mask_B_S = torch.zeros((len(sequences), 0), dtype=torch.long, device=self.device)
        self.next_pos_B = torch.zeros(len(sequences), dtype=torch.long, device=self.device)
        cache = DynamicCache(config=self.model.config)
        cache.layers = [GrowingLayer() for _ in range(self.model.config.num_hidden_layers)]
        self.cache = cache
        return self.extend(list(range(len(sequences))), sequences)


def check(model: torch.nn.Module, steps: int = 40) -> float:
    """Largest |logit difference| between the two decoders over ragged extends (should be ~1e-5)."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 79, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    plain, growing = KVDecoder(model), GrowingKVDecoder(model)
    worst = (plain.prefill(prompts) - growing.prefill(prompts)).abs().max().item()
    for t in range(steps):
        rows, toks = ([0, 2], [[5], [6, 7]]) if t % 2 else ([1], [[8]])
        worst = max(worst, (plain.extend(rows, toks) - growing.extend(rows, toks)).abs().max().item())
    return worst
