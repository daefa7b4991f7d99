"""Activation patching: site kinds, metrics, the fused batching engine, sweeps."""

from .activation import activation_patch, check_aligned, patch_every
from .metrics import answer_prob, kl_to_clean, logit_diff, logprob
from .path import path_patch
from .sites import SITE_KINDS, site_kind

__all__ = ["activation_patch", "patch_every", "path_patch", "check_aligned", "logit_diff", "answer_prob", "logprob",
           "kl_to_clean", "SITE_KINDS", "site_kind"]
