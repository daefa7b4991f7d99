"""Edge-level circuits: the edge graph, EAP / EAP-IG / RelP edge scores, circuits, exact
evaluation and faithfulness (see docs/circuits.md)."""

from .attribute import METHODS, AttributeOptions, attribute
from .circuit import Circuit, greedy, prune, topn
from .evaluate import evaluate
from .faithfulness import (
                           MIB_FRACTIONS,
                           FaithfulnessCurve,
                           edge_patching,
                           edge_patching_scores,
                           faithfulness_curve,
                           mib_scores,
)
from .graph import Graph, ungroup_kv
from .scores import EdgeScores

__all__ = ["METHODS", "AttributeOptions", "Circuit", "EdgeScores", "FaithfulnessCurve", "Graph", "attribute", "edge_patching",
           "edge_patching_scores", "evaluate", "faithfulness_curve", "greedy", "MIB_FRACTIONS", "mib_scores", "prune",
           "topn", "ungroup_kv"]
