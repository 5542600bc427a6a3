"""Batches of `method.name=offline_kd`: stored completions with their stored teacher top-k
(teacher/export.py), laid out exactly as an on-policy rollout so the loss code is the same.

Step k takes rows k*B .. (k+1)*B-1 of an endless sequence of shuffled epochs (seeded by data.seed),
so, like every other method, a resumed run sees the batches an uninterrupted one would have.
A batch is a Rollout: prompts left-padded to a common width P, completions after them, the loss at
positions P-1 .. P-1+n-1, and the stored targets at those positions (as targets.score_targets
would place the live teacher's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from student_trainer.data import _permutation
from student_trainer.rollouts.rollout import Rollout, left_pad
from student_trainer.rollouts.targets import place
from student_trainer.teacher.export import load_shards


@dataclass
class OfflineData:
    shards: dict[str, torch.Tensor]  # teacher/export.py load_shards
    pad_id: int
    seed: int = 0

    def __post_init__(self) -> None:
        s = self.shards
        lens = s["seq_offsets"][1:] - s["seq_offsets"][:-1]
        self.completion_lens = lens - s["prompt_lens"].long()
        self.target_offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.completion_lens.cumsum(0)])
        self.top_k = int(s["top_k"])

    @classmethod
    def open(cls, path: str | Path, pad_id: int, seed: int = 0) -> OfflineData:
        return cls(load_shards(Path(path)), pad_id, seed)

    def __len__(self) -> int:
        return self.completion_lens.numel()

    def batch_rows(self, step: int, size: int) -> list[int]:
        """Rows of global batch `step`: positions step*size.. of the shuffled epochs."""
        n = len(self)
        return [_permutation(n, self.seed, i // n)[i % n] for i in range(step * size, (step + 1) * size)]

    def rollout(self, rows: list[int]) -> Rollout:
        """The stored rows as one batch with their targets in place."""
        s, prompts, completions = self.shards, [], []
        for r in rows:
            seq = s["tokens"][s["seq_offsets"][r] : s["seq_offsets"][r + 1]].long()
            p = int(s["prompt_lens"][r])
            prompts.append(seq[:p].tolist())
            completions.append(seq[p:])
        prompt_B_P, prompt_mask_B_P = left_pad(prompts, self.pad_id)
        width, n_max = prompt_B_P.shape[1], max(c.numel() for c in completions)
        batch = len(rows)
        response_B_N = torch.full((batch, n_max), self.pad_id, dtype=torch.long)
        response_mask_B_N = torch.zeros((batch, n_max), dtype=torch.long)
        ids = torch.zeros((batch, n_max, self.top_k), dtype=torch.long)
        lps, tail = torch.zeros((batch, n_max, self.top_k)), torch.zeros((batch, n_max))
        for b, (r, c) in enumerate(zip(rows, completions, strict=True)):
            n, t0 = c.numel(), int(self.target_offsets[r])
            response_B_N[b, :n], response_mask_B_N[b, :n] = c, 1
            ids[b, :n], lps[b, :n] = s["top_ids"][t0 : t0 + n], s["top_logprobs"][t0 : t0 + n]
            tail[b, :n] = s["tail_logprob"][t0 : t0 + n]
        tokens = torch.cat([prompt_B_P, response_B_N], 1)
        attention = torch.cat([prompt_mask_B_P, response_mask_B_N], 1)
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[:, width - 1 : width - 1 + n_max] = response_mask_B_N.bool()
        lens = torch.tensor([c.numel() for c in completions])
        return Rollout(tokens, attention, loss_mask, width, lens, place(ids, lps, tail, width, tokens.shape[1]))

    def rollouts(self, step: int, batch_size: int, rows: range, per_rollout: int) -> list[Rollout]:
        """This rank's slice `rows` of global batch `step`, `per_rollout` rows a Rollout."""
        picked = self.batch_rows(step, batch_size)[rows.start : rows.stop]
        return [self.rollout(picked[i : i + per_rollout]) for i in range(0, len(picked), per_rollout)]
