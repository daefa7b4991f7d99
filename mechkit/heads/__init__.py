"""Attention-head analyses: per-head scores, targeted-vs-random ablation study, training telemetry.

- ``head_scores(model, kinds=...)`` -> ``{kind: Result over (layer, head)}``
- ``head_ablation_effects(model, how="mean", task=None)`` -> Result over (layer, head): repeat-loss
  change (or a task metric's change) when each head alone is ablated, on the fused patching engine
- ``ablation_study(model, score="induction", top_frac=0.02, seeds=10)`` -> ``StudyResult``
- ``TelemetryCallback``, ``log_head_scores``, ``timeline_figure``
"""

from .scores import ALL_KINDS, copying_scores, head_scores, target_masks
from .study import (
    StudyOptions,
    StudyResult,
    ablation_study,
    head_ablation_effects,
    random_heads_per_layer,
    top_heads_per_layer,
)
from .telemetry import (
    TelemetryCallback,
    log_head_scores,
    read_telemetry,
    telemetry_from_checkpoints,
    timeline_figure,
)

__all__ = ["StudyOptions", "ALL_KINDS", "head_scores", "copying_scores", "target_masks", "ablation_study", "head_ablation_effects",
           "StudyResult", "top_heads_per_layer", "random_heads_per_layer", "TelemetryCallback", "log_head_scores",
           "read_telemetry", "telemetry_from_checkpoints", "timeline_figure"]
