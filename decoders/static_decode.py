"""Decoding with a preallocated KV cache and, on CUDA, a captured single-token step.

Why: the growing-cache decoder (`decoders.kv_decode.KVDecoder`) is launch- and sync-bound on a GPU
(28-43 ms per token step of a 1.7B model, docs/gpu.md), though the weights take under 1 ms to read.
A step whose shapes and addresses never change can be recorded once as a CUDA graph and replayed
for microseconds of host time (the design of gpt-fast and transformers' `StaticCache`).

Same interface and semantics as `KVDecoder`: rows are left-padded at prefill; each extend appends
one block of columns to every row, rows with fewer (or no) tokens get masked columns before theirs;
position ids count real tokens. What differs is the storage:

- K/V live in (B, H, capacity, D) buffers allocated once; a device tensor `cursor` says where the
  next column goes, and a (B, capacity) column mask says which columns are real. Capacity is given
  (prompt width + max new tokens) or grows by reallocation (doubling) when an extend needs more.
- The model gets a full-width 4D additive float mask, (B, 1, Q, capacity), which transformers'
  masking utils pass through as-is (4.5x and 5.x: `_preprocess_mask_arguments` returns any 4D mask
  unchanged); columns not yet written are masked, and the buffers start at zero so masked columns
  never carry NaN into the attention sum.
- A step in which every row gets at most one token (the decode loop) is one fixed-shape forward of
  all B rows over all capacity columns: `_step` reads its inputs from static tensors, writes the
  column mask and the cache at the cursor, and advances the cursor, all on the device. On CUDA it
  is captured once per decoder (and again after a capacity growth) and replayed; elsewhere, or with
  `capture=False`, the same `_step` runs eagerly, which is how the CPU tests cover it.
- Multi-token extends (prefill, chunked prefill) run eagerly into the same buffers, over only the
  filled columns.

Capture costs two warm-up forwards plus one recorded forward, paid at the first single-token step
of a decoder; a rollout of n tokens replays it n-1 times, so it pays for itself after a few steps.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence

import torch

from decoders.kv_decode import DynamicCache, DynamicLayer, block_positions, cache_kwarg

ROUND = 16  # capacity granularity (aligned masks keep SDPA on its fused kernels)
HEADROOM = 64  # columns added beyond the prompt when no capacity is given
WARMUP = 2  # eager runs of the step before capture (lazy cuBLAS/allocator init happens outside the graph)
_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def additive_mask(keep_B_Q_C: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Q, C) booleans -> (B, 1, Q, C) float mask: 0 where attended, the dtype's minimum elsewhere.

    The minimum, not -inf: a query that sees no real column (a padding query) then averages finite
    values instead of producing NaN, and its output only feeds masked columns.
    """
    zeros = torch.zeros(keep_B_Q_C.shape, dtype=dtype, device=keep_B_Q_C.device)
    return zeros.masked_fill_(~keep_B_Q_C, torch.finfo(dtype).min)[:, None]


