"""Data parallel under torchrun: rank and world from the environment, one barrier, nothing else.

Ranks never exchange answers: each appends to its own file and rank 0 merges them (answers.py); they
exchange only what their share of the run cost (eval/efficiency.py), for the summary line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

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


def init(device_type: str) -> World:
    """The process's place among torchrun's (RANK, WORLD_SIZE, LOCAL_RANK); one process without them.

    nccl between GPUs, gloo on CPU. The timeout is long because ranks wait at the final barrier
    for the slowest one; if a rank dies, torchrun stops the others."""
    world = World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                  int(os.environ.get("LOCAL_RANK", 0)))
    if world.size > 1:
        if device_type == "cuda":
            torch.cuda.set_device(world.local_rank)
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {"device_id": torch.device("cuda", world.local_rank)} if device_type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(hours=6), **kwargs)
    return world
