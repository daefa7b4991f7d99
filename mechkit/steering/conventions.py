"""Conventions shared with other steering libraries: vector arithmetic, ``multiplier=``, raw HF models.

- Arithmetic (steering-vectors / ActAdd habit): for methods whose steering is an added vector
  (DiffMean: ``x + strength * v``), ``a + b``, ``a - b``, ``2 * a``, ``a * 0.5``, ``a / 2`` and ``-a``
  give a new steering whose vectors are that combination, point by point (a point only one side has
  keeps its vector; both must be fitted on the same model). Methods whose steering is not a vector
  (Linear-AcT and LinEAS maps, Gains gates) refuse with a TypeError that says so.
- ``multiplier=``: the name steering-vectors gives to ``strength``; pass one or the other.
- A raw Hugging Face model is accepted wherever a :class:`mechkit.HookedModel` is expected (it is
  wrapped; hooks are installed on its own modules, so calling the raw model or its ``generate`` inside
  ``apply`` is steered).

What ``strength`` means, per method (one definition each):

- DiffMean: the multiple of the mean difference added, ``x + strength * v`` (1: move by the full
  difference of class means; 0: off; negative: push the other way).
- Linear-AcT, LinEAS, Gains: interpolation between the unsteered activation and the method's map,
  ``(1 - strength) * x + strength * T(x)`` (1: the fitted map; 0: off; values above 1 extrapolate).
"""

from __future__ import annotations

import copy
import numbers
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..model import HookedModel


def as_hooked(model: HookedModel | nn.Module):
    """A :class:`mechkit.HookedModel` for ``model``: itself, or a raw HF causal LM wrapped (no tokenizer)."""
    from ..model import HookedModel

    if isinstance(model, HookedModel):
        return model
    if isinstance(model, nn.Module) and hasattr(model, "config") and hasattr(model.config, "model_type"):
        cached = model.__dict__.get("_mechkit_hooked")
        if cached is None:
            cached = HookedModel(model)
            model.__dict__["_mechkit_hooked"] = cached
        return cached
    raise TypeError(f"expected a mechkit HookedModel or a Hugging Face causal LM; got {type(model).__name__}")


def pick_strength(strength: float, multiplier: float | None) -> float:
    """``multiplier`` (steering-vectors' name) or ``strength``; both given and different is an error."""
    if multiplier is None:
        return strength
    if strength != 1.0 and strength != multiplier:
        raise ValueError(f"pass strength= or multiplier= (the same thing), not both; got strength={strength}, "
                         f"multiplier={multiplier}")
    return multiplier


class SteeringAlgebra:
    """Arithmetic on fitted steerings; a method opts in by listing its additive tensors in ``vector_keys``."""

    vector_keys: tuple[str, ...] = ()

    def _refuse(self, op: str):
        raise TypeError(f"{self.method} steering has no vector arithmetic ({op}): its steering is a map or a gate, "
                        "not an added vector; only additive methods (DiffMean) can be combined this way")

    def _scaled(self, c: float):
        if not self.vector_keys:
            self._refuse("scaling")
        self._require_fitted()
        out = copy.copy(self)
        out.__dict__ = {k: v for k, v in self.__dict__.items()}
        out.tensors = {p: {k: (t * c if k in self.vector_keys else t.clone()) for k, t in d.items()}
                       for p, d in self.tensors.items()}
        out.history, out._attached, out._merged = [], {}, {}
        return out

    def _combined(self, other, sign: float, op: str):
        if not isinstance(other, SteeringAlgebra):
            return NotImplemented
        if not self.vector_keys:
            self._refuse(op)
        if type(other) is not type(self):
            raise TypeError(f"cannot combine a {self.method} steering with a {getattr(other, 'method', type(other))} one")
        self._require_fitted()
        other._require_fitted()
        if self.info != other.info:
            raise ValueError(f"{op}: the two steerings were fitted on different models ({self.info} vs {other.info})")
        out = self._scaled(1.0)
        for p, d in other.tensors.items():
            if p in out.tensors:
                for k in self.vector_keys:
                    out.tensors[p][k] = out.tensors[p][k] + sign * d[k].to(out.tensors[p][k])
            else:
                out.tensors[p] = {k: (sign * t if k in self.vector_keys else t.clone()) for k, t in d.items()}
        out.hparams = dict(out.hparams, point=list(out.tensors), combined=True)
        return out

    def __add__(self, other):
        return self._combined(other, 1.0, "a + b")

    def __sub__(self, other):
        return self._combined(other, -1.0, "a - b")

    def __neg__(self):
        return self._scaled(-1.0)

    def __mul__(self, c):
        if not isinstance(c, (numbers.Real, torch.Tensor)) or (isinstance(c, torch.Tensor) and c.numel() != 1):
            return NotImplemented
        return self._scaled(float(c))

    __rmul__ = __mul__

    def __truediv__(self, c):
        if not isinstance(c, numbers.Real):
            return NotImplemented
        return self._scaled(1.0 / float(c))
