"""Dictionaries bundled with the bundled models (trained by ``scripts/train_dictionaries.py``).

``mechkit/models/<model>/dictionaries/<name>/``: SAELens-format folders with a card
(``README.md``) and ``metrics.json``. Names: ``resid_sae`` (the middle layer's
``hook_resid_pre``), ``mlp_transcoder`` (one MLP, ``mlp.hook_in`` -> ``hook_mlp_out``).
"""

from __future__ import annotations

from pathlib import Path

from ..models import MODELS_DIR

NAMES = ("resid_sae", "mlp_transcoder")


def folder(model_name: str, name: str) -> Path:
    return MODELS_DIR / model_name / "dictionaries" / name


def list_bundled(model_name: str) -> list[str]:
    """Names of the dictionaries bundled with ``model_name`` whose weights are present."""
    return [n for n in NAMES if (folder(model_name, n) / "sae_weights.safetensors").exists()]


def bundled(model_name: str = "tiny-gpt2", name: str = "resid_sae"):
    """Load bundled dictionary ``name`` of bundled model ``model_name``."""
    from .io import load

    have = list_bundled(model_name)
    if name not in have:
        raise ValueError(f"no bundled dictionary {name!r} for model {model_name!r}; available: {have or 'none'}")
    return load(folder(model_name, name))
