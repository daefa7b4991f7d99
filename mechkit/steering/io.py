"""Save / load a steering: one safetensors file, nothing pickled.

Tensors are stored as ``"{point}|{key}"``; the safetensors metadata holds one entry,
``"mechkit_steering"``, a JSON object: ``method``, ``mechkit_version``, ``points``,
``hparams``, ``model`` (family, model_type, n_layers, d_model, d_mlp) and ``history``
(training losses). :func:`load` rebuilds the method's class; applying it to (or loading it
with ``model=``) a model of another architecture or width raises ``ValueError``.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..io import atomic_path

KEY = "mechkit_steering"


def _classes():
    from .diffmean import DiffMean
    from .features import FeatureSteering
    from .gains import Gains
    from .linear_act import LinearAcT
    from .lineas import LinEAS

    return {c.method: c for c in (DiffMean, LinearAcT, LinEAS, Gains, FeatureSteering)}


def save(st, path) -> None:
    st._require_fitted()
    from .. import __version__

    tensors = {f"{p}|{k}": t.detach().cpu().contiguous() for p, d in st.tensors.items() for k, t in d.items()}
    meta = {"method": st.method, "mechkit_version": __version__, "points": st.points, "hparams": st.hparams,
            "model": st.info, "history": st.history[-1000:]}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={KEY: json.dumps(meta, default=str)})


def load(path, model=None):
    """A steering from ``path`` (``.safetensors``); with ``model``, also check it fits that model."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no steering file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a malformed file
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if KEY not in md:
        raise ValueError(f"{path} is not a mechkit steering file (no '{KEY}' metadata)")
    meta = json.loads(md[KEY])
    classes = _classes()
    if meta.get("method") not in classes:
        raise ValueError(f"{path}: unknown steering method {meta.get('method')!r}; known: {sorted(classes)}")
    st = classes[meta["method"]](**meta["hparams"])
    st.tensors = {p: {} for p in meta["points"]}
    for k, t in flat.items():
        p, key = k.rsplit("|", 1)
        st.tensors[p][key] = t
    st.info = meta["model"]
    st.history = list(meta.get("history", []))
    if model is not None:
        st.check_model(model)
    return st