def round_capacity(columns: int) -> int:
    return -(-columns // ROUND) * ROUND


if DynamicLayer is not None:

    class SlotLayer(DynamicLayer):
        """One layer's K/V in fixed (B, H, capacity, D) buffers, written at the decoder's cursor.

        `visible` (set by the decoder) is how many columns attention sees: the filled part in eager
        extends, None (every column) in the fixed-shape step.
        """

        def __init__(self, cursor_1: torch.Tensor, batch: int, capacity: int) -> None:
            super().__init__()
            self.cursor_1, self.batch, self.capacity = cursor_1, batch, capacity
            self.offsets_C = torch.arange(capacity, device=cursor_1.device)
            self.visible: int | None = None

        @property
        def nbytes(self) -> int:
            return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            """Buffers take the heads, head size and dtype of the first keys/values (any attention layout)."""
            self.dtype, self.device = key_states.dtype, key_states.device
            b, h, _, d = key_states.shape
            self.keys = key_states.new_zeros((b, h, self.capacity, d))
            self.values = value_states.new_zeros((b, h, self.capacity, value_states.shape[-1]))
            self.is_initialized = True

        def grow(self, capacity: int, filled: int) -> None:
            """Reallocate to `capacity` columns, keeping the first `filled`."""
            self.capacity = capacity
            self.offsets_C = torch.arange(capacity, device=self.cursor_1.device)
            if not self.is_initialized:
                return
            keys, values = self.keys, self.values
            self.keys = keys.new_zeros((*keys.shape[:2], capacity, keys.shape[-1]))
            self.values = values.new_zeros((*values.shape[:2], capacity, values.shape[-1]))
            self.keys[..., :filled, :] = keys[..., :filled, :]
            self.values[..., :filled, :] = values[..., :filled, :]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
                   **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            cols_Q = self.cursor_1 + self.offsets_C[: key_states.shape[-2]]
            self.keys.index_copy_(2, cols_Q, key_states)
            self.values.index_copy_(2, cols_Q, value_states)
            if self.visible is None:
                return self.keys, self.values
            return self.keys[..., : self.visible, :], self.values[..., : self.visible, :]

        def get_seq_length(self) -> int:
            return self.visible or self.capacity


def static_unsupported(model: torch.nn.Module) -> str | None:
    """Why this model cannot use the static decoder (None when it can)."""
    config = model.config
    if DynamicLayer is None:
        return "this transformers release has no cache layer API"
    if "FSDP" in type(model).__name__:
        return "a sharded module gathers its weights inside each forward"
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in ("sdpa", "eager"):
        return f"attention implementation {attn!r} takes no 4D float mask"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "sliding-window or linear-attention layers need their own cache"
    return None


class StaticKVDecoder:
    """`KVDecoder`'s prefill/extend over preallocated buffers; single-token steps captured on CUDA."""

    def __init__(self, model: torch.nn.Module, pad_id: int = 0, capacity: int | None = None,
                 capture: bool | None = None) -> None:
        self.model, self.pad_id, self.capacity_hint = model, pad_id, capacity
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("capture=True needs a model on a CUDA device")
        self._kw = cache_kwarg(model)
        self._keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.dtype = next(model.parameters()).dtype
        self.lengths: list[int] = []
        self.width = 0  # filled columns (host copy of the cursor)
        self.cache: object | None = None
        self.cursor_1 = torch.zeros(1, dtype=torch.long, device=self.device)
        self.colmask_B_C = torch.zeros((0, 0), dtype=torch.bool, device=self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_failed = False
        self.replays = 0  # captured steps run (for tests and benchmarks)

    # ---- state ---------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.colmask_B_C.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the K/V buffers and the column mask (their full capacity)."""
        total = self.colmask_B_C.numel() * self.colmask_B_C.element_size()
        return total + sum(layer.nbytes for layer in getattr(self.cache, "layers", []))

    def _allocate(self, batch: int, capacity: int) -> None:
        capacity = round_capacity(capacity)
        self.cache = DynamicCache(config=self.model.config)
        n_layers = len(self.cache.layers) or self.model.config.get_text_config().num_hidden_layers
        self.cache.layers = [SlotLayer(self.cursor_1, batch, capacity) for _ in range(n_layers)]
        self.cache.layer_class_to_replicate = None  # every layer is given: none may be appended lazily
        self.colmask_B_C = torch.zeros((batch, capacity), dtype=torch.bool, device=self.device)
        # The step's inputs, rewritten in place each step: ids, positions, real-token flags, rows to return.
        self._in_4_B = torch.zeros((4, batch), dtype=torch.long, device=self.device)
        self._graph, self._logits_B_V = None, None
        self.cursor_1.zero_()
        self.width = 0

    def _reserve(self, needed: int) -> None:
        """Grow every buffer to hold `needed` columns (a captured step is recaptured on its next use)."""
        if needed <= self.capacity:
            return
        capacity = round_capacity(max(needed, 2 * self.capacity))
        for layer in self.cache.layers:
            layer.grow(capacity, self.width)
        colmask = torch.zeros((self.colmask_B_C.shape[0], capacity), dtype=torch.bool, device=self.device)
        colmask[:, : self.width] = self.colmask_B_C[:, : self.width]
        self.colmask_B_C, self._graph, self._logits_B_V = colmask, None, None

    # ---- the interface of KVDecoder --------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run the prompts; returns the next-token logits after each full prompt, (B, V)."""
        width = max(len(s) for s in sequences)
        self._allocate(len(sequences), max(self.capacity_hint or 0, width + (0 if self.capacity_hint else HEADROOM)))
        self.lengths = [0] * len(sequences)
        return self.extend(list(range(len(sequences))), sequences)

    @torch.inference_mode()
    def extend(self, rows: Sequence[int], tokens: Sequence[Sequence[int]], all_positions: bool = False) -> torch.Tensor:
        """Append `tokens[i]` to row `rows[i]`; returns those rows' next-token logits, (len(rows), V),
        or with `all_positions` the logits after every new token, row by row: (Σ len(tokens[i]), V)."""
        if all(len(t) == 1 for t in tokens):
            return self._extend_one(rows, tokens)
        return self._extend_block(rows, tokens, all_positions)

    # ---- multi-token extends: eager, over the filled columns -------------------------------
    def _extend_block(self, rows: Sequence[int], tokens: Sequence[Sequence[int]],
                      all_positions: bool = False) -> torch.Tensor:
        batch, width = self.colmask_B_C.shape[0], max(len(t) for t in tokens)
        self._reserve(self.width + width)
        ids_B_M = torch.full((batch, width), self.pad_id, dtype=torch.long)
        real_B_M = torch.zeros((batch, width), dtype=torch.bool)
        for row, toks in zip(rows, tokens, strict=True):
            ids_B_M[row, width - len(toks) :] = torch.as_tensor(toks, dtype=torch.long)
            real_B_M[row, width - len(toks) :] = True
        start_B = torch.tensor(self.lengths, dtype=torch.long)
        pos_B_M = (start_B[:, None] + real_B_M.long().cumsum(-1) - 1).clamp(min=0)
        for row, toks in zip(rows, tokens, strict=True):
            self.lengths[row] += len(toks)
        end = self.width + width
        self.colmask_B_C[:, self.width : end] = real_B_M.to(self.device)
        cols_C = torch.arange(end, device=self.device)
        causal_M_C = cols_C[None, :] <= torch.arange(self.width, end, device=self.device)[:, None]
        mask = additive_mask(self.colmask_B_C[:, None, :end] & causal_M_C[None], self.dtype)
        for layer in self.cache.layers:
            layer.visible = end
        keep = {} if all_positions else self._keep_kw
        out = self.model(input_ids=ids_B_M.to(self.device), attention_mask=mask, position_ids=pos_B_M.to(self.device),
                         use_cache=True, **{self._kw: self.cache}, **keep)
        self.cursor_1.add_(width)
        self.width = end
        if all_positions:
            return block_positions(out.logits, rows, tokens)
        return out.logits[list(rows), -1]

    # ---- single-token steps: one fixed-shape forward, captured on CUDA ----------------------
    def _extend_one(self, rows: Sequence[int], tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        batch = self.colmask_B_C.shape[0]
        self._reserve(self.width + 1)
        pin = self.device.type == "cuda"
        host_4_B = torch.zeros((4, batch), dtype=torch.long, pin_memory=pin)
        host_4_B[0].fill_(self.pad_id)
        host_4_B[1] = torch.tensor(self.lengths, dtype=torch.long)  # the position of a row's next real token
        rows_R = torch.tensor(list(rows), dtype=torch.long)
        host_4_B[0, rows_R] = torch.tensor([t[0] for t in tokens], dtype=torch.long)
        host_4_B[2, rows_R] = 1
        host_4_B[3, : len(rows)] = rows_R
        for row in rows:
            self.lengths[row] += 1
        self._in_4_B.copy_(host_4_B, non_blocking=pin)
        if self.capture and not self._graph_failed:
            if self._graph is None:
                self._capture()
            if self._graph is not None:
                self._graph.replay()
                self.replays += 1
        if self._graph is None:
            self._logits_B_V = self._step()
        self.width += 1
        return self._logits_B_V.index_select(0, self._in_4_B[3, : len(rows)])

    def _step(self) -> torch.Tensor:
        """The captured body: write the column mask at the cursor, run all rows over all columns, advance."""
        ids_B_1, pos_B_1, real_B_1 = self._in_4_B[0, :, None], self._in_4_B[1, :, None], self._in_4_B[2, :, None]
        self.colmask_B_C.index_copy_(1, self.cursor_1, real_B_1.bool())
        for layer in self.cache.layers:
            layer.visible = None
        mask = additive_mask(self.colmask_B_C[:, None, :], self.dtype)
        out = self.model(input_ids=ids_B_1, attention_mask=mask, position_ids=pos_B_1, use_cache=True,
                         **{self._kw: self.cache}, **self._keep_kw)
        self.cursor_1.add_(1)
        return out.logits[:, -1]

    def _capture(self) -> None:
        """Record `_step` as a CUDA graph (warm-up on a side stream first); on failure, stay eager.

        Warm-up runs write the column at the cursor and advance it; the cursor is put back after each,
        so the real step rewrites that column. Capture itself runs nothing, so it moves no cursor.
        """
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP):
                    self._step()
                    self.cursor_1.sub_(1)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # on the model's device, which need not be the current one (a producer on student.rollout_device)
            with torch.cuda.device(self.device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                logits_B_V = self._step()
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run this model eagerly
            current.wait_stream(side)
            self._graph_failed, self._graph = True, None
            self.cursor_1.fill_(self.width)
            self.colmask_B_C[:, self.width :] = False
            warn_once(f"static decoder: CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                       "decoding without graphs")
            return
        self._graph, self._logits_B_V = graph, logits_B_V
