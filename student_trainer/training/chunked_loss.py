"""The training loss from the student's last hidden states, a chunk of tokens at a time.

The plain loss (losses.py) takes logits for every position: at a 151,936-token vocabulary that is
0.58 MiB of float32 per token, and autograd keeps several such copies (logits, log-softmax, the
tail's masked copy, their gradients) for the whole batch until the backward. Here the lm_head
projection, the log-softmax and the per-token loss (any of losses.LOSSES: the (k+1)-category
reverse KL of every method but Veto and the SFT warmup) run over `chunk` tokens at a time, and each
chunk's forward is recomputed in the backward (activation checkpointing), so the peak holds one
chunk's vocabulary-wide tensors whatever the number of tokens. Liger's fused linear cross-entropy
and TRL's chunked divergence do the same for their losses; neither has the top-k + tail form.

Values and gradients equal the plain loss's (tests: 1e-5); with a single chunk nothing is
recomputed, so small vocabularies pay nothing for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from student_trainer.methods.losses import loss_rows
from student_trainer.methods.topk import TeacherTopK

# Vocabulary-wide elements per chunk: 2^25 float32 = 128 MiB a copy (220 tokens at vocab 151,936).
DEFAULT_CHUNK_ELEMENTS = 1 << 25


def chunk_tokens(vocab_size: int, elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one [chunk, vocab] tensor holds about `elements` entries."""
    return max(1, elements // max(1, vocab_size))


def _chunk_loss_sum(hidden_C_H: torch.Tensor, weight_V_H: torch.Tensor, bias_V: torch.Tensor | None,
                    ids_C_K: torch.Tensor, logprobs_C_K: torch.Tensor, tail_C: torch.Tensor | None,
                    tokens_C: torch.Tensor | None, name: str, veto_beta: float) -> torch.Tensor:
    """Σ over the chunk's tokens of the named loss; logits in the compute dtype, the loss in float32."""
    logp_C_V = F.linear(hidden_C_H, weight_V_H, bias_V).float().log_softmax(-1)
    loss_C = loss_rows(name, logp_C_V, TeacherTopK(ids_C_K, logprobs_C_K, tail_C), tokens_C, veto_beta)
    return loss_C.clamp_min(0.0).sum()  # rounding can put an exact-zero KL a hair below 0


def chunked_loss_sum(hidden_N_H: torch.Tensor, weight_V_H: torch.Tensor, bias_V: torch.Tensor | None,
                     targets: TeacherTopK, chunk: int, name: str = "reverse_kl",
                     tokens_N: torch.Tensor | None = None, veto_beta: float = 0.0) -> torch.Tensor:
    """Σ_n loss(π_S(·|h_n), π̂_T,n) with π_S = softmax(h_n Wᵀ + b), one `chunk` of rows at a time.

    Args:
        hidden_N_H: the student's final hidden states at the N loss positions (after the last norm).
        weight_V_H, bias_V: the output projection (lm_head), possibly tied to the embeddings.
        targets: the teacher's top-k at the same N positions, `ids`/`logprobs` (N, K), tail (N,).
        chunk: rows per chunk; N <= chunk runs once without recomputation.
        name, tokens_N, veto_beta: the loss (losses.LOSSES), the sampled next tokens (cross_entropy),
            Veto's β; as `losses.loss_rows` takes them.
    """
    n = hidden_N_H.shape[0]

    def part(x: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
        return None if x is None else x[rows]

    if n <= chunk:
        return _chunk_loss_sum(hidden_N_H, weight_V_H, bias_V, targets.ids, targets.logprobs,
                               targets.tail_logprob, tokens_N, name, veto_beta)
    total = hidden_N_H.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        rows = slice(s, min(s + chunk, n))
        total = total + checkpoint(_chunk_loss_sum, hidden_N_H[rows], weight_V_H, bias_V, targets.ids[rows],
                                   targets.logprobs[rows], part(targets.tail_logprob, rows), part(tokens_N, rows),
                                   name, veto_beta, use_reentrant=False)
    return total
