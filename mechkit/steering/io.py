"""Save / load a steering: one safetensors file, nothing pickled.

Tensors are stored as ``"{point}|{key}"``; the safetensors metadata holds one entry,
``"mechkit_steering"``, a JSON object: ``method``, ``mechkit_version``, ``points``,
``hparams``, ``model`` (family, model_type, n_layers, d_model, d_mlp) and ``history``
(training losses). :func:`load` rebuilds the method's class; applying it to (or loading it
with ``model=``) a model of another architecture or width raises ``ValueError``.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open
from safetensors.torch import save_file

from ..io import atomic_path

if TYPE_CHECKING:
    from ..model import HookedModel

KEY = "mechkit_steering"


# method name -> Steering subclass; every subclass that sets ``method`` registers itself here
# (``Steering.__init_subclass__``), so this module imports none of them
METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    """Record ``cls`` (a Steering subclass) under ``cls.method`` for :func:`load`."""
    METHODS[cls.method] = cls
    return cls


def _classes() -> dict[str, type]:
    return dict(METHODS)


def save(st, path) -> None:
    st._require_fitted()
    from .._version import __version__

    tensors = {f"{p}|{k}": t.detach().cpu().contiguous() for p, d in st.tensors.items() for k, t in d.items()}
    meta = {"method": st.method, "mechkit_version": __version__, "points": st.points, "hparams": st.hparams,
            "model": st.info, "history": st.history[-1000:]}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={KEY: json.dumps(meta, default=str)})


def _what(x) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean", dict: "an object",
            type(None): "null"}.get(type(x), type(x).__name__)


def _metadata(path: Path, md: dict) -> dict:
    """The metadata JSON, checked against its schema; ValueError naming the file and the field."""
    if KEY not in md:
        raise ValueError(f"{path} is not a mechkit steering file (no '{KEY}' metadata)")
    try:
        meta = json.loads(md[KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata '{KEY}' is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: metadata '{KEY}' holds {_what(meta)}, expected a JSON object")
    classes = _classes()
    if meta.get("method") not in classes:
        raise ValueError(f"{path}: unknown steering method {meta.get('method')!r}; known: {sorted(classes)}")
    pts = meta.get("points")
    if not (isinstance(pts, list) and pts and all(isinstance(p, str) for p in pts) and len(set(pts)) == len(pts)):
        raise ValueError(f"{path}: 'points' must be a non-empty list of distinct hook names, got {pts!r}")
    hp = meta.get("hparams")
    if not isinstance(hp, dict):
        raise ValueError(f"{path}: 'hparams' must be a JSON object, got {_what(hp)}")
    takes = [n for n, p in inspect.signature(classes[meta["method"]].__init__).parameters.items()
             if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(hp) - set(takes))
    if unknown:
        raise ValueError(f"{path}: 'hparams' has {unknown}, which {meta['method']} does not take (it takes {takes})")
    _check_model_info(path, meta.get("model"))
    hist = meta.get("history", [])
    if not (isinstance(hist, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in hist)):
        raise ValueError(f"{path}: 'history' must be a list of numbers, got {_what(hist)}")
    bad = [x for x in hist if not math.isfinite(x)]
    if bad:
        raise ValueError(f"{path}: 'history' (the training losses) must hold finite numbers, got {len(bad)} "
                         f"non-finite ({bad[0]})")
    return meta


def _check_model_info(path: Path, info) -> None:
    """The metadata's ``model`` object: family and model_type strings, positive integer sizes."""
    if not isinstance(info, dict):
        raise ValueError(f"{path}: 'model' must be a JSON object describing the model, got {_what(info)}")
    lacks = [k for k in ("family", "n_layers", "d_model", "d_mlp") if k not in info]
    if lacks:
        raise ValueError(f"{path}: 'model' lacks {lacks}")
    for k in ("family", "model_type"):
        if k in info and not (isinstance(info[k], str) and info[k]):
            raise ValueError(f"{path}: 'model'.{k} must be a non-empty string, got {info[k]!r}")
    for k in ("n_layers", "d_model", "d_mlp"):
        if isinstance(info[k], bool) or not isinstance(info[k], int) or info[k] <= 0:
            raise ValueError(f"{path}: 'model'.{k} must be a positive integer, got {info[k]!r}")


def _build(path: Path, meta: dict):
    """The method's object from the checked hyperparameters (its constructor checks their values)."""
    try:
        return _classes()[meta["method"]](**meta["hparams"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: 'hparams': {e}") from None


def load(path, model: HookedModel | None = None):
    """A steering from ``path`` (``.safetensors``); with ``model``, also check it fits that model.

    The whole file is validated: the metadata against its schema (method, points, hparams the
    method takes with the types and ranges its constructor checks, model description, finite
    history), and every tensor: named ``"{point}|{key}"`` with a point of the metadata (of the form
    the method needs) and a key of the method, every point holding every key, a float dtype, shape
    ``[width]`` as the point needs (d_model, d_mlp; with ``model``, also d_head at per-head points),
    finite values. Errors name the file and the field or tensor.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no steering file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a malformed file
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]})") from None
    meta = _metadata(path, md)
    points = meta["points"]
    st = _build(path, meta)
    st.tensors = {p: {} for p in points}
    for k, t in flat.items():
        if "|" not in k:
            raise ValueError(f"{path}: tensor '{k}' is not named '<point>|<key>'")
        p, key = k.rsplit("|", 1)
        if p not in st.tensors:
            raise ValueError(f"{path}: tensor '{k}': point '{p}' is not in the metadata's points {points}")
        st.tensors[p][key] = t
    st.info = meta["model"]
    st.history = list(meta.get("history", []))
    st.validate(model, where=str(path))
    return st
