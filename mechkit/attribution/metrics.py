"""The scalar attribution's backward pass differentiates; the metrics themselves are
:mod:`mechkit.metrics` (``mk.metrics.logit_diff`` and friends).

``metric(logits [n, T, vocab]) -> [n]`` one value per prompt, averaged over prompts; the
attribute ``normalise`` asks for scores in units of ``M_clean - M_corrupt``. Tasks are left
padded, so the prediction position of every row is ``-1``. Default: logit difference
(answer - wrong) at the last position.
"""

from __future__ import annotations

import torch

__all__ = ["prompt_mean"]


def prompt_mean(metric, logits: torch.Tensor) -> torch.Tensor:
    """The metric as one differentiable scalar: mean over prompts of ``metric(logits)``."""
    v = metric(logits)
    v = torch.as_tensor(v)
    return v.mean() if v.dim() else v
