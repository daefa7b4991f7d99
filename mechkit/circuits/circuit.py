"""Circuits: a set of edges of the graph, their nodes, extraction and EAP-IG's JSON format.

Pruning (MIB's rule, as EAP-IG's ``Graph.prune``): repeatedly drop sender nodes with no
outgoing edge in the circuit or (except ``input``) no incoming edge into any of their
receivers, and edges whose sender was dropped or whose receiver belongs to no kept node
(``logits`` always stays), until nothing changes.
"""

from __future__ import annotations

import heapq
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import atomic_path
from .graph import Graph, check_bool, check_int


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
        key input appears once per query head of the group, with the same membership and the score
        split evenly among them (mechkit's grouped score is the sum over the ungrouped heads, which
        :meth:`from_json` adds back: a round trip is exact)."""
        g = self.graph
        cfg = {"n_layers": g.n_layers, "n_heads": g.n_heads, "parallel_attn_mlp": g.parallel, "n_kv_heads": g.n_kv_heads}
        if g.d_model is not None:  # EAP-IG's Graph.from_json builds its graph from it
            cfg["d_model"] = g.d_model
        in_nodes = set(self.nodes)
        nodes = {n: {"in_graph": n in in_nodes} for n in g.sender_names + ["logits"]}
        edges = {}
        sc = self.scores
        for s, r in g.real.nonzero().tolist():
            names = _ungrouped(g, s, r)
            score = 0.0 if sc is None else float(sc[s, r]) / len(names)
            entry = {"score": score, "in_graph": bool(self.edges[s, r])}
            for name in names:
                edges[name] = entry
        d = {"cfg": cfg, "nodes": nodes, "edges": edges}
        if path is not None:
            with atomic_path(Path(path)) as tmp:
                tmp.write_text(json.dumps(d))
        return d

    @classmethod
    def from_json(cls, graph: Graph, src: str | Path | dict) -> Circuit:
        """Read EAP-IG's graph JSON for ``graph`` (a dict or a file), validated: its ``cfg`` must
        describe ``graph`` (``n_layers``, ``n_heads``; ``n_kv_heads``, ``parallel_attn_mlp`` and
        ``d_model`` where given), it must list every edge, by existing names, each with a boolean
        ``in_graph`` and a finite ``score`` (or null: 0). A KV receiver is in the circuit when its
        edge is in for any query head of its group, and its score is the sum over those heads."""
        d, where = _read_graph_json(src)
        _check_cfg(graph, d["cfg"], where)
        edges, scores = _read_edges(graph, d["edges"], where)
        return cls(graph, edges, scores)


def _read_graph_json(src) -> tuple[dict, str]:
    """(the JSON object, how errors name it) of a dict or a file."""
    if isinstance(src, dict):
        d, where = src, "graph JSON (a dict)"
    else:
        path = Path(src)
        where = f"circuit file {path}"
        if not path.is_file():
            raise FileNotFoundError(f"{where} does not exist")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where} is not valid JSON ({json_reason(e)}); "
                             "expected EAP-IG's graph JSON") from None
    if not isinstance(d, dict):
        raise ValueError(f"{where} holds a JSON {type(d).__name__}, expected an object with keys 'cfg', 'nodes', "
                         "'edges' (EAP-IG's graph JSON)")
    for key in ("cfg", "edges", "nodes"):
        if (key in d or key != "nodes") and not isinstance(d.get(key), dict):
            got = type(d[key]).__name__ if key in d else "nothing"
            raise ValueError(f"{where}: '{key}' must be a JSON object (EAP-IG's graph JSON), got {got}")
    return d, where


def json_reason(e: json.JSONDecodeError | UnicodeDecodeError) -> str:
    """A short reason: where the JSON breaks, or that the bytes are not text (a binary file)."""
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg}: line {e.lineno}, column {e.colno}"
    return f"not UTF-8 text: {e.reason} at byte {e.start}"


_CFG = (("n_layers", "n_layers", True), ("n_heads", "n_heads", True), ("n_kv_heads", "n_kv_heads", False),
        ("parallel_attn_mlp", "parallel", False), ("d_model", "d_model", False))


def _check_cfg(graph: Graph, cfg: dict, where: str) -> None:
    """Refuse a ``cfg`` of wrong types, or one that describes another graph (keys it lacks, and a
    ``d_model`` the graph does not know, are not compared)."""
    theirs, ours = [], []
    for key, attr, required in _CFG:
        if key not in cfg and not required or key == "d_model" and cfg.get(key) is None:
            continue
        value = check_bool(cfg.get(key), where, f"cfg.{key}") if key == "parallel_attn_mlp" else \
            check_int(cfg.get(key), where, f"cfg.{key}")
        mine = getattr(graph, attr)
        if mine is not None and value != mine:
            theirs.append(f"{key}={value}")
            ours.append(f"{key}={mine}")
    if theirs:
        raise ValueError(f"{where} is for {', '.join(theirs)}; this graph has {', '.join(ours)} ({graph})")


def _read_edges(graph: Graph, entries: dict, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(edges, scores) of a graph JSON's ``edges``; every edge of ``graph`` must be listed."""
    lookup = {}
    for s, r in graph.real.nonzero().tolist():
        for name in _ungrouped(graph, s, r):
            lookup[name] = (s, r)
    edges = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    scores = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
    for name, info in entries.items():
        if name not in lookup:
            raise ValueError(f"{where}: edge {name!r} does not exist in this model's graph ({graph})")
        if not isinstance(info, dict):
            raise ValueError(f"{where}: edge {name!r} must be an object {{\"score\": ..., \"in_graph\": ...}}, "
                             f"got {info!r}")
        inside, score = info.get("in_graph"), info.get("score")
        if not isinstance(inside, bool):
            got = f"in_graph {inside!r}" if "in_graph" in info else "no 'in_graph'"
            raise ValueError(f"{where}: edge {name!r} has {got}, expected in_graph true or false")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                  or not math.isfinite(score)):
            raise ValueError(f"{where}: edge {name!r} has score {score!r}, expected a finite number (or null)")
        s, r = lookup[name]
        edges[s, r] |= inside
        scores[s, r] += score or 0.0
    if len(entries) < len(lookup):
        raise ValueError(f"{where} lists {len(entries)} of the {len(lookup)} edges of this graph; EAP-IG's graph "
                         "JSON lists every edge (in_graph false for those outside the circuit)")
    out = scores.float()
    if not torch.isfinite(out).all():
        s, r = (~torch.isfinite(out)).nonzero()[0].tolist()
        raise ValueError(f"{where}: the score of {graph.edge_name(s, r)!r} is beyond float32's range")
    return edges, out


def check_n(n, most: int | None = None) -> int:
    """``n`` (a number of edges) as an int in [0, most], else one sentence."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0 or (most is not None and n > most):
        limit = "a whole number >= 0" if most is None else f"a whole number from 0 to the graph's {most} edges"
        raise ValueError(f"n (the number of edges) must be {limit}; got {n!r}")
    return int(n)


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
    n = check_n(n, g.n_edges)
    e = torch.zeros(g.n_senders * g.n_receivers, dtype=torch.bool)
    e[scores.order(absolute)[:n]] = True
    c = Circuit(g, e.view(g.n_senders, g.n_receivers), scores.matrix)
    return c.pruned() if prune else c


def greedy(scores, n: int, absolute: bool = True, prune: bool = True) -> Circuit:
    """EAP-IG's greedy extraction: grow from ``logits``, always adding the best edge into a
    receiver whose node is already in the circuit."""
    g = scores.graph
    n = check_n(n, g.n_edges)
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
