"""One random stream per rollout row, so a row's draws never depend on which rows share its batch.

With one generator per batch, row b's noise depends on how many rows were drawn beside it (and on
which of them already stopped), so splitting a batch over ranks or micro-batches changes every
sample. Seeding each row from (seed, step, global row index) instead makes the rows a rank samples
exactly the rows one process would have sampled: an N-rank run reproduces a 1-rank run.

Samplers take `generator: Generator`, either a plain `torch.Generator` (one stream for the batch)
or a `RowGenerators` (one per row), and draw their uniforms through `uniform`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_MASK_64 = (1 << 64) - 1


class RowGenerators:
    """A `torch.Generator` per row; `rows(index)` is the same streams for a subset, in that order."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)

    @classmethod
    def seeded(cls, seed: int, step: int, rows: Sequence[int], device: str | torch.device = "cpu") -> RowGenerators:
        """Streams for global rows `rows` of optimizer step `step`: a pure function of the three."""
        gens = []
        for row in rows:
            entropy = [seed & _MASK_64, step & _MASK_64, row & _MASK_64]
            state = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
            gens.append(torch.Generator(device=device).manual_seed(state))
        return cls(gens)

    def __len__(self) -> int:
        return len(self.generators)

    def rows(self, index: torch.Tensor | Sequence[int]) -> RowGenerators:
        index = index.tolist() if isinstance(index, torch.Tensor) else index
        return RowGenerators([self.generators[i] for i in index])

    def rand(self, shape_N_C: Sequence[int], device: torch.device) -> torch.Tensor:
        """Uniforms (N, C): row i from stream i."""
        n, *rest = shape_N_C
        if n != len(self.generators):
            raise ValueError(f"{n} rows of noise asked from {len(self.generators)} row generators")
        if n == 0:
            return torch.empty(tuple(shape_N_C), device=device)
        return torch.stack([torch.rand(rest, generator=g, device=device) for g in self.generators])


Generator = torch.Generator | RowGenerators | None


def uniform(shape_N_C: Sequence[int], generator: Generator, device: torch.device) -> torch.Tensor:
    """U[0, 1) float32 noise of `shape_N_C` from either kind of generator."""
    if isinstance(generator, RowGenerators):
        return generator.rand(shape_N_C, device)
    return torch.rand(tuple(shape_N_C), generator=generator, device=device, dtype=torch.float32)


def rows_of(generator: Generator, index: torch.Tensor) -> Generator:
    """The generator for a subset of rows: per-row streams are subset, a shared stream is shared."""
    return generator.rows(index) if isinstance(generator, RowGenerators) else generator
