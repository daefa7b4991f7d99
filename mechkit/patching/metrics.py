"""Patching metrics: callables on logits returning one value per row (prompt).

Built-in metrics read the logits at the last position (prompts are left padded) and know the
task's answer/wrong ids; they work on any number of stacked copies of the task's prompts
(row ``r`` is prompt ``r % n``). ``normalise=True`` (default) asks the patching functions to
report ``(M - M_corrupt) / (M_clean - M_corrupt)`` of the prompt-mean M.

Any other callable ``fn(logits [n, T, d_vocab]) -> [n]`` may be used as a metric; it is
called on the full logits of each group of n prompts. What the sweeps read from a metric is the
:class:`Metric` protocol; :func:`as_metric` wraps a plain callable into it once, at the entry of
each analysis (flags it sets itself, such as ``last_only = True``, are kept).
"""

from __future__ import annotations

import copy
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Metric(Protocol):
    """What a sweep needs from a metric.

    ``__call__(logits [rows, T, d_vocab]) -> [rows]`` one value per prompt row.
    ``last_only``: only ``logits[:, -1]`` are read (the engines then ask HF for one position).
    ``rowwise``: accepts ``[g * n, T, V]`` logits of g stacked copies of the task (else it is called
    on each group of n rows). ``normalise``: report ``(M - M_corrupt) / (M_clean - M_corrupt)``.
    ``splittable``: ``subset(rows)`` gives the metric on some of the task's prompts.
    ``bind_clean(clean_logits)`` is called once with the clean run's logits before a sweep.
    """

    last_only: bool
    rowwise: bool
    normalise: bool
    splittable: bool

    def __call__(self, logits: torch.Tensor) -> torch.Tensor: ...

    def bind_clean(self, clean_logits: torch.Tensor) -> None: ...

    def subset(self, rows) -> Metric: ...


class CallableMetric:
    """:class:`Metric` around a plain callable ``fn(logits) -> [rows]``: its own ``last_only``,
    ``rowwise``, ``normalise``, ``bind_clean`` and ``subset`` are used where it has them; otherwise
    every position is read, it is called group by group, nothing is normalised and it cannot be split.
    ``repr`` is the callable's (checkpoint keys and result metadata record it)."""

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError(f"metric must be callable on logits [batch, pos, vocab] -> [batch]; got {type(fn).__name__}")
        self.fn = fn
        self.last_only = bool(getattr(fn, "last_only", False))
        self.rowwise = bool(getattr(fn, "rowwise", False))
        self.normalise = bool(getattr(fn, "normalise", False))
        self.splittable = callable(getattr(fn, "subset", None))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.fn(logits)

    def bind_clean(self, clean_logits: torch.Tensor) -> None:
        bind = getattr(self.fn, "bind_clean", None)
        if bind is not None:
            bind(clean_logits)

    def subset(self, rows) -> Metric:
        if not self.splittable:
            raise ValueError(f"the metric {self.fn!r} cannot be split by prompt (it has no .subset(rows))")
        return as_metric(self.fn.subset(rows))

    def __repr__(self) -> str:
        return repr(self.fn)


def as_metric(metric) -> Metric:
    """``metric`` itself when it is a :class:`TaskMetric` or a :class:`CallableMetric`, else the
    callable wrapped once in a :class:`CallableMetric`."""
    return metric if isinstance(metric, (TaskMetric, CallableMetric)) else CallableMetric(metric)


class TaskMetric:
    """A task metric on last-position logits (implements :class:`Metric`).

    ``last_only``: only logits[:, -1] are needed (the engine then asks HF for one position).
    ``rowwise``: accepts ``[g * n, T, V]`` logits of g stacked copies of the task.
    """

    last_only = True
    rowwise = True
    splittable = True

    def __init__(self, task, name: str, normalise: bool = True):
        self.answer_ids = task.answer_ids
        self.wrong_ids = task.wrong_ids
        self.n = len(task.answer_ids)
        self.name = name
        self.normalise = normalise

    def _ids(self, ids: torch.Tensor, rows: int, device) -> torch.Tensor:
        if rows % self.n:
            raise ValueError(f"metric {self.name}: {rows} rows is not a multiple of the task's {self.n} prompts")
        return ids.to(device).repeat(rows // self.n)

    def bind_clean(self, clean_logits: torch.Tensor) -> None:
        """Nothing to bind (metrics that compare with the clean run override this)."""

    def subset(self, rows) -> TaskMetric:
        """The same metric on prompts ``rows`` (a slice or index tensor) of its task: what a
        function that splits the prompts into batches calls."""
        sub = copy.copy(self)
        sub.answer_ids, sub.wrong_ids = self.answer_ids[rows], self.wrong_ids[rows]
        sub.n = len(sub.answer_ids)
        return sub

    def last_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1].float().log_softmax(-1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.name}(normalise={self.normalise})"


