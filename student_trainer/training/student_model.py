"""The student as the trainer holds it: float32 master weights, a loss module, a copy for rollouts.

    master  (the CausalLM, float32)  ← AdamW updates these, its states are float32 too
    loss    StudentLoss(master)      ← what DDP / FSDP wrap: forward = body, chunked lm_head + KL
    policy  the CausalLM rollouts, eval and the KL probe use: the master itself, or a plain copy
            (bfloat16 under `bf16-mixed`, unsharded under FSDP) refreshed in place after each step

Why a copy for rollouts under bf16-mixed: autocast would re-cast every weight at every decode step
(a full read and write of the model per token), while a bf16 copy costs one cast per optimizer
step, and its parameters keep their addresses (`copy_`), which captured CUDA graphs rely on.

Why train on float32 masters: AdamW on bf16 weights rounds most updates away (docs/gpu.md: 1.25% of
the weights changed after 5 steps at lr 1e-6). Under `bf16-mixed` the forward and backward run in
bf16 (autocast; FSDP2's MixedPrecisionPolicy when sharded), the log-softmax and KL in float32.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Literal

import torch

from decoders.kv_decode import position_ids
from student_trainer.methods.losses import distill_loss, next_tokens
from student_trainer.methods.topk import TeacherTopK
from student_trainer.training.chunked_loss import chunk_tokens, chunked_loss_sum

Precision = Literal["fp32", "bf16-mixed"]


def compute_dtype(precision: Precision) -> torch.dtype | None:
    """The autocast dtype of a precision mode (None: compute in the weights' own dtype)."""
    return torch.bfloat16 if precision == "bf16-mixed" else None


def hidden_path_matches(lm: torch.nn.Module) -> bool:
    """Does lm_head(base_model(x)) give the model's own logits? False for heads that post-process
    (logit soft-capping, logit scales), which then fall back to the full-logits loss."""
    head, body = lm.get_output_embeddings(), getattr(lm, "base_model", None)
    if head is None or body is None or body is lm:
        return False
    ids = torch.arange(4, device=head.weight.device).remainder(lm.config.vocab_size)[None]
    with torch.no_grad():
        reference = lm(input_ids=ids).logits.float()
        ours = head(body(input_ids=ids).last_hidden_state).float()
    return ours.shape == reference.shape and torch.allclose(ours, reference, rtol=1e-4, atol=1e-4)


class StudentLoss(torch.nn.Module):
    """forward(batch) = this batch's share of the token-mean loss; holds the CausalLM as `lm`.

    `chunk` tokens go through lm_head and the loss at a time (chunked_loss.py); None picks it from
    the vocabulary size (about 2^25 logits a chunk); 0 runs the reference path: full logits from
    the model, then the loss over all of them.
    """

    def __init__(self, lm: torch.nn.Module, chunk: int | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.lm, self.autocast_dtype = lm, autocast_dtype
        self.chunk = chunk_tokens(lm.config.vocab_size) if chunk is None else chunk
        if self.chunk and not hidden_path_matches(lm):
            self.chunk = 0

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                target_ids: torch.Tensor, target_logprobs: torch.Tensor, target_tail: torch.Tensor | None,
                n_tokens: float, loss: str = "reverse_kl", veto_beta: float = 0.0) -> torch.Tensor:
        """Σ loss over this batch's loss positions / `n_tokens` (the whole batch's count, all ranks).

        `loss` and `veto_beta` name the per-token loss as losses.loss_rows takes them (methods/plan.loss_plan).
        """
        targets = TeacherTopK(target_ids, target_logprobs, target_tail)
        positions = position_ids(attention_mask)
        with self._autocast(input_ids.device):
            if not self.chunk:
                logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
                return distill_loss(logits, targets, loss_mask, n_tokens, loss, input_ids, veto_beta)[0]
            hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=positions).last_hidden_state
            mask = loss_mask.bool()
            head = self.lm.get_output_embeddings()
            return chunked_loss_sum(hidden[mask], head.weight, head.bias, targets.select(mask), self.chunk, loss,
                                    next_tokens(input_ids)[mask], veto_beta) / n_tokens


def make_policy(lm: torch.nn.Module, precision: Precision, separate: bool) -> torch.nn.Module:
    """The module rollouts decode with: `lm` itself, or a frozen copy (bf16 under bf16-mixed)."""
    if precision == "fp32" and not separate:
        return lm
    policy = copy.deepcopy(lm).requires_grad_(False)
    return policy.to(torch.bfloat16) if precision == "bf16-mixed" else policy
