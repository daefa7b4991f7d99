"""TransformerLens's hook API on :class:`mechkit.HookedModel`.

- ``run_with_hooks(input, fwd_hooks=[(name or predicate, fn)], bwd_hooks=[...], reset_hooks_end=True)``
- ``with model.hooks(fwd_hooks=..., bwd_hooks=...):`` (mechkit's ``model.hooks({name: fn})`` too)
- ``add_hook(name or predicate, fn, dir="fwd"|"bwd", is_permanent=False, prepend=False)`` and
  ``reset_hooks(clear_contexts=True, direction="both", including_permanent=False)``: persistent
  hooks that stay on the model, for every run, until reset
- ``hook_dict`` / ``hook_points()``: every point as a :class:`mechkit.Hook` with ``.name``,
  ``.layer()`` (also usable as an int), ``.ctx`` (a dict that lives until ``reset_hooks`` /
  ``clear_contexts``), ``.add_hook(fn)``, ``.remove_hooks()``

Hook functions: ``fn(tensor, hook) -> tensor | None`` (forward: the activation; backward: the
gradient of the loss with respect to the activation, same shape). Returning a tensor replaces the
activation (forward) or the gradient (backward).

Backward hooks are attached to the activation tensor during the forward pass (only when it
requires grad), so they fire on a later ``loss.backward()`` even after the ``with`` block or
``run_with_hooks`` has returned and removed every module hook (TransformerLens needs
``reset_hooks_end=False`` for that). On a virtual point (``hook_resid_mid`` of a sequential block)
a backward hook re-expresses the written part as ``(resid_pre + attn_out) - resid_pre``, which may
change that activation by float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack

import torch

from .hookpoints import Hook

NameOrPredicate = str | Callable[[str], bool]


def _bwd_adapter(fn):
    """A forward handler that hangs ``fn`` on the activation's gradient."""
    def fwd(x: torch.Tensor, hook: Hook):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return None
        y = x.view_as(x)  # a node of its own: its gradient is exactly the activation's
        def on_grad(g):
            new = fn(g, hook)
            return new[0] if isinstance(new, tuple) else new  # TransformerLens hooks may return (grad,)
        y.register_hook(on_grad)
        return y
    fwd.__name__ = getattr(fn, "__name__", "bwd_hook")
    return fwd


