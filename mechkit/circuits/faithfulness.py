"""Faithfulness as MIB reports it, and exact single-edge patching.

``f(C) = (M(C) - M(empty)) / (M(full) - M(empty))``: 1 when the circuit does what the whole model
does, 0 when it does what the fully ablated model does. A curve evaluates circuits of several
sizes (fractions of all edges; circuits built from the scores, top-n or greedy, then pruned)
in one fused batch, together with the empty and the full circuit.

- ``area`` (CPR-style, higher is better): the trapezoid-rule integral of f over the requested
  fractions, divided by their span (a circuit faithful at every size scores 1).
- ``distance`` (CMD-style, 0 is best): the same integral of |1 - f|.

:func:`mib_scores` gives the numbers MIB's leaderboard reports, computed as MIB's code computes them
(its grid runs to 100% of the edges, circuit sizes are floored, the trapezoids are not divided by the
span, and CPR comes from signed top-n circuits, CMD from absolute ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .circuit import Circuit
from .evaluate import evaluate

if TYPE_CHECKING:
    from ..model import HookedModel

DEFAULT_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # MIB's evaluate_area_under_curve


@dataclass
class FaithfulnessCurve:
    fractions: list[float]
    n_edges: list[int]          # edges kept after pruning
    metric: list[float]
    faithfulness: list[float]
    full: float
    empty: float
    meta: dict = field(default_factory=dict)

    @property
    def area(self) -> float:
        return _area(self.fractions, self.faithfulness)

    @property
    def distance(self) -> float:
        return _area(self.fractions, [abs(1 - f) for f in self.faithfulness])

    def smallest(self, level: float = 0.8) -> tuple[float, int] | None:
        """(fraction, edges) of the smallest circuit with faithfulness >= ``level``, or None."""
        for fr, ne, f in zip(self.fractions, self.n_edges, self.faithfulness):
            if f >= level:
                return fr, ne
        return None

    def to_dict(self) -> dict:
        return {"fractions": self.fractions, "n_edges": self.n_edges, "metric": self.metric,
                "faithfulness": self.faithfulness, "full": self.full, "empty": self.empty,
                "area": self.area, "distance": self.distance, "meta": self.meta}


def _area(x, y) -> float:
    if len(x) < 2:
        return float(y[0]) if y else float("nan")
    tot = sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1))
    return tot / (x[-1] - x[0])


def faithfulness_curve(model: HookedModel, task, scores, fractions=DEFAULT_FRACTIONS, mode: str = "topn",
                       ablation: str = "corrupted", metric=None, absolute: bool = True, **kw) -> FaithfulnessCurve:
    """Circuits of ``fractions`` of the edges from ``scores`` (:class:`EdgeScores`), evaluated
    exactly in one fused batch with the full and the empty circuit."""
    fractions = sorted(float(f) for f in fractions)
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise ValueError(f"fractions must lie in (0, 1]; got {fractions}")
    g = scores.graph
    circuits = [scores.circuit(max(1, round(f * g.n_edges)), mode=mode, absolute=absolute) for f in fractions]
    vals = evaluate(model, task, [Circuit.full(g), Circuit.empty(g), *circuits], ablation=ablation, metric=metric, **kw)
    full, empty = float(vals[0]), float(vals[1])
    den = full - empty
    if abs(den) < 1e-12:
        raise ValueError("the full and the empty circuit give the same metric: faithfulness is undefined "
                         "(are the clean and corrupted prompts different?)")
    metric_vals = vals[2:].tolist()
    return FaithfulnessCurve(fractions, [c.n_edges for c in circuits], metric_vals,
                             [(v - empty) / den for v in metric_vals], full, empty,
                             {"mode": mode, "ablation": ablation, "method": scores.meta.get("method")})


def _trapezoid(x, y) -> float:
    return sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1))


def mib_scores(model: HookedModel, task, scores, ablation: str = "corrupted", metric=None, grouped: bool = False,
               **kw) -> dict:
    """CPR and CMD as MIB's circuit track computes them (``evaluate_area_under_curve``; its results
    table takes CPR from signed and CMD from absolute top-n circuits). For each p in
    :data:`MIB_FRACTIONS` the circuit of the ``int(p * n_edges)`` best edges (largest score, or largest
    |score|), pruned of dangling nodes (0 edges: the empty circuit; all: the full model); f normalised
    by the full and empty circuits; trapezoids over p, not divided by the span: CPR = ∫ f over the
    signed curve, CMD = ∫ |1 - f| over the absolute one. All circuits run as one fused batch.
    Returns {"cpr", "cmd", "signed", "absolute"} (the two :class:`FaithfulnessCurve`). A grouped-query
    model's graph has fewer edges than MIB's ungrouped one, so its sizes would not be MIB's: refused
    unless the model was loaded through :func:`mechkit.circuits.ungroup_kv` or ``grouped=True`` asks
    for the same computation on mechkit's grouped graph."""
    g = scores.graph
    if g.grouped and not grouped:
        ungrouped = type(g)(g.n_layers, g.n_heads, g.n_heads, g.parallel).n_edges
        raise ValueError(f"mib_scores: this graph has grouped key/value receivers (n_kv_heads={g.n_kv_heads} < "
                         f"n_heads={g.n_heads}), so its {g.n_edges} edges are not MIB's {ungrouped} ungrouped ones "
                         f"and the circuit sizes would not be MIB's: load the model through "
                         f"mk.circuits.ungroup_kv(model) first, or pass grouped=True to score mechkit's grouped graph")
    sized = [int(p * g.n_edges) for p in MIB_FRACTIONS]
    circuits = [Circuit.empty(g) if n == 0 else scores.circuit(n, absolute=absolute)
                for absolute in (False, True) for n in sized]
    vals = evaluate(model, task, [Circuit.full(g), Circuit.empty(g), *circuits], ablation=ablation, metric=metric, **kw)
    full, empty = float(vals[0]), float(vals[1])
    if abs(full - empty) < 1e-12:
        raise ValueError("the full and the empty circuit give the same metric: faithfulness is undefined "
                         "(are the clean and corrupted prompts different?)")
    curves = {}
    for i, key in enumerate(("signed", "absolute")):
        m = vals[2 + i * len(sized):2 + (i + 1) * len(sized)].tolist()
        curves[key] = FaithfulnessCurve(list(MIB_FRACTIONS), [c.n_edges for c in circuits[i * len(sized):(i + 1) * len(sized)]],
                                        m, [(v - empty) / (full - empty) for v in m], full, empty,
                                        {"mode": "topn", "absolute": key == "absolute", "ablation": ablation,
                                         "method": scores.meta.get("method"), "grid": "MIB"})
    return {"cpr": _trapezoid(MIB_FRACTIONS, curves["signed"].faithfulness),
            "cmd": _trapezoid(MIB_FRACTIONS, [abs(1 - f) for f in curves["absolute"].faithfulness]), **curves}


