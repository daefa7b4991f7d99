"""TransformerLens's weight processing, as an explicit option that returns a processed copy.

mechkit never changes the weights of the model it wraps: by default every number is the HF
model's own. TransformerLens's ``HookedTransformer`` (and ``TransformerBridge`` in compatibility
mode) instead folds and centres weights at load time, which changes some numbers users compare.
:func:`process_weights` makes the same changes on a *copy*, so both conventions are available:

- ``fold_ln``: each norm's weight (and LayerNorm bias) is folded into the projections that read
  it (q/k/v, the MLP input/gate, the unembedding); the norm keeps only its normalisation. For
  LayerNorm models those projections are also made zero-mean over their input (their input has
  zero mean, so nothing changes), as TransformerLens does. Logits are
  unchanged (to float rounding); ``ln*.hook_normalized`` becomes the pre-weight normalised residual.
- ``center_writing_weights`` (LayerNorm models only, as TransformerLens): every matrix writing to the
  residual (W_E, W_pos, W_O, W_out and their biases) is made zero-mean over d_model. Logits are
  unchanged; residual activations lose their mean component.
- ``center_unembed``: W_U (and b_U) made zero-mean over the vocabulary. Logits shift by a constant per
  position: log-probabilities, logit differences and predictions are unchanged, single-token
  logits are not. Refused for models with final logit soft-capping (the shift would not be constant).
- ``fold_value_biases``: each head's value bias (with ``fold_ln``, including ``ln1.bias @ W_V``) moves
  into the output bias: ``b_O += sum_h b_V[h] @ W_O[h]``, ``b_V = 0``. Logits are unchanged
  (attention rows sum to one); each head's ``hook_z`` and result lose the bias's part, so per-head
  direct logit attribution changes (TransformerLens's compatibility-mode numbers need it).

Which numbers change, in short: per-head results / head DLA (``fold_value_biases``), single-token
logits and logit attributions (``center_unembed``), residual activations and norms
(``center_writing_weights``), normalised activations (``fold_ln``). Logit differences, patching
maps, patterns and ablation effects are the same on the copy as on the original, to float rounding.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .split_qkv import Sizes, columns
from .weights import bias_of, weight_in_out

if TYPE_CHECKING:
    from .model import HookedModel


@dataclass(frozen=True)
class ProcessingOptions:
    """What :func:`process_weights` does (TransformerLens's defaults: all on)."""

    fold_ln: bool = True
    center_writing_weights: bool = True
    center_unembed: bool = True
    fold_value_biases: bool = True


def _ensure_bias(mod: nn.Module, n_out: int) -> torch.Tensor:
    b = bias_of(mod)
    if b is None:
        w = mod.weight
        mod.bias = nn.Parameter(torch.zeros(n_out, dtype=w.dtype, device=w.device))
        b = mod.bias
    return b


def _fold_norm_into(norm: nn.Module, readers: list[nn.Module], offset: float, center: bool) -> None:
    """Fold ``norm``'s weight (+ offset) and bias into each reader's input side; leave the norm plain.
    ``center`` (LayerNorm: its output has zero mean): also make each reader's weight zero-mean over its
    input dim, which changes no output (TransformerLens does the same)."""
    w = getattr(norm, "weight", None)
    nb = bias_of(norm)
    for mod in readers:
        W = weight_in_out(mod)  # [in, out] view of the parameter
        acc = torch.promote_types(W.dtype, torch.float32)  # fp16/bf16 weights: fold in float32
        if nb is not None and torch.count_nonzero(nb):
            b = _ensure_bias(mod, W.shape[1])
            b.add_((nb.to(acc) @ W.to(acc)).to(b.dtype))
        if w is not None:
            W.copy_((W.to(acc) * (w.to(acc) + offset)[:, None]).to(W.dtype))
        if center:
            W.sub_(W.mean(0, keepdim=True))
    if w is not None:
        w.fill_(1.0 - offset)
    if nb is not None:
        nb.zero_()


def _center_output(mod: nn.Module) -> None:
    """Make the module's output (d_model side) zero-mean: weight columns and bias."""
    W = weight_in_out(mod)  # [in, d_model]
    W.sub_(W.mean(-1, keepdim=True))
    b = bias_of(mod)
    if b is not None:
        b.sub_(b.mean())


def _untie_unembed(hf: nn.Module, unembed: nn.Module, embed: nn.Module) -> None:
    if unembed.weight is embed.weight or unembed.weight.data_ptr() == embed.weight.data_ptr():
        unembed.weight = nn.Parameter(unembed.weight.detach().clone())
    if hasattr(hf.config, "tie_word_embeddings"):
        hf.config.tie_word_embeddings = False


def process_weights(model: HookedModel, options: ProcessingOptions | None = None, **flags):
    """A copy of ``model`` (a :class:`mechkit.HookedModel`) with TransformerLens's weight processing.

    ``options`` or keyword flags (``fold_ln``, ``center_writing_weights``, ``center_unembed``,
    ``fold_value_biases``; all True by default, as TransformerLens). The original is untouched.
    The copy's ``processing`` attribute records what was done. See the module docstring for which
    numbers each step changes.
    """
    from .model import HookedModel

    options = _options(options, flags)
    structural = [k for k in ("fold_ln", "center_writing_weights", "fold_value_biases") if getattr(options, k)]
    if structural and not model.hook_map.shipped:
        raise ValueError(f"process_weights: {', '.join(structural)} are verified on the hand-written maps (hooks/*.toml) "
                         f"only; this model's map ({model.hook_map.source}) is auto-detected or your own, and "
                         f"folding needs every reader of each norm named (a norm shared by attention and MLP, an "
                         f"MLP whose input projections the map does not name, a post-norm...); pass fold_ln=False, "
                         f"center_writing_weights=False, fold_value_biases=False (center_unembed alone is exact)")
    hf = copy.deepcopy(model.hf_model)
    out = HookedModel(hf, model.tokenizer, model.hook_map)
    out.name = f"{model.name} (processed)"
    fam, c = out.hook_map.family, out.cfg
    offset = float(fam.get("norm_weight_offset", 0.0))
    is_ln = c.normalization_type == "LN"
    if options.center_unembed and getattr(hf.config, "final_logit_softcapping", None):
        raise ValueError("process_weights: center_unembed=True on a model with final logit soft-capping would change "
                         "its predictions (the shift is not constant after the cap); pass center_unembed=False")
    unembed, embed = out.family_module("unembed"), out.family_module("embed")
    with torch.no_grad():
        _untie_unembed(hf, unembed, embed)
        for l in range(c.n_layers):
            if options.fold_ln:
                _fold_layer_norms(out, l, offset, is_ln)
            if options.fold_value_biases:
                _fold_value_bias(out, l)
        if options.fold_ln:
            _fold_norm_into(out.family_module("final_norm"), [unembed], offset, is_ln)
        if options.center_writing_weights and c.normalization_type == "LN":
            _center_writing_weights(out, embed)
        if options.center_unembed:
            _center_unembed(unembed)
    out.processing = asdict(options)
    return out


def _options(options: ProcessingOptions | None, flags: dict) -> ProcessingOptions:
    """``options``, or one built from :func:`process_weights`'s keyword flags (checked; not both)."""
    if options is None:
        unknown = set(flags) - set(ProcessingOptions.__dataclass_fields__)
        if unknown:
            raise TypeError(f"process_weights: unknown option(s) {sorted(unknown)}; expected "
                            f"{sorted(ProcessingOptions.__dataclass_fields__)}")
        return ProcessingOptions(**flags)
    if flags:
        raise TypeError("process_weights: pass options= or keyword flags, not both")
    return options


def _fam_mod(model: HookedModel, key: str, layer: int | None = None) -> nn.Module:
    """The module of the map's ``[family]`` entry ``key``; a clear error when the map has none."""
    fam = model.hook_map.family
    if key not in fam:
        raise ValueError(f"process_weights: the hook map of family '{model.hook_map.name}' has no '{key}' in "
                         "[family], which this step needs")
    return model.module(model.hook_map.path(fam[key], layer))


def _fold_layer_norms(model: HookedModel, layer: int, offset: float, is_ln: bool) -> None:
    """fold_ln for one layer: the attention-input norm into q/k/v (a fused projection once), the
    MLP-input norm into the MLP's input projections."""
    fam = model.hook_map.family
    qkv = list({id(m): m for m in (_fam_mod(model, f"{p}_proj", layer) for p in "qkv")}.values())
    _fold_norm_into(_fam_mod(model, "attn_in_norm", layer), qkv, offset, is_ln)
    mlp = [_fam_mod(model, k, layer) for k in ("mlp_in_proj", "mlp_gate_proj", "mlp_gate_up_proj") if k in fam]
    _fold_norm_into(_fam_mod(model, "mlp_in_norm", layer), mlp, offset, is_ln)


def _fold_value_bias(model: HookedModel, layer: int) -> None:
    """fold_value_biases for one layer: ``b_O += sum_h b_V[h] @ W_O[h]``, then ``b_V = 0``."""
    c = model.cfg
    b_v = model.b_V[layer]  # [Hkv, dh] (after fold_ln, includes ln1.bias @ W_V)
    if not torch.count_nonzero(b_v):
        return
    from .weight_views import ungroup

    w_o = model.W_O[layer]  # [H, dh, d_model]
    extra = torch.einsum("hd,hdm->m", ungroup(b_v, c.n_heads, dim=0), w_o)
    o_proj = model.family_module("attn_out_proj", layer)
    _ensure_bias(o_proj, c.d_model).add_(extra.to(o_proj.weight.dtype))
    _zero_v_bias(model, layer)


def _center_writing_weights(model: HookedModel, embed: nn.Module) -> None:
    """Make every matrix writing to the residual (W_E, W_pos, W_O, W_out, biases) zero-mean over d_model."""
    embed.weight.sub_(embed.weight.mean(-1, keepdim=True))
    if "pos_embed" in model.hook_map.family:
        pe = _fam_mod(model, "pos_embed").weight
        pe.sub_(pe.mean(-1, keepdim=True))
    for l in range(model.cfg.n_layers):
        _center_output(model.family_module("attn_out_proj", l))
        _center_output(model.family_module("mlp_down_proj", l))


def _center_unembed(unembed: nn.Module) -> None:
    """Make W_U [d_model, vocab] (and b_U) zero-mean over the vocabulary."""
    W = weight_in_out(unembed)  # [d_model, vocab]
    W.sub_(W.mean(-1, keepdim=True))
    b = bias_of(unembed)
    if b is not None:
        b.sub_(b.mean())


def _zero_v_bias(model, layer: int) -> None:
    """Zero the value-bias entries of ``layer``'s v projection (its own module or the fused one's v part)."""
    fam, c = model.hook_map.family, model.cfg
    mod = model.module(model.hook_map.path(fam["v_proj"], layer))
    b = bias_of(mod)
    if b is None:
        return
    b[columns(fam.get("qkv_layout", "separate"), "v", Sizes(c.n_heads, c.n_kv_heads, c.d_head)).flatten().to(b.device)] = 0
