"""Site kinds for activation patching: which hook point, which axes, how one index is written.

A *site kind* names a hook point template and the axes of its activation (batch excluded):

- ``resid_pre/mid/post``, ``attn_out``, ``mlp_out``: ``[batch, pos, d_model]``
- ``z``, ``q``, ``k``, ``v`` (per head): ``[batch, pos, head, d_head]`` (k/v have n_kv_heads)
- ``pattern``: ``[batch, head, pos (query), key_pos]``; by ("layer", "head", "pos", "key_pos") patches
  single (destination, source) entries, like TransformerLens's ``get_act_patch_attn_head_pattern_dest_src_pos``
- ``neuron`` (MLP post-activation): ``[batch, pos, neuron]``
- ``mixer_out`` (a hybrid's Mamba/DeltaNet/conv layer output): ``[batch, pos, d_model]``
- ``router_logits`` (a mixture-of-experts router): ``[batch, pos, expert]``; patching it re-routes
  the tokens (the experts chosen downstream follow the patched logits)
- any per-layer hook point by name (TransformerLens's ``generic_activation_patch`` habit):
  ``"blocks.{l}.ln1.hook_normalized"`` (every layer) or ``"blocks.3.attn.hook_attn_scores"`` (that layer);
  its axes come from the name (see ``_BY_SUFFIX``), e.g. ``[batch, pos, d_model]`` for residual-like points

A patch is an index over ``by`` (always starting with ``"layer"``); the axes of ``by`` other
than ``layer`` are written at that index, every other axis is written whole.

The named kinds themselves (names, hook templates, axes) live in the one site registry,
:mod:`mechkit.sites`; this module adds hook-name sites and what patching needs on top of it.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ..sites import _HEAD, ALIASES, SITE_KINDS, SiteKind, layer_template

_PER_HEAD_IN = ("pos", "head", "d_model")
_BY_SUFFIX: tuple[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    # hook-name endings -> activation axes after batch, default ``by`` (first match wins; else residual-like)
    (("attn.hook_attn_scores", "attn.hook_pattern"), ("head", "pos", "key_pos"), ("layer", "head")),
    (("attn.hook_result",), _PER_HEAD_IN, ("layer", "head")),
    (("hook_q_input", "hook_k_input", "hook_v_input"), _PER_HEAD_IN, ("layer", "head")),
    (("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_rot_q", "attn.hook_rot_k"), _HEAD,
     ("layer", "head")),
    (("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"), ("pos", "neuron"), ("layer", "neuron")),
    (("hook_scale",), ("pos", "one"), ("layer", "pos")),
)
_KV_ENDINGS = ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k", "hook_k_input", "hook_v_input")
_HOOK_RE = re.compile(r"^blocks\.(\d+|\{l\})\.(.+)$")


def hook_site(name: str) -> SiteKind:
    """A site for any per-layer hook name: ``blocks.{l}.<point>`` (all layers) or ``blocks.<L>.<point>``."""
    m = _HOOK_RE.match(name)
    if not m:
        raise ValueError(f"sites={name!r}: a hook name to patch must be a per-layer point "
                         f"'{layer_template('<point>')}' or 'blocks.<layer>.<point>' (or a site kind: {sorted(SITE_KINDS)})")
    layer = None if m.group(1) == "{l}" else int(m.group(1))
    template = layer_template(m.group(2))
    for kind in SITE_KINDS.values():
        if kind.hook == template:
            return replace(kind, layer=layer)
    dims, by = ("pos", "d_model"), ("layer", "pos")
    for endings, d, b in _BY_SUFFIX:
        if template.endswith(endings):
            dims, by = d, b
            break
    return SiteKind(m.group(2), template, dims, by, layer)


def site_kind(name: str) -> SiteKind:
    """The :class:`SiteKind` called ``name`` (or an alias, or a hook name: :func:`hook_site`);
    ``ValueError`` listing the kinds otherwise."""
    key = ALIASES.get(name, name)
    if key in SITE_KINDS:
        return SITE_KINDS[key]
    if "hook_" in key:
        return hook_site(key)
    raise ValueError(f"unknown site kind {name!r}; expected one of {sorted(SITE_KINDS) + sorted(ALIASES)} "
                     f"or a per-layer hook name such as '{layer_template('ln1.hook_normalized')}'")


def check_by(kind: SiteKind, by) -> tuple[str, ...]:
    """Validate ``by`` for ``kind``: ("layer", *distinct indexable axes of the kind)."""
    by = (by,) if isinstance(by, str) else tuple(by)
    ok = kind.indexable()
    if not by or by[0] != "layer" or len(set(by)) != len(by) or any(a not in ok for a in by[1:]):
        raise ValueError(f"by={by!r} is not valid for site {kind.name!r}: expected ('layer', ...) followed by "
                         f"any of {ok}, e.g. {kind.default_by}")
    return by


def axis_size(kind: SiteKind, axis: str, cfg, T: int) -> int:
    """Length of ``axis`` (pos, head, neuron) for ``kind`` on a model with config ``cfg``, T positions."""
    if axis in ("pos", "key_pos"):
        return T
    if axis == "head":
        return cfg.n_kv_heads if kind.name in ("k", "v") or kind.hook.endswith(_KV_ENDINGS) else cfg.n_heads
    if axis == "neuron":
        return cfg.d_mlp
    raise ValueError(f"no size for axis {axis!r}")


def patch_mask(kind: SiteKind, by: tuple[str, ...], idx: torch.Tensor, act_shape: tuple[int, ...]) -> torch.Tensor:
    """Boolean mask [k, 1, *act_shape] (size-1 where an axis is written whole) for k patches.

    ``idx``: LongTensor [k, len(by) - 1], the non-layer index of each patch (columns in ``by[1:]`` order).
    ``act_shape``: the activation's shape without batch.
    """
    k = idx.shape[0]
    shape = [k, 1] + [act_shape[i] if d in by else 1 for i, d in enumerate(kind.dims)]
    mask = torch.zeros(shape, dtype=torch.bool, device=idx.device)
    index: list = [torch.arange(k, device=idx.device), torch.zeros(k, dtype=torch.long, device=idx.device)]
    for d in kind.dims:
        index.append(idx[:, by.index(d) - 1] if d in by else torch.zeros(k, dtype=torch.long, device=idx.device))
    mask[tuple(index)] = True
    return mask


# Site families served by other modules, by prefix: ``sites="sae:blocks.3.hook_resid_pre"`` is
# handled by the dictionary module (mechkit.sae registers itself on import). Each entry maps a
# prefix to {"patch": fn, "attribute": fn}, called with (model, task, rest_of_name, by=..., **options).
PREFIXED_SITES: dict = {}


def prefixed(sites) -> tuple[str, str] | None:
    """(prefix, rest) when ``sites`` names a registered site family (``"sae:<hook>"``), else None."""
    if isinstance(sites, str) and ":" in sites:
        prefix, rest = sites.split(":", 1)
        if prefix not in PREFIXED_SITES:
            raise ValueError(f"sites={sites!r}: no site family {prefix!r} is registered "
                             f"(known: {sorted(PREFIXED_SITES) or 'none'}; 'sae:' needs `import mechkit.sae`)")
        return prefix, rest
    return None