def edge_patching(model: HookedModel, task, edges=None, ablation: str = "corrupted", metric=None, graph=None, **kw):
    """Exact effect of each edge: ``M(full) - M(full without that edge)`` (positive = the edge
    helps), every edge of the graph by default or the named ``edges``; one fused batch.
    Returns (names, effects [n_edges] tensor)."""
    from .flow import check_model

    graph = graph or check_model(model)
    if edges is None:
        pairs = graph.real.nonzero().tolist()
    else:
        pairs = [graph.edge_index(e) for e in edges]
    circuits = [Circuit.full(graph)]
    for s, r in pairs:
        e = graph.real.clone()
        e[s, r] = False
        circuits.append(Circuit(graph, e))
    vals = evaluate(model, task, circuits, ablation=ablation, metric=metric, **kw)
    return [graph.edge_name(s, r) for s, r in pairs], vals[0] - vals[1:]


def edge_patching_scores(model: HookedModel, task, ablation: str = "corrupted", metric=None, **kw):
    """:func:`edge_patching` over every edge, as :class:`EdgeScores` (method "exact")."""
    from .flow import check_model
    from .scores import EdgeScores

    graph = check_model(model)
    names, eff = edge_patching(model, task, None, ablation, metric, graph=graph, **kw)
    m = torch.zeros(graph.n_senders, graph.n_receivers)
    idx = graph.real.nonzero()
    m[idx[:, 0], idx[:, 1]] = eff.float().cpu()
    return EdgeScores(m, graph, {}, {"method": "exact", "ablation": ablation})
