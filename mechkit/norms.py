"""Norm helpers: a norm's epsilon, and a norm applied to the parts of its input one by one, its
scale (and mean) frozen at the whole.

``norm(sum of parts) = sum of frozen_norm(parts) + bias``: the decomposition that lets heads be
separate terms of a residual stream their sum is normalised into (a post-norm, Gemma 2/3, OLMo 2),
and lets a residual stack be read through the final norm (TransformerLens's ``apply_ln_to_stack``).
"""

from __future__ import annotations

import torch

EPS_NAMES = ("eps", "variance_epsilon", "epsilon")


def eps_of(norm: torch.nn.Module, default: float | None = None) -> float | None:
    """The norm's epsilon (its ``eps`` / ``variance_epsilon`` / ``epsilon`` attribute), else ``default``."""
    for name in EPS_NAMES:
        v = getattr(norm, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return default


def frozen_norm(norm: torch.nn.Module, family: dict, total: torch.Tensor, stack: torch.Tensor,
                center: bool | None = None) -> torch.Tensor:
    """Apply ``norm`` to each component of ``stack`` [c, ..., d] linearly: scale (and mean) taken
    from ``total`` [..., d], the full input. Bias is not added (it belongs to no component).
    ``family``: the hook map's ``[family]`` (``norm_kind``, ``norm_weight_offset``); ``center``:
    subtract means (default: a LayerNorm family)."""
    if family.get("norm_kind") == "none":  # no final norm: the unembedding reads the residual stream
        return stack
    if center is None:
        center = family.get("norm_kind", "layernorm") == "layernorm"
    eps = eps_of(norm, 1e-5)
    x = total.float()
    if center:
        x = x - x.mean(-1, keepdim=True)
        stack = stack - stack.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    weight = getattr(norm, "weight", None)
    w = 1.0 if weight is None else weight.float() + float(family.get("norm_weight_offset", 0.0))
    return (stack.float() * scale * w).to(stack.dtype)
