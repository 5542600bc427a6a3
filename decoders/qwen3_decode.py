"""A hand-written Qwen3 single-token decode step over the static decoder's buffers (CPU rollouts).

Why: on a CPU the student's decode is Python-dispatch bound (docs/performance.md, finding 5): a
transformers forward of a 3-layer model runs hundreds of small ops per token step (mask building,
cache bookkeeping, module calls), most of them the same every step. This step does only the
arithmetic: per layer an RMSNorm, one fused QKV matmul, the q/k norms, RoPE from a precomputed
table, one column written into the preallocated K/V buffers, SDPA over the filled columns with an
additive mask kept across steps, the output projection and one fused gate/up matmul.

Everything else is `StaticKVDecoder`'s: prefill and multi-token extends run transformers over the
same (B, H, capacity, D) buffers, so prompts and chunks give transformers' logits, and the
interface and semantics are `KVDecoder`'s (left-padded rows; rows left out of an extend get a
masked column; position ids count real tokens).

Weights are read from the live model when the decoder is built (once per rollout): q/k/v and
gate/up are copied into one matrix each (`fuse_weights`), the rest are the model's own tensors. The
copies are kept per model and made again when any weight changed (`fused_weights`), so a student's
follow every optimizer step and a teacher's sessions share one set. Cost: ~1 ms for the shipped
student; 1.1-2.3 s for a random Qwen3-0.6B on one CPU thread (2-4 of its 8-row decode steps, so a
few percent of a rollout), and memory for about 3/4 of the non-embedding weights while cached.

The numerics follow transformers' Qwen3 with SDPA attention: in float32 the logits are within 1e-5
of `KVDecoder`'s on one thread (tests/decoders/test_qwen3_decode.py; on more threads a GEMM's split
depends on the matrix shape, so the fused matrices can round a few ulps apart). `qwen3_unsupported`
says which models qualify.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from decoders.static_decode import StaticKVDecoder, static_unsupported


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    qkv: torch.Tensor  # (q + 2 kv, hidden): q_proj, k_proj, v_proj stacked
    qkv_bias: torch.Tensor | None
    qk_norm: torch.Tensor  # (heads + kv heads, head dim): q_norm's weight per query head, then k_norm's
    o: torch.Tensor
    o_bias: torch.Tensor | None
    ln2: torch.Tensor
    gate_up: torch.Tensor  # (2 intermediate, hidden): gate_proj, up_proj stacked
    down: torch.Tensor


def qwen3_unsupported(model: torch.nn.Module) -> str | None:
    """Why the hand-written step cannot run this model (None when it can)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "qwen3" or type(model).__name__ != "Qwen3ForCausalLM":
        return f"{type(model).__name__} is not a Qwen3ForCausalLM"
    if next(model.parameters()).device.type != "cpu":
        return "it runs eagerly on a CPU (a GPU uses the static decoder with a captured step)"
    reason = static_unsupported(model)
    if reason is not None:
        return reason
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    if "dynamic" in str(getattr(model.model.rotary_emb, "rope_type", "default")):
        return "dynamic RoPE rescales with the sequence length"
    return None


_FUSED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, list[LayerWeights]]] = weakref.WeakKeyDictionary()


def _weights_key(model: torch.nn.Module) -> tuple:
    """Changes whenever a weight does: an in-place update (AdamW, `copy_`) bumps a tensor's version,
    a reassignment changes its storage."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def fused_weights(model: torch.nn.Module) -> list[LayerWeights]:
    """`fuse_weights(model)`, built again only when a weight changed since the last call: a trained
    student re-fuses once per rollout (after each optimizer step), a teacher's sessions share one copy."""
    key = _weights_key(model)
    cached = _FUSED.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    _FUSED.pop(model, None)  # let the stale copies go before making new ones (peak memory)
    weights = fuse_weights(model)
    _FUSED[model] = (key, weights)
    return weights


def fuse_weights(model: torch.nn.Module) -> list[LayerWeights]:
    """Each layer's weights, q/k/v and gate/up stacked into one matrix each and the q/k norms into
    one per-head table (copies: the live weights at this moment), the others the model's own tensors."""
    out = []
    with torch.no_grad():
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            projs = (attn.q_proj, attn.k_proj, attn.v_proj)
            bias = None if attn.q_proj.bias is None else torch.cat([p.bias for p in projs]).detach()
            heads, kv_heads = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
            qk_norm = torch.cat([attn.q_norm.weight.expand(heads, -1), attn.k_norm.weight.expand(kv_heads, -1)])
            out.append(LayerWeights(
                block.input_layernorm.weight.detach(), torch.cat([p.weight for p in projs]).detach(), bias,
                qk_norm.detach(), attn.o_proj.weight.detach(),
                None if attn.o_proj.bias is None else attn.o_proj.bias.detach(),
                block.post_attention_layernorm.weight.detach(),
                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(), mlp.down_proj.weight.detach()))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Qwen3RMSNorm: the statistics in float32, the weight applied in the input's dtype (None: no weight).

    In float32 that is `F.rms_norm`: one call instead of seven ops (the step runs three per layer)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if weight is None else weight * normed


