"""Result: what every analysis returns — a tensor, its axis names and labels, baselines, provenance.

``values`` has one axis per name in ``axes`` (e.g. ``("layer", "pos")``); ``labels[axis]`` is a
list of strings of that axis's length (token strings for positions, ``L3H2`` style for heads).
``baselines`` holds scalars such as the clean and corrupted metric (and, for patching, ``unpatched``:
what a cell reads when its intervention changes nothing); ``meta`` says how the result
was computed (method, model, task, sites, timings). Results convert to a pandas DataFrame,
to a Plotly figure, and save to safetensors + JSON (never pickle).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .agreement import compare
from .io import atomic_path, read_values

__all__ = ["Result", "compare"]


@dataclass
class Result:
    values: torch.Tensor
    axes: tuple[str, ...]
    labels: dict[str, list[str]] = field(default_factory=dict)
    baselines: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    name: str = "result"

    def __post_init__(self):
        self.axes = tuple(self.axes)
        if self.values.dim() != len(self.axes):
            raise ValueError(f"values have {self.values.dim()} dims {tuple(self.values.shape)} but axes are {self.axes}")
        for i, ax in enumerate(self.axes):
            if ax not in self.labels:
                self.labels[ax] = [str(j) for j in range(self.values.shape[i])]
            elif len(self.labels[ax]) != self.values.shape[i]:
                raise ValueError(f"axis '{ax}' has {self.values.shape[i]} entries but {len(self.labels[ax])} labels")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def __repr__(self) -> str:
        return f"Result({self.name}, axes={self.axes}, shape={self.shape}, baselines={self.baselines})"

    def to_dataframe(self):
        """Long format: one row per cell, a column per axis (index and label) and ``value``."""
        import itertools

        import pandas as pd

        flat = self.values.detach().float().cpu().reshape(-1).tolist()
        rows = []
        for idx, v in zip(itertools.product(*[range(s) for s in self.shape]), flat):
            row = {}
            for ax, i in zip(self.axes, idx):
                row[ax] = i
                row[f"{ax}_label"] = self.labels[ax][i]
            row["value"] = v
            rows.append(row)
        return pd.DataFrame(rows)

    def figure(self, **kwargs):
        """A Plotly figure: heatmap for 2-D results (rows = first axis), bars for 1-D."""
        from .viz import result_figure

        return result_figure(self, **kwargs)

    def top(self, k: int = 10, absolute: bool = True) -> list[tuple[tuple[str, ...], float]]:
        """The k cells of largest change as (labels, value): ranked by ``|value - unpatched|`` where
        ``baselines["unpatched"]`` says what a cell reads when its intervention changes nothing (1 for
        normalised path patching and noising, the base run's metric for raw values), else by
        ``|value|``; ``absolute=False``: the largest values. NaN cells (none there) come last."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        flat = self.values.detach().float().reshape(-1)
        key = (flat - self.baselines.get("unpatched", 0.0)).abs() if absolute else flat
        order = key.nan_to_num(nan=-math.inf).argsort(descending=True, stable=True)[:k]
        out = []
        for i in order.tolist():
            idx = torch.unravel_index(torch.tensor(i), self.shape)
            out.append((tuple(self.labels[ax][int(j)] for ax, j in zip(self.axes, idx)), flat[i].item()))
        return out

    def save(self, path: str | Path) -> None:
        """``path`` (.safetensors) holds the values; ``path`` + ``.json`` holds axes, labels, baselines, meta."""
        path = Path(path)
        from .fingerprint import fingerprint

        values = self.values.detach().cpu().contiguous()
        header = {"name": self.name, "axes": list(self.axes), "labels": self.labels,
                  "baselines": self.baselines, "meta": self.meta, "values_checksum": fingerprint(values)}
        with atomic_path(path) as tmp:
            save_file({"values": values}, str(tmp))
        with atomic_path(path.with_name(path.name + ".json")) as tmp:
            tmp.write_text(json.dumps(header, indent=1, default=str))

    @classmethod
    def load(cls, path: str | Path) -> Result:
        """Read what :meth:`save` wrote, validated: both files readable, the header's fields and types,
        the values' checksum (when the header has one), axes and labels consistent with the values.
        Errors name the file and the field."""

        path = Path(path)
        hpath = path.with_name(path.name + ".json")
        for f in (path, hpath):
            if not f.is_file():
                raise FileNotFoundError(f"result file {f} does not exist (a result is {path.name} + {hpath.name})")
        try:
            header = json.loads(hpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"result header {hpath} is not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(header, dict):
            raise ValueError(f"result header {hpath} holds {type(header).__name__}, expected a JSON object")
        _check_header(header, hpath)
        values = read_values(path, hpath, header["values_checksum"], "result file")
        try:
            return cls(values, tuple(header["axes"]), header["labels"], header["baselines"], header["meta"],
                       header["name"])
        except ValueError as e:
            raise ValueError(f"result {path}: {e}") from None


def _check_header(header: dict, hpath: Path) -> None:
    """The fields of a result header and their types (each failure names the file and the field)."""
    want = {"name": str, "axes": list, "labels": dict, "baselines": dict, "meta": dict, "values_checksum": str}
    for k, t in want.items():
        if k == "values_checksum" and k not in header:
            raise ValueError(f"result header {hpath} has no 'values_checksum': its values cannot be verified "
                             f"(saved by an older mechkit, or edited); compute the result again and save it")
        if not isinstance(header.get(k), t):
            raise ValueError(f"result header {hpath}: '{k}' must be a JSON {t.__name__}, got "
                             f"{type(header.get(k)).__name__}")
    if not all(isinstance(a, str) for a in header["axes"]):
        raise ValueError(f"result header {hpath}: 'axes' must be a list of strings, got {header['axes']!r}")
    for ax, labels in header["labels"].items():
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"result header {hpath}: labels of axis {ax!r} must be a list of strings, got "
                             f"{labels!r:.80}")
    for k, v in header["baselines"].items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"result header {hpath}: baseline {k!r} must be a finite number, got {v!r}")
