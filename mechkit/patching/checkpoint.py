"""Checkpoints of a patching sweep: one safetensors file per finished chunk, written atomically.

``manifest.json`` records a key of everything that determines the chunks (site, axes, mode,
chunk size, prompts, model sizes, metric); a folder written for another sweep is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_path, write_json


def sweep_key(**parts) -> str:
    """A hash of ``parts`` (tensors hashed by their bytes)."""
    h = hashlib.sha256()
    for name in sorted(parts):
        v = parts[name]
        h.update(name.encode())
        if isinstance(v, torch.Tensor):
            h.update(str(tuple(v.shape)).encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(v, sort_keys=True, default=str).encode())
    return h.hexdigest()


class ChunkStore:
    """Finished chunks of one sweep in ``folder`` (None: nothing is stored)."""

    def __init__(self, folder, key: str, n_chunks: int):
        self.folder = Path(folder) if folder is not None else None
        if self.folder is None:
            return
        manifest = self.folder / "manifest.json"
        if manifest.exists():
            old = json.loads(manifest.read_text())
            if old.get("key") != key:
                raise ValueError(f"checkpoint folder {self.folder} holds another sweep (key {old.get('key')[:12]}…, "
                                 f"this sweep {key[:12]}…); use a new folder")
        else:
            write_json(manifest, {"key": key, "n_chunks": n_chunks})

    def _path(self, i: int) -> Path:
        return self.folder / f"chunk_{i:06d}.safetensors"

    def load(self, i: int) -> torch.Tensor | None:
        if self.folder is None or not self._path(i).exists():
            return None
        return load_file(str(self._path(i)))["values"]

    def save(self, i: int, values: torch.Tensor) -> None:
        if self.folder is None:
            return
        with atomic_path(self._path(i)) as tmp:
            save_file({"values": values.detach().cpu().contiguous()}, str(tmp))
