"""SAELens 6 files written by mechkit: ``cfg.json`` + ``sae_weights.safetensors`` (names and writer).

Reading them (and checking them) is :mod:`mechkit.sae.io`; this module imports no dictionary class,
so the dictionary can save itself without an import cycle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_file

from ..io import atomic_path

if TYPE_CHECKING:
    from .dictionary import SAE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


def to_saelens_dict(cfg: SAEConfig) -> dict[str, Any]:
    """``cfg.json`` content as SAELens 6 writes it."""
    from .._version import __version__

    meta = dict(cfg.metadata)
    meta["hook_name"] = cfg.hook_name
    if cfg.is_transcoder:
        meta["hook_name_out"] = cfg.hook_name_out
    meta.setdefault("sae_lens_version", "6.0.0")
    meta.setdefault("sae_lens_training_version", "6.0.0")
    meta["mechkit_version"] = __version__
    out: dict[str, Any] = {"architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
                           "dtype": cfg.dtype, "device": "cpu", "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
                           "normalize_activations": cfg.normalize_activations,
                           "reshape_activations": cfg.reshape_activations, "metadata": meta}
    if cfg.activation == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = cfg.rescale_acts_by_decoder_norm
    if cfg.is_transcoder:
        out["d_out"] = cfg.d_out
    return out


def save(sae: SAE, folder) -> None:
    """Write ``folder/cfg.json`` and ``folder/sae_weights.safetensors`` (SAELens 6 layout), atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.named_parameters()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(folder / CFG_FILE) as tmp:
        tmp.write_text(json.dumps(to_saelens_dict(sae.cfg), indent=2))
