"""torchrun / DistributedDataParallel plumbing: process group, samplers, cross-rank reductions.

One process per device. `--batch-size` is per process (as in torchvision's references), so the global
batch is batch_size * world_size. Every rank sees a disjoint shard of each epoch's permutation; the
union of the ranks' i-th batches is exactly the i-th batch a single process would draw with the
same seed, which is what makes a 2-process run reproduce a 1-process run with the global batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from core.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_arg: str) -> tuple[Dist, torch.device]:
    """Read torchrun's environment; start the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if device_arg == "auto":
            return Dist(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(), torch.device(device_arg)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
    if cuda:
        if local >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices; lower --nproc_per_node"
            )
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local), device


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast(d: Dist, obj: Any) -> Any:
    """Rank 0's value of a picklable object on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_all(d: Dist, values: list[float]) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def gather_arrays(d: Dist, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Concatenate each array across ranks in rank order (every rank gets the result)."""
    if not d.enabled:
        return arrays
    parts: list[Any] = [None] * d.world
    dist.all_gather_object(parts, arrays)
    out = []
    for i in range(len(arrays)):
        pieces = [p[i] for p in parts if p[i].size]
        out.append(np.concatenate(pieces) if pieces else arrays[i])
    return tuple(out)


def epoch_order(n: int, seed: int, epoch: int, d: Dist) -> list[int]:
    """This rank's training indices for one epoch: a seeded permutation, padded to a multiple of the world
    size (like DistributedSampler), then strided so that rank r holds positions r, r+W, r+2W, ..."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if d.world > 1 and n % d.world:
        order += order[: d.world - n % d.world]
    return order[d.rank :: d.world]


def eval_indices(n: int, d: Dist) -> list[int]:
    """Evaluation shard without padding (no sample counted twice); results are gathered afterwards."""
    return list(range(d.rank, n, d.world))
