"""Hook points that live inside something spliced into the model (an SAE at a hook point).

A spliced component registers its internal points by name (SAELens's names, e.g.
``blocks.3.hook_resid_pre.hook_sae_acts_post``) for as long as it is spliced. While they
exist, ``model.hooks``, ``model.run_with_cache`` and everything built on them accept those
names like any other point; the component calls :meth:`SubPoints.run` on each of its internal
tensors, which applies the hook functions installed there, in installation order, with the
usual ``fn(tensor, hook) -> tensor | None`` contract.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .hookpoints import Hook, HookFn


class SubPoints:
    """name -> stack of installed (fn, Hook); names exist only while their owner is spliced."""

    def __init__(self):
        self._points: dict[str, list[tuple[HookFn, Hook]]] = {}
        self._layers: dict[str, int | None] = {}
        self._owners: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self._points)

    def __contains__(self, name: str) -> bool:
        return name in self._points

    def any_hooks(self, names) -> bool:
        return any(self._points.get(n) for n in names)

    def owner(self, name: str):
        """The object that registered ``name`` (the spliced dictionary), or None."""
        return self._owners.get(name)

    @contextmanager
    def registered(self, names: list[str], layer: int | None, owner=None) -> Iterator[None]:
        """Make ``names`` exist inside the block (``ValueError`` if one is already spliced)."""
        taken = [n for n in names if n in self._points]
        if taken:
            raise ValueError(f"hook point {taken[0]} already exists: two dictionaries spliced at the same point")
        for n in names:
            self._points[n] = []
            self._layers[n] = layer
            self._owners[n] = owner
        try:
            yield
        finally:
            for n in names:
                self._points.pop(n, None)
                self._layers.pop(n, None)
                self._owners.pop(n, None)

    @contextmanager
    def installed(self, pairs: list[tuple[str, HookFn]]) -> Iterator[None]:
        entries = []
        try:
            for name, fn in pairs:
                entry = (fn, Hook(name, self._layers.get(name)))
                self._points[name].append(entry)
                entries.append((name, entry))
            yield
        finally:
            for name, entry in entries:
                stack = self._points.get(name)
                if stack is not None and entry in stack:
                    stack.remove(entry)

    def run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Apply the hooks installed at ``name`` to ``x`` (shape checked, device/dtype followed).

        Returns ``x`` itself (the same object) exactly when every hook returned None, so the owner
        can tell an edited tensor from a read one (a hook that edits in place must return it)."""
        orig = x
        for fn, hook in list(self._points.get(name, ())):
            new = fn(x, hook)
            if new is not None:
                if new.shape != x.shape:
                    raise ValueError(f"hook at {name} returned a tensor of shape {tuple(new.shape)}; "
                                     f"expected {tuple(x.shape)}")
                x = new.to(device=x.device, dtype=x.dtype)
                if x is orig:  # returned in place: still an edit
                    x = x.view_as(x)
        return x
