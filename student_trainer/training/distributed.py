"""torch.distributed for the trainer: one process per rank under torchrun, DDP or FSDP2, rank 0 writes.

    torchrun --nproc_per_node 4 -m student_trainer.cli --config FILE [--set train.parallel=fsdp]

Each rank rolls out its own slice of the global batch, asks the shared teacher itself and
backpropagates that slice; DDP all-reduces and FSDP reduce-scatters the gradients, both averaging
over ranks. Only rank 0 logs, evaluates and writes checkpoints, in the single-process format
(full weights, optimizer state keyed by parameter index), so a run resumes on any number of ranks.
Without torchrun (no WORLD_SIZE in the environment) nothing here touches torch.distributed.

FSDP2 shards parameters, gradients and optimizer state. Decoding token by token with a sharded
model would make every rank run the same number of forwards in lockstep (each one all-gathers),
so rollouts, eval and checkpoints use a plain full copy instead (student_model.make_policy),
refreshed after every optimizer step: one extra set of weights per rank, no gradients, no
optimizer state.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

Mode = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; the defaults are a single process."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    launched: bool = False  # under torchrun, in a process group (of any size, 1 included)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> range:
        """The global batch rows this rank rolls out: a contiguous slice of batch_size / world."""
        per_rank = batch_size // self.world
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)


def init(device: str) -> Dist:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), or stay single."""
    if "WORLD_SIZE" not in os.environ:
        return Dist(device=torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
        dist.init_process_group("nccl", device_id=where)
    else:
        where = torch.device(device)
        dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), where, launched=True)


def shutdown(d: Dist) -> None:
    if d.launched and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, d: Dist, mode: Mode, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The module to train: `model` itself in one process, else DDP-wrapped or FSDP2-sharded.

    `model` is a StudentLoss (its CausalLM under `.lm`). Under FSDP, `param_dtype` (bf16-mixed)
    becomes MixedPrecisionPolicy(param_dtype, reduce_dtype=float32); forward inputs keep their
    dtype, so teacher log-probs are never rounded to bf16.
    """
    if not d.launched:
        return model
    if mode == "ddp":
        ids = [d.device.index] if d.device.type == "cuda" else None
        # Buffers (rotary tables) never change, so nothing needs broadcasting at each forward.
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                                   cast_forward_inputs=False)
    blocks = set(getattr(model.lm, "_no_split_modules", None) or [])  # transformers' decoder layer classes
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The CausalLM's whole float32 state (keys as `lm.state_dict()`), gathered when FSDP shards it.

    A collective under FSDP: every rank calls it.
    """
    if not _is_fsdp(model):
        inner = getattr(model, "module", model)  # DDP's wrapped module
        return inner.lm.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k.removeprefix("lm."): v for k, v in full.items()}


def refresh_policy(model: torch.nn.Module, lm: torch.nn.Module, policy: torch.nn.Module) -> None:
    """Copy the updated weights into the rollout copy in place (a collective under FSDP)."""
    if policy is lm:
        return
    with torch.no_grad():
        policy.load_state_dict(full_state_dict(model))


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients over ranks in this backward only if `enabled` (the last micro-batch)."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if _is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
    yield


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """The global gradient norm before clipping (FSDP's is a sharded tensor, made whole here)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    full_tensor = getattr(norm, "full_tensor", None)
    return float(full_tensor() if full_tensor else norm)


def all_sum(d: Dist, *values: float) -> list[float]:
    """Each value summed over ranks (float64), in order."""
    if d.world == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def gather(d: Dist, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (pickled: for small things like step diagnostics)."""
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(d: Dist, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order: index i of a state dict is names[i]."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> dict[str, Any] | None:
    """The whole optimizer state in the single-process layout on rank 0, None elsewhere.

    Under FSDP this gathers the shards: a collective, so every rank calls it.
    """
    if not _is_fsdp(model):
        return optimizer.state_dict() if d.main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return None
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return {"state": {index[name]: s for name, s in full["state"].items()},
            "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in full["param_groups"]]}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a single-process-layout state (every rank holds it whole; FSDP keeps its shard)."""
    if not _is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
