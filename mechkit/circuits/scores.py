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
from safetensors.torch import save_file

from ..io import atomic_path, read_values
from .circuit import check_n, json_reason
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
        """Flat indices (into [S * R]) of every edge, best first (NaN scores last)."""
        m = self.matrix.abs() if absolute else self.matrix
        idx = self.graph.real.reshape(-1).nonzero()[:, 0]
        key = m.reshape(-1)[idx].nan_to_num(nan=-float("inf"))
        return idx[key.argsort(descending=True, stable=True)]

    def top(self, n: int = 10, absolute: bool = True) -> list[tuple[str, float]]:
        """The ``n`` best edges as (name, score), by |score| (or signed score)."""
        n = check_n(n)
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
        """``path`` (.safetensors) holds the values; ``path`` + ``.json`` the graph, baselines, meta and
        the values' checksum (which :meth:`load` requires)."""
        from ..fingerprint import fingerprint

        path = Path(path)
        values = self.values.detach().cpu().contiguous()
        header = {"kind": "edge_scores", "graph": self.graph.to_dict(), "baselines": self.baselines, "meta": self.meta,
                  "values_checksum": fingerprint(values)}
        with atomic_path(path) as tmp:
            save_file({"values": values}, str(tmp))
        with atomic_path(path.with_name(path.name + ".json")) as tmp:
            tmp.write_text(json.dumps(header, indent=1, default=str))

    @classmethod
    def load(cls, path: str | Path) -> EdgeScores:
        """Read what :meth:`save` wrote, validated: the header's fields and types, the graph's sizes,
        the values' checksum, dtype (floating point), shape (the header's graph) and finiteness.
        Errors name the file. Files saved without a checksum (before mechkit recorded one) are refused."""
        path = Path(path)
        hpath = path.with_name(path.name + ".json")
        header = _read_header(hpath, path)
        graph = Graph.from_dict(header["graph"], f"edge-scores header {hpath}")
        values = _read_values(path, hpath, header["values_checksum"], graph)
        return cls(values, graph, header["baselines"], header["meta"])

    def __repr__(self) -> str:
        return (f"EdgeScores({self.meta.get('method', '?')}, {self.graph.n_edges} edges, "
                f"per_position={self.per_position}, baselines={self.baselines})")


def _read_header(hpath: Path, path: Path) -> dict:
    """The JSON header of an edge-scores file, its fields' types checked."""
    if not hpath.is_file():
        raise FileNotFoundError(f"edge-scores header {hpath} does not exist (edge scores are {path.name} + {hpath.name})")
    try:
        header = json.loads(hpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"edge-scores header {hpath} is not valid JSON ({json_reason(e)})") from None
    if not isinstance(header, dict):
        raise ValueError(f"edge-scores header {hpath} holds a JSON {type(header).__name__}, expected an object")
    if header.get("kind") != "edge_scores":
        raise ValueError(f"edge-scores header {hpath}: 'kind' is {header.get('kind')!r}, expected 'edge_scores'")
    for key in ("graph", "baselines", "meta"):
        if not isinstance(header.get(key), dict):
            got = type(header[key]).__name__ if key in header else "nothing"
            raise ValueError(f"edge-scores header {hpath}: '{key}' must be a JSON object, got {got}")
    for k, v in header["baselines"].items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"edge-scores header {hpath}: baselines '{k}' must be a number, got {v!r}")
    if not isinstance(header.get("values_checksum"), str):
        raise ValueError(f"edge-scores header {hpath} has no values checksum (it was saved before mechkit recorded "
                         f"one, so nothing ties {path.name}'s values to it): compute the scores again and save them")
    return header


def _read_values(path: Path, hpath: Path, checksum: str, graph: Graph) -> torch.Tensor:
    """The values tensor of an edge-scores file, checked against its header's checksum and graph."""

    if not path.is_file():
        raise FileNotFoundError(f"edge-scores file {path} does not exist (edge scores are {path.name} + {hpath.name})")
    values = read_values(path, hpath, checksum, "edge-scores file")
    want = [graph.n_senders, graph.n_receivers]
    if values.dim() not in (2, 3) or list(values.shape[-2:]) != want:
        raise ValueError(f"edge-scores file {path} holds values of shape {list(values.shape)}; the graph in "
                         f"{hpath.name} ({graph}) needs [senders, receivers] = {want}, optionally per position")
    bad = ~torch.isfinite(values)
    if bad.any():
        s, r = bad.nonzero()[0].tolist()[-2:]
        raise ValueError(f"edge-scores file {path} holds {int(bad.sum())} NaN or infinite values "
                         f"(the first at {graph.edge_name(s, r)!r}); scores must be finite")
    return values
