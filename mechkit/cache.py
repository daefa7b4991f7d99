"""ActivationCache: recorded activations by hook name, with residual-stream decompositions.

Shapes: residual points [batch, pos, d_model]; per-head points [batch, pos, head, d_head];
patterns [batch, head, q, k]. Stacks returned here are [component, batch, pos, d_model].
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .cache_tl import ResidualHelpers, tl_key
from .io import atomic_path

if TYPE_CHECKING:
    from .inputs import Batch
    from .model import HookedModel


class ActivationCache(ResidualHelpers, Mapping[str, torch.Tensor]):
    """A read-only mapping ``name -> tensor`` plus helpers that need the model's weights.

    Keys: hook names, or TransformerLens's tuples (``cache["resid_post", -1]``, ``cache["pattern", 0]``,
    ``cache["scale", 2, "ln1"]``). The residual-stream helpers (``accumulated_resid``,
    ``decompose_resid``, ``stack_head_results``, ``logit_attrs``, ...) are in
    :mod:`mechkit.cache_tl`."""

    def __init__(self, store: dict[str, torch.Tensor], model: HookedModel | None = None, batch: Batch | None = None):
        self._store = store
        self.model = model
        self.batch = batch
        self.kv: list | None = None  # HF's key/value cache of the run, when asked for (run_with_cache(keep_kv=True))

    # mapping -----------------------------------------------------------------
    def __getitem__(self, name) -> torch.Tensor:
        if isinstance(name, tuple):
            if self.model is None:
                raise KeyError(f"tuple key {name!r} needs the cache's model (to count layers); use the full hook name")
            name = tl_key(name, self.model.cfg.n_layers)
        if name not in self._store:
            if self.model is not None:
                self.model.points.resolve(name)  # unknown names get the closest-name error
            raise KeyError(f"'{name}' was not cached; cached names include {list(self._store)[:5]}")
        return self._store[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} points)"

    def to(self, device) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self._store.items()}, self.model, self.batch)

    # files -------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """safetensors file (tensors) with the model's config in its metadata; written atomically."""
        meta = {"mechkit": json.dumps(self.model.cfg.to_dict() if self.model is not None else {})}
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().clone().contiguous() for k, v in self._store.items()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, model: HookedModel | None = None) -> ActivationCache:
        return cls(dict(load_file(str(path))), model)
