"""Metrics on a batch of logits, one value per prompt: ``mk.metrics.logit_diff(task)`` and friends.

Each is normalised by default, ``(M - M_corrupt) / (M_clean - M_corrupt)``, when used in a sweep.
Any callable ``f(logits [batch, pos, vocab]) -> [batch]`` works as a metric too.
"""

from .patching.metrics import answer_prob, kl_to_clean, logit_diff, logprob

__all__ = ["answer_prob", "kl_to_clean", "logit_diff", "logprob"]