class HookApi:
    """Mixin for :class:`mechkit.HookedModel` (needs ``points``, ``hooks()``)."""

    # points ----------------------------------------------------------------------
    def _hook_objects(self) -> dict[str, Hook]:
        self.points.owner = self
        return {n: self.points.hook_object(n) for n in self.points.points}

    def hook_for(self, name: str) -> Hook:
        """The :class:`Hook` object of one point (the one its hook functions receive)."""
        self.points.owner = self
        return self.points.hook_object(name)

    @property
    def hook_dict(self) -> dict[str, Hook]:
        """``{name: Hook}`` for every point of this model."""
        return dict(self._hook_objects())

    def hook_points(self) -> list[Hook]:
        return list(self._hook_objects().values())

    def _expand(self, pairs: Iterable, what: str) -> list[tuple[str, Callable]]:
        """[(name or predicate, fn)] -> [(name, fn)]; names checked, predicates expanded over all points."""
        out = []
        for item in pairs:
            if not (isinstance(item, tuple) and len(item) == 2 and callable(item[1])):
                raise TypeError(f"{what} must be {{name: fn}} or a list of (name or predicate, fn) pairs; "
                                f"got item {item!r}")
            key, fn = item
            if isinstance(key, str):
                self.select_points([key])  # checked: a hook point or a spliced dictionary's point
                out.append((key, fn))
            elif callable(key):
                names = self.select_points(key)
                if not names:
                    raise ValueError(f"{what}: the name predicate {key!r} matches no hook point of this model")
                out += [(n, fn) for n in names]
            else:
                raise TypeError(f"{what}: a hook's name must be a str or a predicate on names; got {key!r}")
        return out

    def _hook_pairs(self, hooks=(), fwd_hooks=(), bwd_hooks=()) -> list[tuple[str, Callable]]:
        self.points.owner = self  # Hook objects made from here on can reach add_hook
        pairs = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
        pairs = self._expand(pairs, "hooks") + self._expand(fwd_hooks or (), "fwd_hooks")
        pairs += [(n, _bwd_adapter(fn)) for n, fn in self._expand(bwd_hooks or (), "bwd_hooks")]
        return pairs

    # opt-in points -------------------------------------------------------------------
    def _set_optin(self, endings: tuple[str, ...], use: bool) -> int:
        from dataclasses import replace

        n = 0
        for name, spec in list(self.points.points.items()):
            if name.endswith(endings):
                self.points.points[name] = replace(spec, optin=not use)
                n += 1
        return n

    def set_use_attn_result(self, use: bool) -> None:
        """TransformerLens's switch: list and cache ``attn.hook_result`` by default (by name it always works)."""
        self._set_optin(("attn.hook_result",), use)

    def set_use_split_qkv_input(self, use: bool) -> None:
        """TransformerLens's switch: list and cache ``hook_q_input/k_input/v_input`` by default."""
        if not self._set_optin(("hook_q_input", "hook_k_input", "hook_v_input"), use):
            raise ValueError(f"family '{self.hook_map.name}' has no split q/k/v input points")

    # one call ----------------------------------------------------------------------
    def run_with_hooks(self, *model_args, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **model_kwargs):
        """Run ``self(*model_args, **model_kwargs)`` with ``fwd_hooks``/``bwd_hooks`` installed.

        With ``reset_hooks_end=False`` the hooks stay on the model (as :meth:`add_hook` hooks) until
        :meth:`reset_hooks`. ``clear_contexts`` empties every ``hook.ctx`` at the end.
        """
        if reset_hooks_end:
            try:
                with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
                    return self(*model_args, **model_kwargs)
            finally:
                if clear_contexts:
                    self.clear_contexts()
        for name, fn in fwd_hooks:
            self.add_hook(name, fn, "fwd")
        for name, fn in bwd_hooks:
            self.add_hook(name, fn, "bwd")
        return self(*model_args, **model_kwargs)

    # persistent hooks ------------------------------------------------------------------
    def _persistent(self) -> list[dict]:
        return self.__dict__.setdefault("_persistent_hooks", [])

    def add_hook(self, name: NameOrPredicate, hook: Callable, dir: str = "fwd", is_permanent: bool = False,
                 prepend: bool = False) -> None:
        """Keep ``hook`` on point ``name`` (or on every point a predicate accepts) for every later run,
        until :meth:`reset_hooks` (``is_permanent=True``: until ``reset_hooks(including_permanent=True)``).
        ``prepend=True`` makes it run before the persistent hooks already there."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"add_hook: dir must be 'fwd' or 'bwd'; got {dir!r}")
        pairs = self._hook_pairs(fwd_hooks=[(name, hook)]) if dir == "fwd" else self._hook_pairs(bwd_hooks=[(name, hook)])
        entries = self._persistent()
        entry = {"pairs": pairs, "dir": dir, "permanent": is_permanent, "stack": None}
        if prepend:
            entries.insert(0, entry)
        else:
            entries.append(entry)
        self._reinstall()

    def add_perma_hook(self, name: NameOrPredicate, hook: Callable, dir: str = "fwd") -> None:
        """:meth:`add_hook` with ``is_permanent=True``."""
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def _uninstall(self) -> None:
        for e in reversed(self._persistent()):
            if e["stack"] is not None:
                e["stack"].close()
                e["stack"] = None

    def _reinstall(self) -> None:
        """Install every persistent hook again, in list order (torch runs hooks in registration order)."""
        entries = self._persistent()
        self._uninstall()
        for e in entries:
            stack = ExitStack()
            try:
                stack.enter_context(self.hooks(e["pairs"]))
            except BaseException:
                stack.close()
                raise
            e["stack"] = stack

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both", including_permanent: bool = False,
                    level=None) -> None:
        """Remove persistent hooks (``direction``: "fwd", "bwd" or "both"; permanent ones only with
        ``including_permanent``) and, by default, empty every ``hook.ctx``. ``level`` is not supported."""
        if level is not None:
            raise ValueError("reset_hooks: level= (TransformerLens context levels) is not supported by mechkit")
        if direction not in ("fwd", "bwd", "both"):
            raise ValueError(f"reset_hooks: direction must be 'fwd', 'bwd' or 'both'; got {direction!r}")
        entries = self._persistent()
        self._uninstall()
        keep = [e for e in entries
                if (e["permanent"] and not including_permanent) or (direction != "both" and e["dir"] != direction)]
        entries[:] = keep
        if keep:
            self._reinstall()
        if clear_contexts:
            self.clear_contexts()

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False) -> None:
        self.reset_hooks(clear_contexts=False, direction=direction, including_permanent=including_permanent)

    def clear_contexts(self) -> None:
        for h in self._hook_objects().values():
            h.ctx.clear()

    def _remove_hooks_of(self, name: str, dir: str = "fwd", including_permanent: bool = False) -> None:
        """Drop the persistent hooks of one point (``Hook.remove_hooks``)."""
        entries = self._persistent()
        self._uninstall()
        for e in entries:
            if (dir == "both" or e["dir"] == dir) and (including_permanent or not e["permanent"]):
                e["pairs"] = [(n, f) for n, f in e["pairs"] if n != name]
        entries[:] = [e for e in entries if e["pairs"]]
        self._reinstall()
