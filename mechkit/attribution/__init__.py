"""Attribution (AtP), relevance patching (RelP), integrated gradients, LRP rules and input relevance."""

from . import lrp
from .atp import attribution_patch
from .metrics import logit_diff
from .relevance import input_relevance, relevance_figure

__all__ = ["lrp", "attribution_patch", "logit_diff", "input_relevance", "relevance_figure"]
