"""Circuits: a set of edges of the graph, their nodes, extraction and EAP-IG's JSON format.

Pruning (MIB's rule, as EAP-IG's ``Graph.prune``): repeatedly drop sender nodes with no
outgoing edge in the circuit or (except ``input``) no incoming edge into any of their
receivers, and edges whose sender was dropped or whose receiver belongs to no kept node
(``logits`` always stays), until nothing changes.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import atomic_path
from .graph import Graph


@dataclass
class Circuit:
    """``edges``: [senders, receivers] bool (a subset of ``graph.real``); ``scores`` optional."""

    graph: Graph
    edges: torch.Tensor
    scores: torch.Tensor | None = None

    def __post_init__(self):
        self.edges = self.edges.bool().cpu() & self.graph.real

    def __repr__(self) -> str:
        return f"Circuit({self.n_edges} of {self.graph.n_edges} edges, {len(self.nodes)} nodes, {self.graph})"

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    @property
    def edge_names(self) -> list[str]:
        return [self.graph.edge_name(s, r) for s, r in self.edges.nonzero().tolist()]

    @property
    def nodes(self) -> list[str]:
        """Sender nodes with an edge in the circuit, plus ``logits`` if any edge reaches it."""
        keep = self.edges.any(1) | ((self.edges.any(0).float() @ self.graph.receiver_owner.float()) > 0)
        names = [n for n, k in zip(self.graph.sender_names, keep.tolist()) if k]
        return names + (["logits"] if bool(self.edges[:, self.graph.logits].any()) else [])

    def __contains__(self, edge: str) -> bool:
        s, r = self.graph.edge_index(edge)
        return bool(self.edges[s, r])

    def pruned(self) -> Circuit:
        return Circuit(self.graph, prune(self.graph, self.edges), self.scores)

    @classmethod
    def from_edges(cls, graph: Graph, names) -> Circuit:
        e = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
        for name in names:
            e[graph.edge_index(name)] = True
        return cls(graph, e)

    @classmethod
    def full(cls, graph: Graph) -> Circuit:
        return cls(graph, graph.real.clone())

    @classmethod
    def empty(cls, graph: Graph) -> Circuit:
        return cls(graph, torch.zeros_like(graph.real))

    # ---------------------------------------------------------------- EAP-IG JSON
    def to_json(self, path: str | Path | None = None) -> dict:
        """EAP-IG's graph JSON (``cfg``, ``nodes`` {name: {in_graph}}, ``edges`` {name: {score, in_graph}}),
        readable by EAP-IG's ``Graph.from_json`` (which needs ``d_model``: graphs from a model have it).
        Grouped-query models are written ungrouped, as EAP-IG sees them: the edge into KV head g's
        key input appears once per query head of the group, with the same score and membership."""
        g = self.graph
        cfg = {"n_layers": g.n_layers, "n_heads": g.n_heads, "parallel_attn_mlp": g.parallel, "n_kv_heads": g.n_kv_heads}
        if g.d_model is not None:  # EAP-IG's Graph.from_json builds its graph from it
            cfg["d_model"] = g.d_model
        in_nodes = set(self.nodes)
        nodes = {n: {"in_graph": n in in_nodes} for n in g.sender_names + ["logits"]}
        edges = {}
        sc = self.scores
        for s, r in g.real.nonzero().tolist():
            entry = {"score": 0.0 if sc is None else float(sc[s, r]), "in_graph": bool(self.edges[s, r])}
            for name in _ungrouped(g, s, r):
                edges[name] = entry
        d = {"cfg": cfg, "nodes": nodes, "edges": edges}
        if path is not None:
            with atomic_path(Path(path)) as tmp:
                tmp.write_text(json.dumps(d))
        return d

    @classmethod
    def from_json(cls, graph: Graph, src: str | Path | dict) -> Circuit:
        """Read EAP-IG's graph JSON for ``graph`` (a dict or a file). Every edge name must exist; a
        KV receiver is in the circuit when its edge is in for any query head of its group."""
        d = json.loads(Path(src).read_text()) if not isinstance(src, dict) else src
        if not isinstance(d, dict) or "edges" not in d or "cfg" not in d:
            raise ValueError(f"{src if not isinstance(src, dict) else 'the dict'}: not an EAP-IG graph JSON "
                             "(expected keys 'cfg', 'nodes', 'edges')")
        cfg = d["cfg"]
        if int(cfg.get("n_layers", -1)) != graph.n_layers or int(cfg.get("n_heads", -1)) != graph.n_heads:
            raise ValueError(f"graph JSON is for {cfg.get('n_layers')} layers x {cfg.get('n_heads')} heads; "
                             f"this model has {graph.n_layers} x {graph.n_heads}")
        lookup = {}
        for s, r in graph.real.nonzero().tolist():
            for name in _ungrouped(graph, s, r):
                lookup[name] = (s, r)
        edges = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
        scores = torch.zeros(graph.n_senders, graph.n_receivers)
        for name, info in d["edges"].items():
            if name not in lookup:
                raise ValueError(f"graph JSON edge {name!r} does not exist in this model's graph")
            s, r = lookup[name]
            edges[s, r] |= bool(info.get("in_graph", False))
            scores[s, r] = float(info.get("score", 0.0) or 0.0)
        return cls(graph, edges, scores)


def _ungrouped(g: Graph, s: int, r: int) -> list[str]:
    if not g.grouped:
        return [g.edge_name(s, r)]
    recv = g.receiver_names[r]
    if "<k>" not in recv and "<v>" not in recv:
        return [g.edge_name(s, r)]
    layer, rest = recv[1:].split(".kv")
    kv, part = int(rest[:-3]), recv[-3:]
    group = g.n_heads // g.n_kv_heads
    return [f"{g.sender_names[s]}->a{layer}.h{h}{part}" for h in range(kv * group, (kv + 1) * group)]


def prune(graph: Graph, edges: torch.Tensor) -> torch.Tensor:
    """MIB's pruning of dangling nodes (see the module docstring); returns a new edge mask."""
    e = edges.clone() & graph.real
    own = graph.receiver_owner.float()
    while True:
        has_out = e.any(1)
        has_in = (e.any(0).float() @ own) > 0
        has_in[0] = True
        nodes = has_out & has_in
        recv_ok = (own @ nodes.float()) > 0
        recv_ok[graph.logits] = True
        new = e & nodes[:, None] & recv_ok[None, :]
        if torch.equal(new, e):
            return e
        e = new


