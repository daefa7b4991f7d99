"""The one sweep driver: plan -> checkpoint store -> runner -> chunk loop -> gather.

A *sweep* is a list of work items, the rows of a LongTensor grid ``[N, d]`` (column 0 the layer),
each worth one number. A *runner* (the :class:`Runner` protocol) computes the numbers of a chunk of
items in one batched pass: the fused activation-patching runner, the head-knockout sweep (the same
runner over ``attn.hook_z``) and the path-patching runner all implement it. The driver

1. orders and cuts the grid into chunks (:func:`mechkit.patching.plan.plan_chunks`, a cost model
   of the work each chunk can skip),
2. opens the checkpoint store (:class:`mechkit.patching.checkpoint.ChunkStore`) under a key of
   what the sweep computes and of the plan,
3. runs this process's shard of the chunks (``i % world == rank``), reading finished chunks
   back from the store and saving new ones, with a progress bar,
4. scatters the values back into grid order: NaN for the items of other shards
   (:mod:`mechkit.distributed` gathers them).

How a sweep runs (not what it computes) is one frozen :class:`SweepOptions`.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from ..hookpoints import installed_hooks
from ..options import merge_options
from .checkpoint import ChunkStore, sweep_key
from .plan import overhead_token_layers, plan_chunks


def check_batch_tokens(value, name: str = "max_batch_tokens") -> int:
    """A positive integer (rows x positions per forward), or TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer() and value > 0:
            return int(value)
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def check_shard(shard) -> tuple[int, int]:
    """``shard`` as ``(rank, world)`` ints with ``0 <= rank < world``; ``ValueError`` otherwise."""
    try:
        rank, world = shard
    except (TypeError, ValueError):
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}") from None
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in (rank, world)):  # 0.5 was truncated
        raise ValueError(f"shard must be (rank, world) ints with 0 <= rank < world, got {shard!r}")
    rank, world = int(rank), int(world)
    if not (0 <= rank < world):
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    return rank, world


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs: chunk budget, checkpoints, shard, progress.

    Attributes:
        max_batch_tokens: rows x computed positions per forward pass (the chunk budget).
        max_batch_bytes: a memory budget per forward instead (bytes, or ``"2GB"``, ``"512MiB"``),
            converted to ``max_batch_tokens`` by :mod:`mechkit.patching.memory`.
        checkpoint_dir: finished chunks are written there atomically and read back on a rerun.
        shard: ``(rank, world)``: this process computes chunks ``i % world == rank`` (others NaN).
        progress: show a tqdm bar (one tick per chunk).
        on_chunk: ``fn(chunk_index, values)`` after each computed chunk.
        skip_layers, skip_prefix: activation patching's shortcuts: do not run layers below a chunk's
            lowest patched layer / positions before its earliest patched position.
        forward_overhead: the planner's fixed cost of one forward pass per layer, in token-layers
            (None: :func:`mechkit.patching.plan.overhead_token_layers` of the model width). Larger
            values make fewer, bigger chunks. It shapes the chunk plan only, never the values.
    """

    max_batch_tokens: int = 8192
    max_batch_bytes: int | str | None = None
    checkpoint_dir: str | os.PathLike | None = None
    shard: tuple[int, int] = (0, 1)
    progress: bool = True
    on_chunk: Callable[[int, torch.Tensor], None] | None = None
    skip_layers: bool = True
    skip_prefix: bool = True
    forward_overhead: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "shard", check_shard(self.shard))
        object.__setattr__(self, "max_batch_tokens", check_batch_tokens(self.max_batch_tokens))

    @classmethod
    def merge(cls, options: SweepOptions | None, overrides: Mapping, where: str) -> SweepOptions:
        """``options`` (default: the defaults) with keyword ``overrides`` (field names) applied;
        ``where`` names the calling function in the error for an unknown keyword."""
        return merge_options(cls, options, overrides, where)


@runtime_checkable
class Runner(Protocol):
    """Computes one chunk of a sweep in one batched pass.

    ``n``: rows (prompts) per item; ``T``: positions per row; ``pos_column``: the grid column
    holding each item's position when the runner skips the positions before a chunk's earliest
    one (None otherwise); ``grows``: whether each item's rows join the forward at the item's own
    layer (the plan then charges no item for the layers below its own); ``model``: the HookedModel
    (its ``cfg.n_layers``/``d_model`` size the plan).
    """

    n: int
    T: int
    pos_column: int | None
    grows: bool

    def run(self, items: torch.Tensor) -> torch.Tensor:
        """items: LongTensor [k, d] on the CPU (rows of the grid) -> [k] float values."""
        ...


def run_sweep(runner: Runner, grid: torch.Tensor, options: SweepOptions, key: Mapping, desc: str):
    """Run every item of ``grid`` with ``runner``, chunk by chunk (see the module docstring).

    Args:
        runner: a :class:`Runner`. grid: LongTensor [N, d], column 0 the layer.
        options: :class:`SweepOptions` (``max_batch_tokens`` is the budget; a byte budget must be
            converted by the caller, which knows the activation sizes).
        key: what the values depend on, ``{"task": ..., "metric": ..., "options": {...}}`` (see
            :mod:`mechkit.patching.checkpoint`); the model's weights and the chunk plan are added. It keys
            the checkpoint folder (computed only when there is one). desc: the progress bar's label.

    Returns:
        (raw [N] float32, NaN outside this shard; info: n_chunks, chunk_size, chunk_sizes,
        chunks_computed, forward_overhead).
    """
    rank, world = options.shard
    cfg = runner.model.cfg
    overhead = options.forward_overhead if options.forward_overhead is not None else overhead_token_layers(cfg.d_model)
    order, spans = plan_chunks(grid, runner.pos_column, runner.n, runner.T, cfg.n_layers, options.max_batch_tokens,
                               overhead, options.skip_layers, runner.grows)
    store_key = None
    if options.checkpoint_dir is not None:  # the weights, task, metric and options the chunks depend on
        parts = dict(key)
        parts.setdefault("weights", runner.model)
        parts["options"] = dict(parts.get("options", {}), plan=spans)
        hf = getattr(runner.model, "hf_model", runner.model)
        if isinstance(hf, torch.nn.Module) and (hooks := installed_hooks(hf)):  # an ablation, a steering, a hook
            parts["hooks"] = hooks
        store_key = sweep_key(**parts)
    store = ChunkStore(options.checkpoint_dir, store_key, len(spans))
    raw = torch.full((len(grid),), math.nan)
    computed = 0
    for i in tqdm([i for i in range(len(spans)) if i % world == rank], desc=desc, disable=not options.progress,
                  unit="chunk"):
        s, e = spans[i]
        vals = store.load(i, e - s)
        if vals is None:
            vals = runner.run(grid[order[s:e]]).cpu()
            store.save(i, vals)
            computed += 1
            if options.on_chunk is not None:
                options.on_chunk(i, vals)
        raw[order[s:e]] = vals
    sizes = [e - s for s, e in spans]
    info = dict(n_chunks=len(spans), chunk_size=max(sizes, default=0), chunk_sizes=sizes, chunks_computed=computed,
                forward_overhead=overhead)
    return raw, info