def rope_tables(cos_C_D: torch.Tensor, sin_C_D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin with its first half negated): then x cos + roll(x, D/2) sin' is transformers'
    x cos + rotate_half(x) sin, with the same products (a sign flip is exact)."""
    half = sin_C_D.shape[-1] // 2
    return cos_C_D, torch.cat((-sin_C_D[..., :half], sin_C_D[..., half:]), -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE over the last dim with tables from `rope_tables`."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class Qwen3Decoder(StaticKVDecoder):
    """`StaticKVDecoder` with its single-token step hand-written for Qwen3 (CPU, no graph capture)."""

    def __init__(self, model: torch.nn.Module, pad_id: int = 0, capacity: int | None = None) -> None:
        reason = qwen3_unsupported(model)
        if reason is not None:
            raise ValueError(f"qwen3 decoder: {reason}")
        super().__init__(model, pad_id, capacity, capture=False)
        c = model.config
        self.eps, self.n_heads, self.n_kv, self.head_dim = c.rms_norm_eps, c.num_attention_heads, \
            c.num_key_value_heads, c.head_dim
        self.scaling = model.model.layers[0].self_attn.scaling
        self.layer_weights = fused_weights(model)
        self.embed = model.model.embed_tokens.weight.detach()
        self.final_norm = model.model.norm.weight.detach()
        self.head = model.lm_head.weight.detach()
        self.head_bias = None if model.lm_head.bias is None else model.lm_head.bias.detach()
        self._cos_C_D = self._sin_C_D = None  # RoPE for positions 0..capacity-1, built at the first step
        self._mask_B_C: torch.Tensor | None = None  # additive form of `colmask_B_C`, kept across steps

    @property
    def nbytes(self) -> int:
        mask = 0 if self._mask_B_C is None else self._mask_B_C.numel() * self._mask_B_C.element_size()
        return super().nbytes + mask

    # ---- keep the step's tables in line with the base class's buffers ----------------------
    def _allocate(self, batch: int, capacity: int) -> None:
        super()._allocate(batch, capacity)
        self._cos_C_D = self._sin_C_D = self._mask_B_C = None

    def _reserve(self, needed: int) -> None:
        if needed > self.capacity:
            self._cos_C_D = self._sin_C_D = self._mask_B_C = None
        super()._reserve(needed)

    def _extend_block(self, rows: Sequence[int], tokens: Sequence[Sequence[int]],
                      all_positions: bool = False) -> torch.Tensor:
        self._mask_B_C = None  # the block wrote columns of `colmask_B_C`
        return super()._extend_block(rows, tokens, all_positions)

    def _tables(self) -> None:
        """RoPE from the model's own rotary module (any static RoPE type) and the additive mask."""
        positions_1_C = torch.arange(self.capacity, device=self.device)[None]
        cos, sin = self.model.model.rotary_emb(self.embed[:1], positions_1_C)
        self._cos_C_D, self._sin_C_D = rope_tables(cos[0], sin[0])
        neg = torch.finfo(self.dtype).min
        self._mask_B_C = torch.zeros(self.colmask_B_C.shape, dtype=self.dtype).masked_fill_(~self.colmask_B_C, neg)

    # ---- the single-token step ---------------------------------------------------------------
    def _extend_one(self, rows: Sequence[int], tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        if not self.cache.layers[0].is_initialized:  # a prefill of one-token prompts: transformers sizes the buffers
            return self._extend_block(rows, tokens)
        self._reserve(self.width + 1)
        if self._mask_B_C is None:
            self._tables()
        batch, col = self.colmask_B_C.shape[0], self.width
        ids, real = [self.pad_id] * batch, [False] * batch
        for row, toks in zip(rows, tokens, strict=True):
            ids[row], real[row] = toks[0], True
        positions_B = torch.tensor(self.lengths)  # a row's next real token's position (masked rows: unused)
        for row in rows:
            self.lengths[row] += 1
        real_B = torch.tensor(real)
        self.colmask_B_C[:, col] = real_B
        self._mask_B_C[:, col] = torch.where(real_B, 0.0, torch.finfo(self.dtype).min)
        logits_B_V = self._step(torch.tensor(ids), positions_B, col + 1)
        self.cursor_1.add_(1)
        self.width += 1
        if len(rows) == batch and list(rows) == list(range(batch)):
            return logits_B_V
        return logits_B_V[list(rows)]

    def _step(self, ids_B: torch.Tensor, positions_B: torch.Tensor, visible: int) -> torch.Tensor:
        """One token for every row at column `visible - 1`; the next-token logits of every row, (B, V)."""
        b, nh, nkv, d, eps = ids_B.shape[0], self.n_heads, self.n_kv, self.head_dim, self.eps
        group, col = nh // nkv, visible - 1
        x = F.embedding(ids_B, self.embed)  # (B, hidden)
        cos, sin = self._cos_C_D[positions_B][:, None], self._sin_C_D[positions_B][:, None]  # (B, 1, D)
        mask_B_1_1_S = self._mask_B_C[:, None, None, :visible]
        for w, layer in zip(self.layer_weights, self.cache.layers, strict=True):
            qk, v = F.linear(rms_norm(x, w.ln1, eps), w.qkv, w.qkv_bias).split([(nh + nkv) * d, nkv * d], -1)
            # q_norm and k_norm (the same formula, per head) and RoPE run once over all heads.
            qk = rotate(rms_norm(qk.view(b, nh + nkv, d), None, eps) * w.qk_norm, cos, sin)
            q, k = qk[:, :nh], qk[:, nh:]
            layer.keys[:, :, col] = k
            layer.values[:, :, col] = v.view(b, nkv, d)
            # The heads sharing a K/V head attend as `group` queries of it (transformers' pack_gqa).
            att = F.scaled_dot_product_attention(q.view(b, nkv, group, d), layer.keys[:, :, :visible],
                                                 layer.values[:, :, :visible], attn_mask=mask_B_1_1_S,
                                                 scale=self.scaling)
            x = x + F.linear(att.reshape(b, nh * d), w.o, w.o_bias)
            gate, up = F.linear(rms_norm(x, w.ln2, eps), w.gate_up).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, w.down)
        return F.linear(rms_norm(x, self.final_norm, eps), self.head, self.head_bias)
