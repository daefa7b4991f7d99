"""Splicing dictionaries into a model: ``with mk.sae.splice(model, sae): ...``.

An SAE at hook point P replaces P's activation ``x`` by its reconstruction; a transcoder reads
its input point and replaces its output point (``hook_name_out``, e.g. ``hook_mlp_out``) by its
reconstruction of it. With ``error_term=True`` (default) the reconstruction error
``x - decode(encode(x))`` (computed without any hook, without gradient, as SAELens does) is
added back, so the model computes exactly what it computed before while the features are
live: hooks on them change the output by exactly their decoder directions.

Inside the block these points exist under SAELens's names, prefixed by the dictionary's
``hook_name`` (for a transcoder, its input point):

- ``{P}.hook_sae_input``      [batch, pos, d_in]  (``[..., heads, d_head]`` before flattening for hook_z)
- ``{P}.hook_sae_acts_pre``   [batch, pos, d_sae]
- ``{P}.hook_sae_acts_post``  [batch, pos, d_sae]  the feature activations
- ``{P}.hook_sae_recons``     [batch, pos, d_out]
- ``{P}.hook_sae_error``      [batch, pos, d_out]  (with the error term only)
- ``{P}.hook_sae_output``     [batch, pos, d_out]  what the model goes on with

so ``model.run_with_cache(..., names=...)``, ``model.hooks(...)`` and anything built on them
read and write features. The splice works wherever the model's own hooks do: padded batches
(per-token maps), ``model.generate`` (each new token goes through the dictionary), layers
spread over devices (the dictionary's outputs follow the point's device).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import torch

from .dictionary import SAE
from .io import check_fits

if TYPE_CHECKING:
    from ..model import HookedModel

SUFFIXES = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
            "hook_sae_output")


def point_names(sae: SAE) -> dict[str, str]:
    """{suffix: full name} of the points a spliced ``sae`` adds."""
    return {s: f"{sae.cfg.hook_name}.{s}" for s in SUFFIXES}


class _Spliced:
    """The hook functions of one dictionary at its point(s)."""

    def __init__(self, model, sae: SAE, error_term: bool):
        self.model, self.sae, self.error_term = model, sae, error_term
        self.names = point_names(sae)
        self.pending: list[torch.Tensor] = []  # transcoders: input -> output, per forward

    def _sub(self, suffix: str, x: torch.Tensor) -> torch.Tensor:
        return self.model.sub_points.run(self.names[suffix], x)

    def compute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        """The dictionary's output for input ``x`` replacing ``target`` (x itself for an SAE);
        None (leave the target as it is) when that output would be the target exactly: error term
        on, no hook changed anything, nothing reads the reconstruction, no gradient asked for."""
        sae, sub, names = self.sae, self.model.sub_points, self.names
        x = x.to(sae.device)
        xin = self._sub("hook_sae_input", x)
        s, state = sae.sae_in(xin)
        h0 = sae.pre_acts(s)
        h = self._sub("hook_sae_acts_pre", h0)
        a0 = sae.activate(h, s)
        acts = self._sub("hook_sae_acts_post", a0)
        edited = xin is not x or h is not h0 or acts is not a0
        grad = torch.is_grad_enabled() and (x.requires_grad or acts.requires_grad)
        if self.error_term and not edited and not grad and not sub.any_hooks(
                [names["hook_sae_recons"], names["hook_sae_error"], names["hook_sae_output"]]):
            return None  # target + (recon - recon): the target itself, without decoding
        recon0 = sae.decode(acts, xin, state)
        recon = self._sub("hook_sae_recons", recon0)
        edited = edited or recon is not recon0
        if sae.cfg.has_skip:  # SAELens's splice drops it; a skip transcoder's output includes it
            recon = recon + sae.skip(xin)
        if self.error_term:
            with torch.no_grad():
                if not edited:
                    clean = recon.detach()
                elif xin is x and h is h0:  # only the activations (or the reconstruction) were changed
                    clean = sae.decode(a0, x, state) + sae.skip(x)
                else:  # the error of the untouched dictionary, as SAELens computes it
                    sc, stc = sae.sae_in(x)
                    clean = sae.decode(sae.activate(sae.pre_acts(sc), sc), x, stc) + sae.skip(x)
                tgt = target.to(sae.device, sae.dtype)
            err = tgt - clean
            err2 = self._sub("hook_sae_error", err)
            if err2 is not err:  # a hook changed the error: SAELens's recon + error
                recon = recon + err2
            else:  # target + (recon - clean): exactly the target when no feature is touched
                recon = tgt + (recon - clean)
        out = self._sub("hook_sae_output", recon)
        return out.to(target.device, target.dtype)

    def sae_hook(self, x: torch.Tensor, hook) -> torch.Tensor:
        return self.compute(x, x)

    def transcoder_in(self, x: torch.Tensor, hook) -> None:
        self.pending.append(x)

    def transcoder_out(self, y: torch.Tensor, hook) -> torch.Tensor:
        if not self.pending:
            raise RuntimeError(f"transcoder output point {hook.name} ran before its input point "
                               f"{self.sae.cfg.hook_name}: they must be in the same forward pass, input first")
        x = self.pending.pop(0)
        return self.compute(x, y)

    def hooks(self) -> list[tuple[str, object]]:
        cfg = self.sae.cfg
        if cfg.is_transcoder:
            return [(cfg.hook_name, self.transcoder_in), (cfg.hook_name_out, self.transcoder_out)]
        return [(cfg.hook_name, self.sae_hook)]


def _as_list(saes) -> list[SAE]:
    items = list(saes) if isinstance(saes, Sequence) and not isinstance(saes, (str, SAE)) else [saes]
    for s in items:
        if not isinstance(s, SAE):
            raise TypeError(f"splice expects mechkit SAE objects (mechkit.sae.load); got {type(s).__name__}")
    return items


def splice_hooks(model: HookedModel, saes, error_term: bool = True) -> tuple[list, list[_Spliced]]:
    """The (name, fn) pairs that splice ``saes`` (checked against ``model``), and their state."""
    items = _as_list(saes)
    seen: dict[str, SAE] = {}
    for s in items:
        check_fits(s, model)
        out = s.cfg.out_hook
        if out in seen:
            raise ValueError(f"two dictionaries write {out}: {seen[out]!r} and {s!r}; splice one per point")
        seen[out] = s
    spliced = [_Spliced(model, s, error_term) for s in items]
    return [p for sp in spliced for p in sp.hooks()], spliced


@contextmanager
def splice(model: HookedModel, saes, error_term: bool = True) -> Iterator:
    """Splice one dictionary or a list into ``model`` for the duration of the block.

    ``saes``: an :class:`~mechkit.sae.SAE` or a list of them, each at its ``hook_name`` (a
    transcoder from ``hook_name`` to ``hook_name_out``). ``error_term``: add back each
    dictionary's reconstruction error, so that only hooks on the features change the model.
    Yields the model. Raises (before anything is installed) for a hook point the model lacks,
    a width that differs from the point's, or two dictionaries writing the same point.
    """
    pairs, spliced = splice_hooks(model, saes, error_term)
    with ExitStack() as stack:
        for sp in spliced:
            layer = model.points.resolve(sp.sae.cfg.hook_name).layer
            stack.enter_context(model.sub_points.registered(list(sp.names.values()), layer, sp.sae))
        stack.enter_context(model.hooks(pairs))
        try:
            yield model
        finally:
            for sp in spliced:
                sp.pending.clear()
