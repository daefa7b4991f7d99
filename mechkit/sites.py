"""The one site registry: hook-point names for every activation kind, and the patchable kinds.

Every hook-point name mechkit builds comes from here (no other module writes ``"blocks.{l}..."``):

- :func:`act_name` is TransformerLens's ``utils.get_act_name``: ``act_name("resid_pre", 3)`` ->
  ``"blocks.3.hook_resid_pre"``, ``act_name("z", 5)`` -> ``"blocks.5.attn.hook_z"``,
  ``act_name("k6")`` -> ``"blocks.6.attn.hook_k"``, ``act_name("scale", 2, "ln1")`` ->
  ``"blocks.2.ln1.hook_scale"``, ``act_name("normalized")`` -> ``"ln_final.hook_normalized"``; a
  full name (with a dot, or starting with ``hook_``) and no layer is returned as it is. mechkit's
  own kind names are accepted too: ``neuron``/``neurons``/``mlp_post`` -> ``mlp.hook_post``,
  ``head_out``/``attn_head_out`` -> ``attn.hook_z``.
- :func:`layer_point` joins a layer and a per-layer suffix (``"attn.hook_z"``).
- :data:`SITE_KINDS` are the kinds activation patching and attribution sweep over, with the axes
  of their activation (batch excluded):

  - ``resid_pre/mid/post``, ``attn_out``, ``mlp_out``: ``[batch, pos, d_model]``
  - ``z``, ``q``, ``k``, ``v`` (per head): ``[batch, pos, head, d_head]`` (k/v have n_kv_heads)
  - ``pattern``: ``[batch, head, pos (query), key_pos]``
  - ``neuron`` (MLP post-activation): ``[batch, pos, neuron]``

Whether a model has a given point is the hook map's business: asking a model for a name it does
not have raises :class:`mechkit.HookNameError` with the closest names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# TransformerLens's aliases plus mechkit's own kind names
KIND_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
                "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post", "neuron": "post", "neurons": "post",
                "head_out": "z", "attn_head_out": "z"}
_LAYER_TYPES = {"a": "attn", "attention": "attn", "m": "mlp", "b": "", "block": "", "blocks": ""}
_ATTN = {"q", "k", "v", "z", "pattern", "attn_scores", "result", "rot_q", "rot_k"}
_MLP = {"pre", "post", "mid", "pre_linear", "router_logits", "expert_indices", "expert_weights", "experts_out"}
_FINAL_LN = {"scale", "normalized"}
_SHORT = re.compile(r"([a-z_]+?)(\d+)([a-z]\w*)?")
_LAYER_TOKEN = "{l}"


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """The full hook-point name of activation ``name`` at ``layer`` (TransformerLens's ``get_act_name``).

    ``name``: a kind (``resid_pre``, ``attn_out``, ``z``, ``pattern``, ``post``, ``neuron``, ...), a short
    form with the layer in it (``"k6"``, ``"scale4ln1"``), or a full name (returned as it is when no
    layer is given). ``layer``: a non-negative int. ``layer_type``: the sub-module (``"attn"``/``"a"``,
    ``"mlp"``/``"m"``, ``"ln1"``, ``"ln2"``), implied for attention and MLP kinds.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"act_name: name must be a non-empty string such as 'resid_pre'; got {name!r}")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise ValueError(f"act_name: layer must be a non-negative int; got {layer!r}")
    return _compose(name, layer, layer_type)


def _compose(name: str, layer, layer_type: str | None) -> str:
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    if layer is None and (m := _SHORT.fullmatch(name)):
        name, layer, layer_type = m.group(1), int(m.group(2)), m.group(3) or None
    name = KIND_ALIASES.get(name, name)
    if name in _ATTN:
        layer_type = "attn"
    elif name in _MLP:
        layer_type = "mlp"
    else:
        layer_type = _LAYER_TYPES.get(layer_type, layer_type)
    out = "" if layer is None else f"blocks.{layer}."
    out += f"{layer_type}." if layer_type else ""
    out += f"hook_{name}"
    if name in _FINAL_LN and layer is None:
        out = f"ln_final.{out}"
    return out


def template(name: str, layer_type: str | None = None) -> str:
    """The per-layer template of ``name`` with ``{l}`` for the layer: ``"blocks.{l}.hook_resid_pre"``."""
    return _compose(name, _LAYER_TOKEN, layer_type)


def layer_template(suffix: str) -> str:
    """The per-layer template of a point given by its suffix: ``"blocks.{l}." + suffix``."""
    return f"blocks.{_LAYER_TOKEN}.{suffix}"


def layer_point(layer: int, suffix: str) -> str:
    """``suffix`` (a per-layer point such as ``"hook_mlp_out"`` or ``"attn.hook_z"``) at ``layer``."""
    return f"blocks.{int(layer)}.{suffix}"


@dataclass(frozen=True)
class SiteKind:
    name: str
    hook: str                  # template with {l}
    dims: tuple[str, ...]      # activation axes after batch
    default_by: tuple[str, ...]
    layer: int | None = None   # a site given as one layer's hook name patches only that layer

    def hook_name(self, layer: int) -> str:
        return self.hook.format(l=layer)

    def indexable(self) -> tuple[str, ...]:
        return tuple(d for d in self.dims if d in ("pos", "key_pos", "head", "neuron"))

    @property
    def unit(self) -> str | None:
        """The per-layer unit axis other than position (``head``, ``neuron``), or None."""
        return next((d for d in self.dims if d in ("head", "neuron")), None)


_RESID = ("pos", "d_model")
_HEAD = ("pos", "head", "d_head")
SITE_KINDS: dict[str, SiteKind] = {
    **{k: SiteKind(k, template(k), _RESID, ("layer", "pos"))
       for k in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")},
    **{k: SiteKind(k, template(k), _HEAD, ("layer", "head")) for k in ("z", "q", "k", "v")},
    "pattern": SiteKind("pattern", template("pattern"), ("head", "pos", "key_pos"), ("layer", "head")),
    "neuron": SiteKind("neuron", template("neuron"), ("pos", "neuron"), ("layer", "neuron")),
    # hybrids' non-attention token mixers (Mamba, DeltaNet, ...) and mixture-of-experts routers
    "mixer_out": SiteKind("mixer_out", template("mixer_out"), _RESID, ("layer", "pos")),
    "router_logits": SiteKind("router_logits", template("router_logits"), ("pos", "expert"), ("layer", "pos")),
}
# the kinds attribution patching (AtP, RelP, IG) scores
ATTRIBUTION_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "neuron")
ALIASES = {"head_out": "z", "attn_head_out": "z", "mlp_post": "neuron", "neurons": "neuron"}


def site_kind(name: str, allowed=None, what: str = "site kind") -> SiteKind:
    """The :class:`SiteKind` called ``name`` (or an alias); ``ValueError`` listing the kinds otherwise.

    ``allowed``: the kind names a caller supports (all of :data:`SITE_KINDS` by default); ``what``
    names the argument in the error.
    """
    allowed = tuple(SITE_KINDS) if allowed is None else tuple(allowed)
    key = ALIASES.get(name, name)
    if key not in allowed:
        names = sorted(allowed) + sorted(a for a, k in ALIASES.items() if k in allowed)
        raise ValueError(f"unknown {what} {name!r}; expected one of {names}")
    return SITE_KINDS[key]
