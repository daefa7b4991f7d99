"""Checkpoints of a sweep: one safetensors file per finished chunk, written atomically, verified on read.

The key (:func:`sweep_key`) covers everything the chunks' values depend on, each part fingerprinted
by :mod:`mechkit.fingerprint`: the model's weights (every parameter's bytes), the task's tokens,
masks and answers, the metric (by what it computes, so the same metric resumes in a new process),
the sweep options (site, axes, mode, layers, chunk plan...) and any hooks on the model when the sweep
starts (an ablation, a steering, a user's own: :func:`mechkit.hookpoints.installed_hooks`); plus
mechkit's version.

Files in ``checkpoint_dir``:

- ``manifest.json``: ``{"format": FORMAT, "key": ..., "parts": {name: fingerprint}, "n_chunks": n}``.
  A manifest of another sweep (a part changed) is taken over with a warning naming what changed,
  and its chunks are recomputed as they are reached. A ``manifest.json`` that is not mechkit's (not
  JSON, not an object, another format) is refused, naming the file and the remedy.
- ``chunk_000000.safetensors``...: tensor ``values`` and metadata with the sweep's key, the chunk's
  index, its value count and a checksum of its bytes. A chunk that cannot be read, belongs to
  another sweep or index, or fails its checksum is never used: a warning names the file, and the
  chunk is recomputed and rewritten. So a deleted manifest lets no other sweep's chunks in.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..fingerprint import fingerprint
from ..io import atomic_path, write_json

FORMAT = "mechkit.chunks/2"
_PART_WORDS = {"weights": "the model's weights", "task": "the task (tokens, masks, answers)",
               "metric": "the metric", "options": "the sweep options",
               "hooks": "the hooks on the model (an ablation, a steering, your own)"}


class SweepKey(str):
    """The hex key of a sweep; ``.parts`` maps each part's name to its fingerprint."""

    parts: dict[str, str]


def task_part(task) -> dict:
    """What a PatchingTask contributes to a key: its tensors (the prompts' text does not change values)."""
    return {k: getattr(task, k) for k in ("clean_tokens", "corrupt_tokens", "clean_mask", "corrupt_mask",
                                          "answer_ids", "wrong_ids")}


def sweep_key(**parts) -> SweepKey:
    """A key over ``parts`` (name -> value), each fingerprinted by :func:`mechkit.fingerprint.fingerprint`:
    a module or HookedModel by its weights, tensors by their bytes, callables by what they compute.
    Use the names ``weights``, ``task``, ``metric`` and ``options`` so that a changed part is named."""
    from .._version import __version__

    digests = {name: fingerprint(v) for name, v in parts.items()}
    key = SweepKey(fingerprint([FORMAT, __version__, sorted(digests.items())]))
    key.parts = digests
    return key


def _what(x) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(x), type(x).__name__)


class ChunkStore:
    """Finished chunks of one sweep in ``folder`` (None: nothing is stored); see the module docstring."""

    def __init__(self, folder, key: str, n_chunks: int):
        self.folder = Path(folder) if folder is not None else None
        self.key = str(key)
        self.took_over = False
        if self.folder is None:
            return
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"checkpoint_dir {self.folder} is a file; expected a folder (new or of this sweep)")
        parts = dict(getattr(key, "parts", {}))
        manifest = self.folder / "manifest.json"
        new = {"format": FORMAT, "key": self.key, "parts": parts, "n_chunks": n_chunks}
        old = self._read_manifest(manifest) if manifest.exists() else None
        if old is not None and old.get("key") != self.key:
            before = old.get("parts") if isinstance(old.get("parts"), dict) else {}
            changed = [_PART_WORDS.get(p, p) for p in sorted(set(parts) | set(before)) if before.get(p) != parts.get(p)]
            why = (" and ".join(changed) + " changed") if before else "it was written by another mechkit version"
            warnings.warn(f"checkpoint folder {self.folder} holds another sweep ({why}): recomputing its chunks "
                          f"for this sweep (pass a new checkpoint_dir to keep both)", UserWarning, stacklevel=3)
            self.took_over = True
        if old is None or old.get("key") != self.key:
            write_json(manifest, new)

    def _read_manifest(self, path: Path) -> dict:
        remedy = "delete it (the chunks are verified one by one) or pass another checkpoint_dir"
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"checkpoint manifest {path} is not valid JSON ({getattr(e, 'msg', e)}); "
                             f"it is damaged or not mechkit's: {remedy}") from None
        if not isinstance(data, dict):
            raise ValueError(f"checkpoint manifest {path} holds {_what(data)}, expected a JSON object with "
                             f"'format': {FORMAT!r}: {remedy}")
        fmt = data.get("format")
        legacy = fmt is None and isinstance(data.get("key"), str) and isinstance(data.get("n_chunks"), int)
        if fmt is None and not legacy:
            raise ValueError(f"checkpoint manifest {path} has no 'format' (expected {FORMAT!r}); it is not "
                             f"mechkit's: {remedy}")
        if fmt is not None and not (isinstance(fmt, str) and fmt.startswith("mechkit.chunks/")):
            raise ValueError(f"checkpoint manifest {path} has format {fmt!r}, expected {FORMAT!r}; it is not "
                             f"mechkit's: {remedy}")
        if not isinstance(data.get("key"), str):
            raise ValueError(f"checkpoint manifest {path} has no string 'key' (found {_what(data.get('key'))}): "
                             f"{remedy}")
        return data

    def _path(self, i: int) -> Path:
        return self.folder / f"chunk_{i:06d}.safetensors"

    def _bad(self, path: Path, reason: str, foreign: bool = False) -> None:
        if not (foreign and self.took_over):  # the take-over warning already said so
            warnings.warn(f"checkpoint chunk {path} {reason}; recomputing it", UserWarning, stacklevel=3)
        return None

    def load(self, i: int, count: int | None = None) -> torch.Tensor | None:
        """Chunk ``i``'s values (``count`` of them when given), or None when absent or not usable."""
        path = self._path(i) if self.folder is not None else None
        if path is None or not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                values = f.get_tensor("values") if "values" in f.keys() else None
        except Exception as e:  # noqa: BLE001 - any unreadable file is recomputed, named
            return self._bad(path, f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        if values is None or meta.get("format") != FORMAT:
            return self._bad(path, "is not a mechkit chunk of this format", foreign=True)
        if meta.get("key") != self.key:
            return self._bad(path, "belongs to another sweep", foreign=True)
        if meta.get("index") != str(i):
            return self._bad(path, f"is chunk {meta.get('index')} of this sweep, not chunk {i}")
        if meta.get("checksum") != fingerprint(values):
            return self._bad(path, "fails its checksum (its bytes changed)")
        if values.dim() != 1 or (count is not None and values.numel() != count):
            return self._bad(path, f"holds {tuple(values.shape)} values, expected ({count},)")
        if values.dtype != torch.float32:  # what save writes; another dtype is not this sweep's chunk
            return self._bad(path, f"holds {str(values.dtype).removeprefix('torch.')} values, expected float32")
        return values

    def save(self, i: int, values: torch.Tensor) -> None:
        if self.folder is None:
            return
        values = values.detach().cpu().float().contiguous()
        meta = {"format": FORMAT, "key": self.key, "index": str(i), "count": str(values.numel()),
                "checksum": fingerprint(values)}
        with atomic_path(self._path(i)) as tmp:
            save_file({"values": values}, str(tmp), metadata=meta)
