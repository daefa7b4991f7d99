"""A KV cache holding the base run's keys and values for a chunk's unchanged prefix.

Every row group of a chunk (one patch per group) shares the same prefix: positions ``[0, p0)`` of
the base run. HF's ``DynamicCache(ddp_cache_data=...)`` needs them repeated per group and then
concatenates them once when filling and again when a layer appends its new keys (three copies of
the prefix per layer, and a cache entry even for layers the chunk does not run). Here each layer
allocates ``[rows, kv_heads, p0 + q, d_head]`` on its first ``update`` and writes the shared prefix
into it by one broadcast copy and the new keys after it; layers that never run allocate nothing.
"""

from __future__ import annotations

import torch

from ..hf_compat import PrefixLayer, cache_of_layers


def prefix_cache(past: list[tuple[torch.Tensor, torch.Tensor]], p0: int):
    """A cache for row groups whose first ``p0`` positions are the base run's (each layer takes the
    number of groups from the keys it is given: ``rows // n``).

    Args:
        past: [(keys, values)] per layer, each [n, kv_heads, T, d_head] (the base run's cache).
        p0: positions already in the cache.
    """
    return cache_of_layers([PrefixLayer(kk, vv, p0) for kk, vv in past])
