"""Activation patching: site kinds, metrics, the fused batching engine, sweeps."""

from .activation import activation_patch, check_aligned, patch_every
from .metrics import (
           CallableMetric,
           Metric,
           TaskMetric,
           answer_prob,
           as_metric,
           kl_to_clean,
           logit_diff,
           logprob,
)
from .path import path_patch
from .sites import SITE_KINDS, site_kind
from .sweep import Runner, SweepOptions, run_sweep

__all__ = ["activation_patch", "patch_every", "path_patch", "check_aligned", "logit_diff", "answer_prob", "logprob",
           "kl_to_clean", "SITE_KINDS", "site_kind",
           # issue 20: the one sweep driver and the metric protocol
           "SweepOptions", "Runner", "run_sweep", "Metric", "TaskMetric", "CallableMetric", "as_metric"]
