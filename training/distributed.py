"""Meta-training on several processes and machines (torchrun), with one process's semantics.

`torchrun --nproc_per_node N -m training.cli train ...` starts N processes and tells each
its RANK and WORLD_SIZE (and where rank 0 listens). Every process then

- loads and prepares the same data (deterministic, so the same episodes sampler and the
  same initial parameters; rank 0's parameters are broadcast anyway),
- draws the same global meta-batch of N x B users from the shared sampler state and builds
  only its own contiguous block of B episodes (EpisodeSampler.sample's `shard`),
- after backward, all-reduces the gradients weighted by its number of users: every rank
  then holds the gradient of the mean loss over the global batch and takes the same Adam
  step, so a run with N ranks of B equals one process with a meta-batch of N x B up to the
  order of float additions,
- scores a 1/N share of the validation users; the shares are combined and rank 0's result
  broadcast, so early stopping is decided once, identically everywhere,
- leaves checkpoints, logs and the artifact to rank 0.

Why not DistributedDataParallel: the model is pure functions over a dict of parameters
(torch.func), not an nn.Module. DDP's bucketed all-reduce of the gradients is what
`Collective.average_gradients` does explicitly, in one flat all-reduce per meta-step.
Training runs on the CPU, so the backend is gloo.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in a job: rank in [0, world_size)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(f"need 0 <= rank < world_size and local_rank >= 0, got {self}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_environment(environ: Mapping[str, str] = os.environ) -> "Ranks":
        """The ranks torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); one process without them."""
        if "WORLD_SIZE" not in environ:
            return Ranks()
        try:
            return Ranks(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", "0")))
        except (KeyError, ValueError) as error:
            raise ValueError(f"WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not integers ({error}): start with torchrun") from None


@dataclass(frozen=True)
class ProcessGroupConfig:
    """How the processes of a job meet."""

    backend: str = "gloo"  # training runs on the CPU; gloo is torch's CPU collective backend
    timeout_s: float = 1800.0  # a collective waiting longer than this fails the job

    def __post_init__(self) -> None:
        if self.backend != "gloo":
            raise ValueError(f"backend must be 'gloo' (meta-training runs on the CPU), got {self.backend!r}")
        if not self.timeout_s > 0:
            raise ValueError("timeout_s must be positive")


class Collective:
    """What MetaTrainer asks of the other processes; with one process every call is the identity."""

    def __init__(self, ranks: Ranks = Ranks()) -> None:
        if ranks.world_size > 1 and not dist.is_initialized():
            raise RuntimeError("a Collective over several processes needs an initialised process group (process_group())")
        self.ranks = ranks

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main

    @property
    def shard_of(self) -> tuple[int, int]:
        """(index, count) of this process's block of a meta-batch."""
        return self.rank, self.world_size

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's contiguous block of items (blocks differ in length by at most one)."""
        n = len(items)
        return list(items[n * self.rank // self.world_size : n * (self.rank + 1) // self.world_size])

    def average_gradients(self, tensors: Sequence[torch.Tensor], loss: float, weight: float) -> float:
        """Replaces each tensor's .grad by the weight-averaged gradient over all processes;
        returns the weight-averaged loss.

        Each process's loss is a mean over its `weight` users (plus terms that do not depend
        on the batch), so the weighted average is the loss of the whole meta-batch. A tensor
        with no gradient on any process keeps none, as Adam skips it in one process too.
        Summed in float64, so the only difference from one process is the order of additions.
        """
        if self.world_size == 1:
            return loss
        grads = [t.grad for t in tensors]
        parts = [
            (g.detach().to(torch.float64).reshape(-1) * weight) if g is not None else torch.zeros(t.numel(), dtype=torch.float64)
            for t, g in zip(tensors, grads)
        ]
        present = torch.tensor([g is not None for g in grads], dtype=torch.float64)
        flat = torch.cat([*parts, torch.tensor([loss * weight, float(weight)], dtype=torch.float64), present])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        total = flat[-len(tensors) - 1]
        offset = 0
        for t, part, count in zip(tensors, parts, flat[-len(tensors) :].tolist()):
            if count > 0:
                t.grad = (flat[offset : offset + part.numel()] / total).to(t.dtype).reshape(t.shape)
            offset += part.numel()
        return float(flat[offset] / total)

    def mean_of_shards(self, value: float, count: int) -> float:
        """The count-weighted mean of each process's `value`, as rank 0 computed it."""
        if self.world_size == 1:
            return value
        totals = torch.tensor([value * count, float(count)], dtype=torch.float64)
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        dist.broadcast(totals, src=0)  # one decision: every rank takes rank 0's bits
        return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrites the tensors in place with rank 0's values."""
        if self.world_size == 1 or not tensors:
            return
        with torch.no_grad():
            flat = torch.cat([t.detach().to(torch.float64).reshape(-1) for t in tensors])
            dist.broadcast(flat, src=0)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].reshape(t.shape).to(t.dtype))
                offset += t.numel()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_succeeded(self, ok: bool) -> bool:
        """True on every process when `ok` is true on every process."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        return float(flag) == 0.0


@contextmanager
def process_group(ranks: Ranks, config: ProcessGroupConfig = ProcessGroupConfig()) -> Iterator[Collective]:
    """The job's Collective; joins (and finally leaves) torch's process group when there are
    several processes. Rank 0's address comes from torchrun's MASTER_ADDR / MASTER_PORT."""
    if ranks.world_size == 1:
        yield Collective(ranks)
        return
    dist.init_process_group(
        config.backend,
        init_method="env://",
        rank=ranks.rank,
        world_size=ranks.world_size,
        timeout=timedelta(seconds=config.timeout_s),
    )
    try:
        yield Collective(ranks)
    finally:
        dist.destroy_process_group()
