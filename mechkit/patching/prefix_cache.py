"""A KV cache holding the base run's keys and values for a chunk's unchanged prefix.

Every row group of a chunk (one patch per group) shares the same prefix: positions ``[0, p0)`` of
the base run. HF's ``DynamicCache(ddp_cache_data=...)`` needs them repeated per group and then
concatenates them once when filling and again when a layer appends its new keys (three copies of
the prefix per layer, and a cache entry even for layers the chunk does not run). Here each layer
allocates ``[k * n, kv_heads, p0 + q, d_head]`` on its first ``update`` and writes the shared prefix
into it by one broadcast copy and the new keys after it; layers that never run allocate nothing.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PrefixLayer(DynamicLayer):
    """One decoder layer's cache: the base prefix ``keys/values [n, kv_heads, T, d_head]`` (first
    ``p0`` positions used) repeated over ``k`` row groups, filled lazily."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, k: int, p0: int):
        super().__init__()
        self._prefix, self._k, self._p0 = (keys, values), k, p0

    def _fill(self, prefix: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        n, h, _, dh = prefix.shape
        q = new.shape[-2]
        buf = new.new_empty((self._k * n, h, self._p0 + q, dh))
        buf.view(self._k, n, h, self._p0 + q, dh)[:, :, :, :self._p0] = prefix[:, :, :self._p0].to(new.device, new.dtype)
        buf[:, :, self._p0:] = new
        return buf

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._prefix is None:  # a second call (not made by a single forward): grow as DynamicLayer does
            return super().update(key_states, value_states, *args, **kwargs)
        self.device = key_states.device
        self.keys = self._fill(self._prefix[0], key_states)
        self.values = self._fill(self._prefix[1], value_states)
        self.is_initialized, self._prefix = True, None
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._p0 if self._prefix is not None else super().get_seq_length()


def prefix_cache(past: list[tuple[torch.Tensor, torch.Tensor]], k: int, p0: int) -> DynamicCache:
    """A cache for ``k`` row groups whose first ``p0`` positions are the base run's.

    Args:
        past: [(keys, values)] per layer, each [n, kv_heads, T, d_head] (the base run's cache).
        k: row groups (patches) of the chunk. p0: positions already in the cache.
    """
    cache = DynamicCache()
    cache.layers = [PrefixLayer(kk, vv, k, p0) for kk, vv in past]
    return cache
