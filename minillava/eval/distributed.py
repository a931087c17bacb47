"""Data parallel under torchrun: rank and world from the environment, one barrier, nothing else.

Replicas never exchange answers: each appends to its own file and rank 0 merges them (answers.py); they
exchange only what their share of the run cost (eval/efficiency.py), for the summary line.

With --tensor-parallel N the world of D x N processes is D replicas of N ranks each: ranks r N .. r N + N - 1
are replica r, one model split over them (minillava/tensor_parallel.py, in their own process group). A
replica is what one process is without tensor parallelism: it takes its share of the questions, and its
first rank writes the answers (every rank of it computes the same ones).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..tensor_parallel import LaunchError, Shard


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    shard: Shard | None = None  # this rank's place in its replica's model (--tensor-parallel N > 1)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def replica(self) -> int:
        """Which of the `replicas` this process belongs to: what shares the questions out."""
        return self.rank // self.shard.size if self.shard else self.rank

    @property
    def replicas(self) -> int:
        return self.size // self.shard.size if self.shard else self.size

    @property
    def writes(self) -> bool:
        """Whether this process writes its replica's answers (its first rank)."""
        return self.shard is None or self.shard.rank == 0

    def barrier(self):
        if self.size > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every process's `obj` (picklable), in rank order; [obj] in one process. Collective."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init(device_type: str, tensor_parallel: int = 1) -> World:
    """The process's place among torchrun's (RANK, WORLD_SIZE, LOCAL_RANK); one process without them.
    `tensor_parallel` N > 1: its replica's process group too; LaunchError (before any process group)
    unless the world is D x N processes.

    nccl between GPUs, gloo on CPU. The timeout is long because ranks wait at the final barrier
    for the slowest one; if a rank dies, torchrun stops the others."""
    world = World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                  int(os.environ.get("LOCAL_RANK", 0)))
    check_launch(tensor_parallel, world.size)
    if world.size > 1:
        if device_type == "cuda":
            torch.cuda.set_device(world.local_rank)
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {"device_id": torch.device("cuda", world.local_rank)} if device_type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(hours=6), **kwargs)
    if tensor_parallel > 1:  # every rank makes every replica's group (collective); each keeps its own
        group, _ = dist.new_subgroups(tensor_parallel)  # ranks r N .. r N + N - 1
        world.shard = Shard(world.rank % tensor_parallel, tensor_parallel, group)
    return world


def check_launch(n: int, world: int):
    """LaunchError (one line, the same on every rank) unless `world` processes are D x `n`."""
    if n < 1:
        raise LaunchError(f"--tensor-parallel must be at least 1, got {n}")
    if n > world:
        raise LaunchError(f"--tensor-parallel {n} needs at least {n} processes, " + (
            f"torchrun started {world}" if world > 1 else "one per rank") +
            f": launch it with torchrun --nproc-per-node {n} (or D x {n} for D data-parallel replicas) "
            "-m minillava.eval ...")
    if world % n:
        raise LaunchError(f"--tensor-parallel {n} does not divide torchrun's {world} processes: launch D x {n} of "
                          f"them, D data-parallel replicas of {n} tensor-parallel ranks")
