"""Which decoder a rollout or a teacher session runs: the one place that picks among the three.

    KVDecoder         (kv_decode.py)      transformers' forward with a growing KV cache: any model
    StaticKVDecoder   (static_decode.py)  fixed-size buffers, CUDA graphs on a GPU
    Qwen3Decoder      (qwen3_decode.py)   a hand-written Qwen3 step, the fastest on a CPU
"""

from __future__ import annotations

from typing import Literal

import torch

from decoders.kv_decode import KVDecoder
from decoders.qwen3_decode import Qwen3Decoder, qwen3_unsupported
from decoders.static_decode import StaticKVDecoder, static_unsupported, warn_once

DecoderKind = Literal["auto", "eager", "static", "qwen3"]


def make_decoder(model: torch.nn.Module, pad_id: int = 0, capacity: int | None = None,
                 kind: DecoderKind = "auto") -> KVDecoder | StaticKVDecoder:
    """The decoder for this model. `auto`: on CUDA the static decoder with graphs; on a CPU the
    hand-written Qwen3 step (`decoders/qwen3_decode.py`) for a Qwen3 model, `KVDecoder` for any other.
    `eager` is always `KVDecoder` (the generic path), `static` and `qwen3` ask for those decoders.

    `capacity` (prompt width + max new tokens) sizes the static buffers; without it they grow.
    A model the asked-for decoder cannot run (flash attention, sliding windows, not Qwen3) gets
    `KVDecoder` with a one-time warning.
    """
    if kind not in ("auto", "eager", "static", "qwen3"):
        raise ValueError(f"decoder: {kind!r} is not one of auto, eager, static, qwen3")
    on_cuda = next(model.parameters()).device.type == "cuda"
    if kind == "eager":
        return KVDecoder(model, pad_id)
    if kind == "qwen3" or (kind == "auto" and not on_cuda):
        reason = qwen3_unsupported(model)
        if reason is None:
            return Qwen3Decoder(model, pad_id, capacity)
        if kind == "qwen3":
            warn_once(f"qwen3 decoder unavailable ({reason}); using the eager KV decoder")
        return KVDecoder(model, pad_id)
    reason = static_unsupported(model)
    if reason is not None:
        warn_once(f"static decoder unavailable ({reason}); using the eager KV decoder")
        return KVDecoder(model, pad_id)
    return StaticKVDecoder(model, pad_id, capacity)