def topn(scores, n: int, absolute: bool = True, prune: bool = True) -> Circuit:
    """The ``n`` best edges (then pruned)."""
    g = scores.graph
    if not 0 <= n <= g.n_edges:
        raise ValueError(f"n must be between 0 and the graph's {g.n_edges} edges; got {n}")
    e = torch.zeros(g.n_senders * g.n_receivers, dtype=torch.bool)
    e[scores.order(absolute)[:n]] = True
    c = Circuit(g, e.view(g.n_senders, g.n_receivers), scores.matrix)
    return c.pruned() if prune else c


def greedy(scores, n: int, absolute: bool = True, prune: bool = True) -> Circuit:
    """EAP-IG's greedy extraction: grow from ``logits``, always adding the best edge into a
    receiver whose node is already in the circuit."""
    g = scores.graph
    if not 0 <= n <= g.n_edges:
        raise ValueError(f"n must be between 0 and the graph's {g.n_edges} edges; got {n}")
    m = scores.matrix.abs() if absolute else scores.matrix
    own = g.receiver_owner
    heap: list[tuple[float, int, int]] = []

    def push_receivers(rs):
        for r in rs:
            for s in range(int(g.upstream[r])):
                heap.append((-float(m[s, r]), s, r))
    push_receivers([g.logits])
    heapq.heapify(heap)
    e = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)
    in_nodes = set()
    while n > 0 and heap:
        _, s, r = heapq.heappop(heap)
        if e[s, r]:
            continue
        e[s, r] = True
        n -= 1
        if s not in in_nodes:
            in_nodes.add(s)
            for r2 in own[:, s].nonzero()[:, 0].tolist():
                for s2 in range(int(g.upstream[r2])):
                    if not e[s2, r2]:
                        heapq.heappush(heap, (-float(m[s2, r2]), s2, r2))
    c = Circuit(g, e, scores.matrix)
    return c.pruned() if prune else c
