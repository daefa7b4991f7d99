"""Atomic file writes: write to a temporary file beside the target, then rename over it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``path`` atomically.

    An interrupted write leaves the previous file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def read_values(path: Path, hpath: Path, checksum: str, what: str):
    """The floating tensor ``values`` of safetensors file ``path``, checked against ``checksum`` (from its
    header ``hpath``); ``what`` ("result file", "edge-scores file") starts every error, which names the file."""
    from safetensors.torch import load_file

    from .fingerprint import fingerprint

    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{what} {path} is not a readable safetensors file ({type(e).__name__})") from None
    if "values" not in tensors:
        raise ValueError(f"{what} {path} has no tensor 'values' (found {sorted(tensors)})")
    values = tensors["values"]
    if not values.is_floating_point():
        raise ValueError(f"{what} {path}: values have dtype {values.dtype}, expected a floating dtype")
    if fingerprint(values) != checksum:
        raise ValueError(f"{what} {path} fails the checksum in {hpath.name}: its values changed since they were "
                         f"saved (damaged file, or the two files come from different saves)")
    return values
