"""Per-neuron affine maps ``T(a) = w * a + b`` at a set of points, shared by Linear-AcT and
LinEAS. Strength lambda gives ``lambda * T(a) + (1 - lambda) * a``. With ``lo``/``hi``
tensors present (Linear-AcT), the map acts only strictly inside the range, ``lo < a < hi``, as
ml-act's hook does."""

from __future__ import annotations

import torch

from .base import Cast, Steering, masked


def affine_fn(w, b, strength, where, lo=None, hi=None):
    """Hook function for ``a -> lambda * (w * a + b) + (1 - lambda) * a`` on ``[..., d]`` (w, b, lo, hi: [d]).

    The strength is folded into the map once (``w' = 1 + lambda (w - 1)``, ``b' = lambda b``), so a
    call is one ``addcmul``. With a range ``lo < a < hi``: ``clamp`` to the next representable values
    inside the bounds (so the range is open, as ml-act's), an in-place ``eq_`` that leaves
    a float 0/1 mask, and ``lerp(a, new, mask)``, which returns ``a`` or ``new`` exactly at weights 0 and
    1 (bool masks and ``torch.where`` cost 2-5x as much on CPU: they were most of a steered step)."""
    if strength != 1.0:
        w, b = 1 + strength * (w - 1), strength * b
    cw, cb = Cast(w), Cast(b)
    if lo is None:
        def fn(x, hook):
            return masked(where, x, torch.addcmul(cb(x), x, cw(x)))
        return fn
    clo, chi = Cast(lo, toward=float("inf")), Cast(hi, toward=float("-inf"))

    def fn_range(x, hook):
        xd = x.detach() if x.requires_grad else x  # the mask carries no gradient (each op here costs ~10 us)
        inside = xd.clamp(clo(x), chi(x)).eq_(xd)  # 1.0 where lo < x < hi, else 0.0
        return masked(where, x, torch.lerp(x, torch.addcmul(cb(x), x, cw(x)), inside))
    return fn_range


class AffineSteering(Steering):
    trainable = ("w", "b")

    def _hooks(self, model, strength, where):
        return [(p, affine_fn(d["w"], d["b"], strength, where, d.get("lo"), d.get("hi")))
                for p, d in self.tensors.items()]

    def _check_point(self, p, d, width, at):
        """As :meth:`Steering._check_point`, and a range ``lo``/``hi`` must not be inverted (``lo == hi``,
        an empty range, comes from a neuron constant on the source text)."""
        super()._check_point(p, d, width, at)
        if "lo" in d:
            bad = d["lo"] > d["hi"]
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"{at}tensor '{p}|lo' is above '{p}|hi' at {int(bad.sum())} neuron(s) (first: neuron "
                                 f"{i}, lo {float(d['lo'][i]):.6g} > hi {float(d['hi'][i]):.6g}); expected lo <= hi "
                                 f"(the map acts only where lo < a < hi, so there it would never act)")

    def _affine(self, point, strength):
        d = self.tensors[point]
        if "lo" in d:  # range-gated: not affine
            return None
        return 1 + strength * (d["w"] - 1), strength * d["b"]

    def support(self, threshold: float | None = None):
        thr = self.hparams.get("support_threshold", 1e-3) if threshold is None else threshold
        return {p: torch.nonzero(((d["w"] - 1).abs() > thr) | (d["b"].abs() > thr)).flatten()
                for p, d in self.tensors.items()}
