"""Default metric for attribution: logit difference (answer - wrong) at the last position.

Same calling convention as :mod:`mechkit.patching.metrics` (whose metrics are accepted too):
``metric(logits [n, T, vocab]) -> [n]`` one value per prompt, averaged over prompts; the
attribute ``normalise`` asks for scores in units of ``M_clean - M_corrupt``. Tasks are left
padded, so the prediction position of every row is ``-1``.
"""

from __future__ import annotations

import torch


class LogitDiff:
    """logit[answer] - logit[wrong] at position -1, per prompt."""

    def __init__(self, task, normalise: bool = True):
        self.answer_ids, self.wrong_ids, self.normalise = task.answer_ids, task.wrong_ids, normalise

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1, :]
        if last.shape[0] != len(self.answer_ids):
            raise ValueError(f"task has {len(self.answer_ids)} answers but the logits have {last.shape[0]} rows")
        a = self.answer_ids.to(last.device).view(-1, 1)
        w = self.wrong_ids.to(last.device).view(-1, 1)
        return (last.gather(1, a) - last.gather(1, w))[:, 0]

    def __repr__(self) -> str:
        return f"logit_diff(normalise={self.normalise})"


def logit_diff(task, normalise: bool = True) -> LogitDiff:
    return LogitDiff(task, normalise)


def prompt_mean(metric, logits: torch.Tensor) -> torch.Tensor:
    """The metric as one differentiable scalar: mean over prompts of ``metric(logits)``."""
    v = metric(logits)
    v = torch.as_tensor(v)
    return v.mean() if v.dim() else v
