"""Reading and writing dictionaries: SAELens's folder format, Gemma Scope's ``params.npz``, the hub.

SAELens 6 format (a folder): ``cfg.json`` (``architecture``, ``d_in``, ``d_sae``, ``dtype``,
``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, ``k`` for topk,
``d_out`` for transcoders, and ``metadata`` with ``hook_name``, ``hook_name_out``,
``model_name``, ``sae_lens_version``, ...) and ``sae_weights.safetensors`` (``W_enc``, ``b_enc``,
``W_dec``, ``b_dec`` and the architecture's extras). Configs older than SAELens 6 (``hook_point``,
``activation_fn_str``, top-level ``hook_name``) are read too.

Gemma Scope (``params.npz``): ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``: a
JumpReLU SAE without ``b_dec`` applied to its input.

Everything read is validated: every weight the architecture needs is present with the shape
``cfg.json`` implies, nothing else is there, values are finite; every config field read is checked
(its JSON type: booleans are JSON booleans, integers not booleans, ...; then its value).
Nothing is unpickled (``np.load(allow_pickle=False)``, safetensors).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open

from .dictionary import (
    ARCHITECTURES,
    DTYPES,
    SAE,
    SAEConfig,
    architecture_name,
    check_weights,
    global_threshold,
)
from .format import CFG_FILE, WEIGHTS_FILE, save, to_saelens_dict  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from ..model import HookedModel

GEMMA_SCOPE_FILE = "params.npz"
# pre-6.0 SAELens config keys
_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
_CFG_FIELDS = ("d_in", "d_sae", "d_out", "dtype", "apply_b_dec_to_input", "normalize_activations",
               "reshape_activations", "k", "rescale_acts_by_decoder_norm")


# the JSON type(s) each cfg.json field read here must have (the kinds of :func:`_is`)
_FIELD_KINDS = {"architecture": ("string", "null"), "d_in": ("integer",), "d_sae": ("integer",),
                "d_out": ("integer", "null"), "dtype": ("string",), "apply_b_dec_to_input": ("boolean",),
                "rescale_acts_by_decoder_norm": ("boolean",), "normalize_activations": ("string", "boolean", "null"),
                "reshape_activations": ("string", "null"), "k": ("integer", "null"), "metadata": ("object", "null"),
                "activation_fn": ("string", "null"), "activation_fn_kwargs": ("object", "null"),
                "finetuning_scaling_factor": ("boolean", "null"), "hook_head_index": ("integer", "null"),
                "hook_name": ("string", "null"), "hook_name_out": ("string", "null"), "model_name": ("string", "null"),
                "sae_lens_version": ("string", "null"), "sae_lens_training_version": ("string", "null")}
_META_KINDS = ("hook_name", "hook_name_out", "model_name", "sae_lens_version", "sae_lens_training_version",
               "hook_head_index")
_JSON_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object",
               list: "a list", type(None): "null"}


def _is(v, kind: str) -> bool:
    return {"boolean": isinstance(v, bool), "integer": isinstance(v, int) and not isinstance(v, bool),
            "number": isinstance(v, (int, float)) and not isinstance(v, bool), "string": isinstance(v, str),
            "object": isinstance(v, dict), "null": v is None}[kind]


def _check_kinds(d: dict, meta: dict, source: str) -> None:
    """Every field read here has its JSON type (a bool a JSON boolean, an int an integer and not a
    boolean, ...); ValueError naming the file and the field. A BatchTopK checkpoint's ``k`` (training
    only, a float in SAELens) may be any number."""
    batchtopk = isinstance(d.get("architecture"), str) and d["architecture"] in (
        "batchtopk", "matryoshka_batchtopk", "batch_topk", "matryoshka")
    checks = [(f"'{k}'", d[k], _FIELD_KINDS[k]) for k in _FIELD_KINDS if k in d]
    if isinstance(d.get("metadata"), dict):
        checks += [(f"'metadata'.{k}", meta[k], _FIELD_KINDS[k]) for k in _META_KINDS if k in meta]
    for name, v, kinds in checks:
        if name == "'k'" and batchtopk:
            kinds = ("number", "null")
        if not any(_is(v, kind) for kind in kinds):
            want = " or ".join(("an " if kd[0] in "aeiou" else "a ") + kd if kd != "null" else "null" for kd in kinds)
            raise ValueError(f"{source}: field {name} is {_JSON_NAMES.get(type(v), type(v).__name__)} ({v!r}), "
                             f"expected {want}")


def config_from_dict(raw: dict[str, Any], source: str = "<cfg>") -> SAEConfig:
    """An :class:`SAEConfig` from a SAELens ``cfg.json`` dict (6.x, or older with its renames)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    d = {_RENAMES.get(k, k): v for k, v in raw.items()}
    meta = d.get("metadata") if isinstance(d.get("metadata"), dict) else {}
    _check_kinds(d, meta, source)
    meta = dict(meta)
    arch = d.get("architecture") or "standard"
    version = str(meta.get("sae_lens_version") or d.get("sae_lens_version") or "0")
    if not version[:1].isdigit() or int(version.split(".")[0]) < 6:  # SAELens < 6: topk was an activation_fn
        kwargs = d.get("activation_fn_kwargs") or {}
        if d.get("activation_fn") == "topk" and kwargs.get("k") is not None:
            _check_kinds({"k": kwargs["k"]}, {}, f"{source}: 'activation_fn_kwargs'")
            arch = "topk"
            d["k"] = kwargs["k"]
    if "d_in" not in d or "d_sae" not in d:
        raise ValueError(f"{source}: a dictionary config needs 'd_in' and 'd_sae'; got keys {sorted(raw)}")
    if isinstance(d.get("normalize_activations"), bool):  # SAELens < 6
        d["normalize_activations"] = "expected_average_only_in" if d["normalize_activations"] else "none"
    for key in ("hook_name", "hook_name_out"):
        if d.get(key) is not None and meta.get(key) is None:
            meta[key] = d[key]
    if d.get("finetuning_scaling_factor"):
        raise ValueError(f"{source}: finetuning_scaling_factor=True (a pre-6.0 SAELens fine-tuned scale) is not "
                         "supported; fold the scale into W_dec first")
    if d.get("hook_head_index") is not None or meta.get("hook_head_index") is not None:
        raise ValueError(f"{source}: hook_head_index (an SAE on one head's slice) is not supported")
    kw = {k: d[k] for k in _CFG_FIELDS if k in d and d[k] is not None}
    try:
        arch_name = architecture_name(arch)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if arch_name in ("batchtopk", "matryoshka_batchtopk"):  # a training checkpoint: inference is JumpReLU
        kw.pop("k", None)
        kw.pop("rescale_acts_by_decoder_norm", None)
        meta.setdefault("training_architecture", arch_name)
        arch = "jumprelu"
    if ARCHITECTURES[arch_name][1]:  # transcoders never subtract b_dec from the input
        kw.setdefault("apply_b_dec_to_input", False)
    try:
        return SAEConfig(architecture=arch, hook_name=meta.pop("hook_name", None),
                         hook_name_out=meta.pop("hook_name_out", None), metadata=meta, **kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a malformed file
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def read_saelens(folder: Path, dtype=None, hook_name: str | None = None) -> SAE:
    cfg_path, w_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.exists():
            raise FileNotFoundError(f"{folder} is not a SAELens dictionary folder: {p.name} is missing")
    raw = _read_json(cfg_path)
    if dtype is not None:
        raw = dict(raw, dtype=_dtype_name(dtype))
    cfg = config_from_dict(raw, str(cfg_path))
    if hook_name is not None:
        cfg.hook_name = hook_name
    weights = _read_safetensors(w_path)
    if architecture_name(str(raw.get("architecture", "standard"))) in ("batchtopk", "matryoshka_batchtopk"):
        weights = batchtopk_to_jumprelu(weights, bool(raw.get("rescale_acts_by_decoder_norm", True)), cfg, str(w_path))
    weights = check_weights(cfg, weights, str(w_path))
    return SAE(cfg, weights)


def batchtopk_to_jumprelu(w: dict[str, torch.Tensor], rescale: bool, cfg: SAEConfig,
                          source: str = "<weights>") -> dict[str, torch.Tensor]:
    """SAELens's conversion of a BatchTopK training checkpoint for inference: the running
    ``topk_threshold`` becomes every feature's JumpReLU threshold and, when it was trained with
    ``rescale_acts_by_decoder_norm``, the decoder row norms n are folded in (``W_enc * n``,
    ``b_enc * n``, ``W_dec / n``)."""
    dt = DTYPES[cfg.dtype]
    w = {k: v.to(dt) if v.is_floating_point() else v for k, v in w.items()}  # others: refused by check_weights
    if "topk_threshold" in w:
        w["threshold"] = global_threshold(w.pop("topk_threshold"), cfg.d_sae, source)
    if rescale and all(k in w and w[k].is_floating_point() for k in ("W_dec", "W_enc", "b_enc")):
        n = w["W_dec"].norm(dim=-1)
        w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"] * n, w["b_enc"] * n, w["W_dec"] / n[:, None]
    return w


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(k for k in DTYPES if '.' not in k)}, got {dtype!r}")
    return name


