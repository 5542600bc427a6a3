"""The Hugging Face transformers backend: any causal LM, on CPU or GPU.

Scoring right-pads the batch (causal attention makes right padding invisible to real positions);
sessions left-pad the prompts and keep the model's KV cache, so one extend step costs one token of
compute per row however long the prefix is. Log-softmax always runs in float32.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from decoders.choose import DecoderKind, make_decoder
from decoders.kv_decode import KVDecoder
from decoders.static_decode import StaticKVDecoder
from shared.fingerprint import tokenizer_fingerprint
from shared.protocol import ScoreRequest, SequenceScores
from teacher_server.backends.base import (
    Backend,
    BackendInfo,
    SessionState,
    StepArrays,
    topk_with_tail,
)
from teacher_server.backends.lm_head import scores_from_logprobs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LOGIT_BUDGET = 1 << 27  # floats of float32 logits held at once per forward chunk (512 MB)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class HFSession(SessionState):
    """A session is a KV decoder over the session's rows."""

    def __init__(self, decoder: KVDecoder | StaticKVDecoder) -> None:
        self.decoder = decoder

    @property
    def lengths(self) -> list[int]:  # type: ignore[override]
        return self.decoder.lengths

    @property
    def nbytes(self) -> int:
        return self.decoder.nbytes


class HFBackend(Backend):
    def __init__(self, model: str, device: str = "cpu", dtype: str = "float32", name: str | None = None,
                 max_context: int | None = None, decoder: DecoderKind = "auto") -> None:
        torch_dtype = "auto" if dtype == "auto" else _DTYPES[dtype]
        self.device, self.decoder = torch.device(device), decoder
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        vocab = self.model.get_output_embeddings().weight.shape[0]
        limit = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.info = BackendInfo(
            name=name or model, backend="hf", vocab_size=int(vocab),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            max_context=int(min(max_context or limit, limit)),
            dtype=str(self.model.dtype).removeprefix("torch."), device=str(self.device),
        )

    # ---- scoring -------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, requests: list[ScoreRequest]) -> list[list[SequenceScores]]:
        flat = [(seq, s) for req in requests for seq, s in zip(req.sequences, req.starts(), strict=True)]
        logprobs = self._position_logprobs(flat)  # one (n_i, V) float32 tensor per sequence
        out, i = [], 0
        for req in requests:
            rows = []
            for seq, start in zip(req.sequences, req.starts(), strict=True):
                rows.append(scores_from_logprobs(logprobs[i], seq, start, req))
                i += 1
            out.append(rows)
        return out

    def _position_logprobs(self, flat: list[tuple[list[int], int]]) -> list[torch.Tensor]:
        """Float32 log-softmax at positions start..L-1 of each sequence, in bounded chunks."""
        vocab = self.info.vocab_size
        order = sorted(range(len(flat)), key=lambda j: len(flat[j][0]))
        result: list[torch.Tensor | None] = [None] * len(flat)
        chunk: list[int] = []
        for j in order + [None]:
            if j is not None:
                width = len(flat[j][0])
                if not chunk or (len(chunk) + 1) * width * vocab <= _LOGIT_BUDGET:
                    chunk.append(j)
                    continue
            if chunk:
                for idx, lp in zip(chunk, self._forward_chunk([flat[c] for c in chunk]), strict=True):
                    result[idx] = lp
            chunk = [j] if j is not None else []
        return result  # type: ignore[return-value]

    def _forward_chunk(self, items: list[tuple[list[int], int]]) -> list[torch.Tensor]:
        width = max(len(seq) for seq, _ in items)
        ids_B_T = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask_B_T = torch.zeros((len(items), width), dtype=torch.long)
        for b, (seq, _) in enumerate(items):
            ids_B_T[b, : len(seq)] = torch.tensor(seq)
            mask_B_T[b, : len(seq)] = 1
        logits = self.model(input_ids=ids_B_T.to(self.device), attention_mask=mask_B_T.to(self.device),
                            use_cache=False).logits
        return [logits[b, start : len(seq)].float().log_softmax(-1) for b, (seq, start) in enumerate(items)]

    # ---- sessions ------------------------------------------------------------------------
    def open_session(self, sequences: list[list[int]], top_k: int) -> tuple[HFSession, StepArrays]:
        # No capacity is known up front (the client decides how long a session runs): the static
        # buffers start at the prompt plus headroom and double, each doubling recaptures the step.
        session = HFSession(make_decoder(self.model, self.pad_id, kind=self.decoder))
        return session, self._top(session.decoder.prefill(sequences), top_k)

    def extend_session(self, state: HFSession, rows: list[int], tokens: list[list[int]], top_k: int,
                       all_positions: bool = False) -> StepArrays:
        return self._top(state.decoder.extend(rows, tokens, all_positions), top_k)

    @staticmethod
    def _top(logits_R_V: torch.Tensor, top_k: int) -> StepArrays:
        top_ids, top_lp, tail = topk_with_tail(logits_R_V.float().log_softmax(-1), top_k)
        return StepArrays(top_ids=_np(top_ids.int()), top_logprobs=_np(top_lp), tail_logprob=_np(tail))
