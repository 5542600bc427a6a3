"""The in-place growing KV cache gives the same logits as transformers' default cache, and as a
fresh unpadded forward of each row's prefix, across ragged extends that cross capacity doublings."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from decoders.kv_decode import GrowingLayer, KVDecoder


def test_growing_cache_equals_default_cache_and_full_forward(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, model.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    grown, default = KVDecoder(model), KVDecoder(model, grow_in_place=False)
    worst = (grown.prefill(prompts) - default.prefill(prompts)).abs().max().item()
    assert all(isinstance(layer, GrowingLayer) for layer in grown.cache.layers)
    rows_seen = [list(p) for p in prompts]
    for t in range(80):  # > MIN_CAPACITY columns: the buffers double at least once
        rows, toks = ([0, 2], [[5], [6, 7]]) if t % 2 else ([1], [[8]])
        a, b = grown.extend(rows, toks), default.extend(rows, toks)
        worst = max(worst, (a - b).abs().max().item())
        for r, tk in zip(rows, toks, strict=True):
            rows_seen[r] += tk
    assert worst == 0.0
    with torch.inference_mode():
        for r in range(3):
            last = grown.extend([r], [[9]])[0]
            ref = model(torch.tensor([rows_seen[r] + [9]])).logits[0, -1]
            assert (last - ref).abs().max().item() < 1e-4, r
    capacity = grown.cache.layers[0]._keys_buf.shape[-2]
    assert capacity >= grown.mask_B_S.shape[1] and grown.nbytes >= default.nbytes