def read_gemma_scope(path: Path, hook_name: str | None = None, dtype=None) -> SAE:
    """A Gemma Scope ``params.npz`` (JumpReLU; ``b_dec`` not applied to the input)."""
    try:
        with np.load(str(path), allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable .npz file of plain arrays: {e}") from e
    not_float = {k: str(v.dtype) for k, v in arrays.items() if v.dtype.kind != "f"}
    if not_float:
        k, dt = next(iter(not_float.items()))
        raise ValueError(f"{path}: array '{k}' has dtype {dt}, expected floating-point weights (Gemma Scope's are float32)")
    weights = {("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(v.astype(np.float32, copy=False))
               for k, v in arrays.items()}
    if "W_enc" not in weights or weights["W_enc"].dim() != 2:
        raise ValueError(f"{path}: a Gemma Scope file needs a 2-D 'W_enc'; got keys {sorted(arrays)}")
    d_in, d_sae = weights["W_enc"].shape
    if "embedding" in str(path) and "W_dec" in weights:  # as SAELens: Gemma Scope's embedding SAEs were trained on sqrt(d_model)-scaled inputs
        weights["W_enc"] = weights["W_enc"] / np.sqrt(d_in)
        weights["W_dec"] = weights["W_dec"] * np.sqrt(d_in)
    cfg = SAEConfig("jumprelu", d_in=int(d_in), d_sae=int(d_sae), dtype=_dtype_name(dtype or "float32"),
                    apply_b_dec_to_input=False, hook_name=hook_name or gemma_scope_hook(str(path)),
                    metadata={"source": "gemma-scope"})
    return SAE(cfg, check_weights(cfg, weights, str(path)))


def gemma_scope_hook(path: str) -> str | None:
    """The hook point a Gemma Scope path names (``...-res/layer_12/...`` -> ``blocks.12.hook_resid_post``)."""
    m = re.search(r"layer_(\d+)", path)
    if not m:
        return None
    from ..patching.sites import site_kind

    layer = int(m.group(1))
    for tag, kind in (("-res", "resid_post"), ("-mlp", "mlp_out"), ("-att", "z")):
        if tag in path:
            return site_kind(kind).hook_name(layer)
    return None


def load(source, model: HookedModel=None, hook_name: str | None = None, dtype=None, device=None) -> SAE:
    """Load a dictionary.

    ``source``: a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``), a Gemma Scope
    ``params.npz`` (or a folder holding one), or a hub location ``"owner/repo/sub/folder"``
    (downloaded with ``huggingface_hub``: SAELens-format or Gemma Scope files in that folder).
    ``model``: a HookedModel to check the dictionary against (its hook point exists there and
    its width matches). ``hook_name``: override (Gemma Scope files don't say where they sit;
    mechkit infers it from a ``...-res/layer_N`` path). ``dtype``/``device``: as loaded.
    """
    if hook_name is not None and not isinstance(hook_name, str):
        raise TypeError(f"hook_name must be a hook point name (a string) or None, got {hook_name!r} "
                        f"({type(hook_name).__name__})")
    p = Path(str(source))
    if not p.exists():
        if isinstance(source, str) and re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w./-]+)?", source) and not source.startswith("."):
            p = _download(source)
        else:
            raise FileNotFoundError(f"no dictionary at {source!r}: not a file or folder")
    if p.is_dir():
        if (p / CFG_FILE).exists() or (p / WEIGHTS_FILE).exists():
            sae = read_saelens(p, dtype, hook_name)
        elif (p / GEMMA_SCOPE_FILE).exists():
            sae = read_gemma_scope(p / GEMMA_SCOPE_FILE, hook_name or gemma_scope_hook(str(source)), dtype)
        else:
            raise FileNotFoundError(f"{p} holds no dictionary: expected {CFG_FILE} + {WEIGHTS_FILE} (SAELens) or "
                                    f"{GEMMA_SCOPE_FILE} (Gemma Scope)")
    elif p.suffix == ".npz":
        sae = read_gemma_scope(p, hook_name or gemma_scope_hook(str(source)), dtype)
    else:
        raise ValueError(f"{p}: expected a SAELens folder or a Gemma Scope params.npz, got a {p.suffix or 'plain'} file")
    if device is not None:
        sae = sae.to(device)
    if model is not None:
        try:
            check_fits(sae, model)
        except ValueError as e:  # name the file too (a HookNameError, a KeyError, names the point already)
            raise ValueError(f"{p}: {e}") from None
    return sae


