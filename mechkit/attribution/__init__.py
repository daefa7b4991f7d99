"""Attribution (AtP), relevance patching (RelP), integrated gradients, LRP rules and input relevance."""

from . import lrp
from .atp import AttributionOptions, attribution_patch
from .relevance import input_relevance, relevance_figure

__all__ = ["lrp", "AttributionOptions", "attribution_patch", "input_relevance", "relevance_figure"]
