"""EdgeScores: one signed score per edge of the graph (optionally per position).

``values`` is ``[senders, receivers]`` (or ``[pos, senders, receivers]``); pairs that are no edge
hold 0 and are never listed. Saved as safetensors + JSON (never pickle), validated on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_path
from .graph import Graph


@dataclass
class EdgeScores:
    values: torch.Tensor
    graph: Graph
    baselines: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        want = (self.graph.n_senders, self.graph.n_receivers)
        if tuple(self.values.shape[-2:]) != want or self.values.dim() not in (2, 3):
            raise ValueError(f"edge scores must be [senders, receivers] = {list(want)} (optionally with a leading "
                             f"position axis); got {list(self.values.shape)}")

    @property
    def per_position(self) -> bool:
        return self.values.dim() == 3

    @property
    def matrix(self) -> torch.Tensor:
        """[senders, receivers], summed over positions if kept per position."""
        return self.values.sum(0) if self.per_position else self.values

    def edge_values(self) -> tuple[list[str], torch.Tensor]:
        """(names, scores [n_edges]) of every edge, in (sender, receiver) order."""
        idx = self.graph.real.nonzero()
        m = self.matrix
        return [self.graph.edge_name(s, r) for s, r in idx.tolist()], m[idx[:, 0], idx[:, 1]]

    def __getitem__(self, edge: str) -> float:
        s, r = self.graph.edge_index(edge)
        return float(self.matrix[s, r])

    def order(self, absolute: bool = True) -> torch.Tensor:
        """Flat indices (into [S * R]) of every edge, best first."""
        m = self.matrix.abs() if absolute else self.matrix
        m = m.masked_fill(~self.graph.real, -float("inf"))
        return m.reshape(-1).argsort(descending=True, stable=True)[: self.graph.n_edges]

    def top(self, n: int = 10, absolute: bool = True) -> list[tuple[str, float]]:
        """The ``n`` best edges as (name, score), by |score| (or signed score)."""
        R = self.graph.n_receivers
        m = self.matrix
        return [(self.graph.edge_name(i // R, i % R), float(m.reshape(-1)[i])) for i in self.order(absolute)[:n].tolist()]

    def rank(self, edge: str, absolute: bool = True) -> int:
        """1-based rank of ``edge``."""
        s, r = self.graph.edge_index(edge)
        pos = (self.order(absolute) == s * self.graph.n_receivers + r).nonzero()
        return int(pos[0, 0]) + 1

    def circuit(self, n: int, mode: str = "topn", absolute: bool = True, prune: bool = True):
        """A :class:`~mechkit.circuits.Circuit` of ``n`` edges (before pruning): "topn" or "greedy"."""
        from .circuit import greedy, topn

        if mode not in ("topn", "greedy"):
            raise ValueError(f"mode must be 'topn' or 'greedy'; got {mode!r}")
        return (topn if mode == "topn" else greedy)(self, n, absolute=absolute, prune=prune)

    def to_json(self, path: str | Path | None = None) -> dict:
        """Every edge with its score in EAP-IG's graph JSON (all edges in the graph): the scores file
        MIB's circuit track takes as a submission (it extracts its circuits from the scores; mechkit's
        positive scores are MIB's, which attributes its loss). Grouped-query models: see
        :meth:`Circuit.to_json`."""
        from .circuit import Circuit

        return Circuit(self.graph, self.graph.real.clone(), self.matrix).to_json(path)

    def to_dataframe(self):
        import pandas as pd

        names, vals = self.edge_values()
        return pd.DataFrame({"edge": names, "score": vals.tolist()})

    def save(self, path: str | Path) -> None:
        """``path`` (.safetensors) holds the values; ``path`` + ``.json`` the graph, baselines, meta."""
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({"values": self.values.detach().cpu().contiguous()}, str(tmp))
        header = {"kind": "edge_scores", "graph": self.graph.to_dict(), "baselines": self.baselines, "meta": self.meta}
        with atomic_path(path.with_name(path.name + ".json")) as tmp:
            tmp.write_text(json.dumps(header, indent=1, default=str))

    @classmethod
    def load(cls, path: str | Path) -> EdgeScores:
        path = Path(path)
        head_path = path.with_name(path.name + ".json")
        try:
            header = json.loads(head_path.read_text())
            g = header["graph"]
            d_model = None if g.get("d_model") is None else int(g["d_model"])
            graph = Graph(int(g["n_layers"]), int(g["n_heads"]), int(g["n_kv_heads"]), bool(g["parallel_attn_mlp"]),
                          d_model)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{head_path}: not an edge-scores header ({type(e).__name__}: {e})") from None
        if header.get("kind") != "edge_scores":
            raise ValueError(f"{head_path}: kind is {header.get('kind')!r}, expected 'edge_scores'")
        return cls(load_file(str(path))["values"], graph, header.get("baselines", {}), header.get("meta", {}))

    def __repr__(self) -> str:
        return (f"EdgeScores({self.meta.get('method', '?')}, {self.graph.n_edges} edges, "
                f"per_position={self.per_position}, baselines={self.baselines})")