def _download(location: str) -> Path:
    """Fetch ``owner/repo[/sub/folder]`` from the hub; the local folder holding its files."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise ImportError("loading a dictionary from the hub needs huggingface_hub") from e
    parts = location.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    patterns = [f"{sub}/{f}" for f in (CFG_FILE, WEIGHTS_FILE, GEMMA_SCOPE_FILE)] if sub else [
        CFG_FILE, WEIGHTS_FILE, GEMMA_SCOPE_FILE]
    try:
        root = Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(f"could not load dictionary {location!r}: no such local path, and the hub could not "
                                f"provide {repo!r} ({e.__class__.__name__}: {e})") from e
    return root / sub if sub else root


def _short_name(name) -> str | None:
    """A model name compared across conventions: the last part of a path or hub name, lower case, without
    mechkit's " (processed)" suffix."""
    if not isinstance(name, str) or not name.strip():
        return None
    return name.removesuffix(" (processed)").rstrip("/\\").replace("\\", "/").split("/")[-1].lower()


def warn_other_model(sae: SAE, model: HookedModel) -> None:
    """A UserWarning when the dictionary names the model it was trained for (``metadata.model_name``)
    and ``model`` has a known name that is another one (neither name contains the other). Names are not
    identities (aliases, local paths), so this never refuses."""
    trained = sae.cfg.metadata.get("model_name")
    name = getattr(model, "name", None)
    if name == type(getattr(model, "hf_model", None)).__name__:  # not set by mk.load: unknown
        return
    a, b = _short_name(trained), _short_name(name)
    if a and b and a not in b and b not in a:
        warnings.warn(f"dictionary {sae!r} was trained for model {trained!r} (its metadata.model_name), but it is "
                      f"used with model {name!r}; the widths match, but its features may mean nothing there",
                      UserWarning, stacklevel=3)


