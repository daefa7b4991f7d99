"""Per-neuron affine maps ``T(a) = w * a + b`` at a set of points, shared by Linear-AcT and
LinEAS. Strength lambda gives ``lambda * T(a) + (1 - lambda) * a``. With ``lo``/``hi``
tensors present (Linear-AcT), the map acts only where ``lo <= a <= hi``."""

from __future__ import annotations

import torch

from .base import Steering, blend


def affine_fn(w, b, strength, where, lo=None, hi=None):
    """Hook function for ``a -> w * a + b`` on ``[..., d]`` (w, b, lo, hi: [d])."""
    def fn(x, hook):
        new = x * w.to(x) + b.to(x)
        if lo is not None:
            new = torch.where((x >= lo.to(x)) & (x <= hi.to(x)), new, x)
        return blend(x, new, strength, where)
    return fn


class AffineSteering(Steering):
    trainable = ("w", "b")

    def _hooks(self, model, strength, where):
        return [(p, affine_fn(d["w"], d["b"], strength, where, d.get("lo"), d.get("hi")))
                for p, d in self.tensors.items()]

    def _affine(self, point, strength):
        d = self.tensors[point]
        if "lo" in d:  # range-gated: not affine
            return None
        return 1 + strength * (d["w"] - 1), strength * d["b"]

    def support(self, threshold: float | None = None):
        thr = self.hparams.get("support_threshold", 1e-3) if threshold is None else threshold
        return {p: torch.nonzero(((d["w"] - 1).abs() > thr) | (d["b"].abs() > thr)).flatten()
                for p, d in self.tensors.items()}
