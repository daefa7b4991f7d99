"""Sharded sweeps over ``torch.distributed`` (launched with ``torchrun``; gloo on CPU, NCCL on GPUs).

Contract:

- Each rank computes the chunks ``i % world == rank`` of a sweep's work list with the fused
  engine (``shard=(rank, world)``); the chunks of other ranks are NaN in its local result.
- :func:`gather` sums the NaN-free parts of every rank's result (chunks are disjoint), so
  every rank ends with the full result; rank 0 saves it once.
- With a ``checkpoint_dir`` shared by the ranks, each finished chunk is a file; a rank that
  dies leaves its finished chunks there, and a relaunch with the same world size recomputes
  only the missing ones.
- Results gathered on rank 0 equal the single-process result (same chunks, same arithmetic).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from .results import Result


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``...).

    Returns (rank, world). Without torchrun's variables (or with WORLD_SIZE=1): (0, 1), no group.
    ``backend``: default NCCL when CUDA is available, else gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def gather(result: Result) -> Result:
    """Combine the ranks' partial results (NaN where another rank's chunks are) into the full one.

    Runs an all-reduce of the values with NaN set to 0 and of a count of filled cells; a cell
    filled by no rank stays NaN. Without a process group the result is returned unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return result
    out = _sum_disjoint(result.values).to(result.values.dtype)
    meta = dict(result.meta, shard=[0, 1], world_size=dist.get_world_size())
    return Result(out, result.axes, result.labels, result.baselines, meta, result.name)


def _sum_disjoint(values: torch.Tensor) -> torch.Tensor:
    """All-reduce a tensor whose cells are NaN except on the rank that computed them."""
    v = values.detach().double()
    filled = (~torch.isnan(v)).double()
    total = torch.nan_to_num(v, nan=0.0)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total, filled = total.to(device), filled.to(device)
    dist.all_reduce(total)
    dist.all_reduce(filled)
    total, filled = total.cpu(), filled.cpu()
    if (filled > 1).any():
        raise RuntimeError("two ranks computed the same cell: the shards overlap (different world sizes?)")
    return torch.where(filled > 0, total, torch.full_like(total, float("nan")))


def gather_study(study):
    """Combine the ranks' :func:`mechkit.heads.ablation_study` results (random seeds sharded)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return study
    for m, vals in study.random.items():
        study.random[m] = _sum_disjoint(torch.tensor(vals)).tolist()
    study.meta = dict(study.meta, shard=[0, 1], world_size=dist.get_world_size())
    return study


def sharded(fn: Callable[..., Result], *args, **kwargs) -> Result:
    """Run ``fn(*args, shard=(rank, world), **kwargs)`` on every rank and gather the result."""
    rank, world = init_from_env()
    return gather(fn(*args, shard=(rank, world), **kwargs))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