def check_fits(sae: SAE, model: HookedModel) -> None:
    """Refuse a dictionary whose hook points the model lacks or whose width differs from them; warn when
    it names another model than ``model`` (:func:`warn_other_model`)."""
    cfg = sae.cfg
    if cfg.hook_name is None:
        raise ValueError(f"{sae!r} does not say which hook point it reads (hook_name is None): pass hook_name=")
    for role, name, width in (("reads", cfg.hook_name, cfg.d_in), ("writes", cfg.out_hook, cfg.d_out)):
        if name is None:
            raise ValueError(f"the transcoder {sae!r} does not say which hook point it writes (hook_name_out is None)")
        model.points.resolve(name)  # HookNameError naming the point and the closest names
        have = point_width(model, name, cfg.reshape_activations == "hook_z")
        if have is not None and have != width:
            raise ValueError(f"dictionary {role} {name} with width {width}, but the model's {name} has width {have}")
    warn_other_model(sae, model)


_D_MODEL_TAILS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_embed",
                  "hook_pos_embed", "hook_normalized", "hook_mlp_in", "hook_in")
# points with a head axis before the last one: which head count it has
_HEAD_TAILS = {"hook_z": "n_heads", "hook_q": "n_heads", "hook_rot_q": "n_heads", "hook_k": "n_kv_heads",
               "hook_v": "n_kv_heads", "hook_rot_k": "n_kv_heads"}


def point_width(model: HookedModel, name: str, flat_heads: bool = False) -> int | None:
    """Width of the last axis of hook point ``name`` (heads x d_head for a per-head point such as hook_z
    when ``flat_heads``); None where the model's sizes do not give it (attention patterns: key positions)."""
    c = model.cfg
    tail = name.split(".")[-1]
    if tail in _D_MODEL_TAILS:
        return c.d_model
    if tail in ("hook_pre", "hook_post", "hook_pre_linear"):
        return c.d_mlp
    if tail in _HEAD_TAILS:
        return getattr(c, _HEAD_TAILS[tail]) * c.d_head if flat_heads else c.d_head
    if tail == "hook_result":
        return c.n_heads * c.d_model if flat_heads else c.d_model
    if tail == "hook_scale":
        return 1
    if tail == "hook_logits":
        return c.d_vocab
    return None