class LogitDiff(TaskMetric):
    def __call__(self, logits):
        last = logits[:, -1].float()
        a, w = self._ids(self.answer_ids, len(last), last.device), self._ids(self.wrong_ids, len(last), last.device)
        return last.gather(1, a[:, None])[:, 0] - last.gather(1, w[:, None])[:, 0]


class AnswerLogprob(TaskMetric):
    def __call__(self, logits):
        lp = self.last_logprobs(logits)
        return lp.gather(1, self._ids(self.answer_ids, len(lp), lp.device)[:, None])[:, 0]


class AnswerProb(AnswerLogprob):
    def __call__(self, logits):
        return super().__call__(logits).exp()


class KLToClean(TaskMetric):
    """KL(clean || patched) of the last-position distributions; the engine binds the clean logits."""

    def __init__(self, task, normalise: bool = True):
        super().__init__(task, "kl_to_clean", normalise)
        self.clean_logprobs: torch.Tensor | None = None

    def bind_clean(self, clean_logits: torch.Tensor) -> None:
        self.clean_logprobs = self.last_logprobs(clean_logits)

    def subset(self, rows) -> KLToClean:
        sub = super().subset(rows)
        if self.clean_logprobs is not None:
            sub.clean_logprobs = self.clean_logprobs[rows]
        return sub

    def __call__(self, logits):
        if self.clean_logprobs is None:
            raise RuntimeError("kl_to_clean needs the clean logits: call bind_clean(clean_logits) first "
                               "(activation_patch does this)")
        lp = self.last_logprobs(logits)
        ref = self.clean_logprobs.to(lp.device).repeat(len(lp) // self.n, 1)
        return (ref.exp() * (ref - lp)).sum(-1)


def logit_diff(task, normalise: bool = True) -> TaskMetric:
    """logit[answer] - logit[wrong] at the last position, per prompt."""
    return LogitDiff(task, "logit_diff", normalise)


def answer_prob(task, normalise: bool = True) -> TaskMetric:
    """Probability of the answer token at the last position, per prompt."""
    return AnswerProb(task, "answer_prob", normalise)


def logprob(task, normalise: bool = True) -> TaskMetric:
    """Log-probability of the answer token at the last position, per prompt."""
    return AnswerLogprob(task, "logprob", normalise)


def kl_to_clean(task, normalise: bool = True) -> TaskMetric:
    """KL divergence from the clean run's last-position distribution, per prompt (0 when clean)."""
    return KLToClean(task, normalise)


def evaluate(metric, logits: torch.Tensor, n: int) -> torch.Tensor:
    """Prompt-mean metric for each of the g groups of n rows in ``logits`` -> [g] float32.

    A metric returning one value per prompt is averaged; one returning a single number for the n
    prompts (TransformerLens's habit, e.g. a mean logit difference) is used as it is."""
    g = logits.shape[0] // n
    if as_metric(metric).rowwise:
        vals = metric(logits)
    else:
        per = [torch.as_tensor(metric(logits[i * n:(i + 1) * n])).float().reshape(-1) for i in range(g)]
        if n > 1 and all(v.numel() == 1 for v in per):  # a TransformerLens-style metric: one number per batch
            return torch.cat(per)
        vals = torch.cat(per)
    vals = torch.as_tensor(vals).float()
    if vals.numel() != g * n:
        raise ValueError(f"metric returned {vals.numel()} values for {g * n} prompts; expected one per prompt")
    return vals.reshape(g, n).mean(1)


def patch_baselines(m_clean: float, m_corrupt: float, mode: str, normalise: bool) -> dict[str, float]:
    """A patching result's baselines: the clean and corrupted metric and ``unpatched``, what a cell reads
    when its patch changes nothing (the base run: corrupted when denoising, clean when noising)."""
    base = m_corrupt if mode == "denoise" else m_clean
    unpatched = (base - m_corrupt) / (m_clean - m_corrupt) if normalise else base
    return {"clean": m_clean, "corrupt": m_corrupt, "unpatched": float(unpatched)}


def check_baselines(m_clean: float, m_corrupt: float, normalise: bool, metric) -> None:
    """Refuse baselines that make the values undefined: non-finite, or equal when normalising."""
    import math

    if not (math.isfinite(m_clean) and math.isfinite(m_corrupt)):
        raise ValueError(f"metric {metric!r} is not finite on the clean/corrupted runs ({m_clean}, {m_corrupt})")
    if normalise and m_clean == m_corrupt:
        raise ValueError(f"clean and corrupted baselines are equal (metric {metric!r} = {m_clean:.6g} on both): "
                         f"normalised values would be nan; are the clean and corrupted prompts the same? "
                         f"(normalise=False gives raw values)")
