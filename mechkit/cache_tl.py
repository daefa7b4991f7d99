"""Residual-stream helpers of :class:`mechkit.ActivationCache`, with TransformerLens's names and arguments.

Shapes: a *stack* is [component, batch, pos, d_model] (or with pos / batch removed by ``pos_slice`` /
:meth:`remove_batch_dim`). ``layer`` counts like TransformerLens: ``None`` or ``-1`` (or n_layers)
means the input of the unembedding, ``l`` means the input of block ``l`` (``mlp_input=True``: the
input of its MLP).

``pos_slice`` / ``batch_slice`` (TransformerLens's ``Slice``): an int keeps that position (and drops
the axis), a tuple ``(start, stop[, step])`` or a ``slice`` keeps a range, a list or tensor of indices
keeps those positions, None keeps everything.

Norms: :meth:`apply_ln_to_stack` applies a norm *including its weight* with the scale frozen at the
full residual it normalised in the run, so the components still sum to the normed residual minus the
norm's bias. TransformerLens divides by the scale only, because its compatibility mode has folded
the weight into the next matrices; on a copy processed with
:func:`mechkit.processing.process_weights` (weight folded, norm weight 1) the two agree exactly.
"""

from __future__ import annotations

import torch

from .hookpoints import terms_not_linear
from .norms import frozen_norm
from .sites import act_name
from .weights import bias_of, weight_in_out


def tl_key(key, n_layers: int) -> str:
    """A TransformerLens cache key -> a hook name: ``("resid_post", -1)``, ``("pattern", 0)``,
    ``("scale", 2, "ln1")``, ``("normalized", None, "ln_final")``; strings pass through
    (:func:`mechkit.act_name` spells every name)."""
    if isinstance(key, str):
        return key
    if not isinstance(key, tuple) or not key or not isinstance(key[0], str):
        raise KeyError(f"cache key must be a hook name or a tuple (name, layer[, sublayer]); got {key!r}")
    short, layer, sub = key[0], (key[1] if len(key) > 1 else None), (key[2] if len(key) > 2 else None)
    if isinstance(layer, int) and layer < 0:
        layer += n_layers
    if sub == "ln_final":
        sub = None
    return act_name(short, layer, sub)


def slice_dim(x: torch.Tensor, s, dim: int) -> torch.Tensor:
    """TransformerLens's ``Slice(s).apply(x, dim)`` (see the module docstring)."""
    if s is None:
        return x
    if hasattr(s, "slice") and hasattr(s, "mode"):  # a TransformerLens Slice object
        s = s.slice if s.mode != "array" else list(s.slice)
    if isinstance(s, tuple):
        s = slice(*s)
    if isinstance(s, (list, torch.Tensor)) or type(s).__name__ == "ndarray":
        s = torch.as_tensor(s, device=x.device)
    idx = [slice(None)] * x.dim()
    idx[dim] = s
    return x[tuple(idx)]


class ResidualHelpers:
    """Mixin for :class:`mechkit.ActivationCache` (needs ``self.model`` and ``self[name]``)."""

    has_batch_dim = True

    # layers --------------------------------------------------------------------
    def _n_layers(self) -> int:
        return self.model.cfg.n_layers

    def _layer(self, layer: int | None) -> int:
        n = self._n_layers()
        if layer is None or layer == -1:
            return n
        if not isinstance(layer, int) or not 0 <= layer <= n:
            raise ValueError(f"layer must be in 0..{n} (n_layers means the unembedding input), -1 or None; got {layer!r}")
        return layer

    def _norm_for(self, layer: int, mlp_input: bool):
        """(norm module, name of the residual it normalised) for the input of ``layer``."""
        n = self._n_layers()
        if layer == n:
            if mlp_input:
                raise ValueError("mlp_input=True needs a layer below n_layers (the unembedding has no MLP)")
            return self.model.family_module("final_norm"), act_name("resid_post", n - 1)
        key = "mlp_in_norm" if mlp_input else "attn_in_norm"
        if key not in self.model.hook_map.family:
            raise ValueError(f"family '{self.model.hook_map.name}' names no '{key}' norm in its hook map")
        norm = self.model.module(self.model.hook_map.path(self.model.hook_map.family[key], layer))
        parallel = self.model.cfg.parallel_attn_mlp  # the MLP reads the layer's input, like the attention
        total = act_name("resid_mid", layer) if mlp_input and not parallel else act_name("resid_pre", layer)
        return norm, total

    # norms ---------------------------------------------------------------------
    def _frozen_norm(self, norm: torch.nn.Module, total: torch.Tensor, stack: torch.Tensor, center: bool | None = None):
        """:func:`mechkit.norms.frozen_norm` with this model's family."""
        return frozen_norm(norm, self.model.hook_map.family, total, stack, center)

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice=None, batch_slice=None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> torch.Tensor:
        """Apply the norm at the input of ``layer`` (default: the final norm) to each component of
        ``residual_stack`` [c, batch, pos, d_model] (``pos_slice`` already applied to the stack;
        it is applied here to the frozen scale), the scale frozen at the run's full residual.

        ``(sum of components) -> norm`` equals the norm of the summed residual, minus its bias.
        ``recompute_ln=True`` (final norm only) instead runs the norm module on each component on its
        own, bias included (the logit lens).
        """
        layer = self._layer(layer)
        norm, total_name = self._norm_for(layer, mlp_input)
        fam, final = self.model.hook_map.family, layer == self._n_layers()
        scale = float(fam.get("final_scale", 1.0)) if final else 1.0  # lm_head(norm(x) * c)
        if final and fam.get("final_opaque"):
            raise ValueError(f"residual components cannot be put through this model's final norm: {fam['final_opaque']}")
        if recompute_ln and final:
            if fam.get("norm_kind") == "none":
                return residual_stack
            if not fam.get("final_norm"):  # a weightless norm applied as a function: each component on its own
                return self._frozen_norm(norm, residual_stack, residual_stack) * scale
            return norm(residual_stack) * scale
        if has_batch_dim and self.has_batch_dim and batch_slice is not None:
            residual_stack = slice_dim(residual_stack, batch_slice, 1)
        total = slice_dim(self[total_name], pos_slice, -2)
        if self.has_batch_dim:
            total = slice_dim(total, batch_slice, 0)
        # TransformerLens's "... batch d_model": any leading dims (none for one component), then the residual's
        if residual_stack.dim() < total.dim() or tuple(residual_stack.shape[-total.dim():]) != tuple(total.shape):
            raise ValueError(f"residual_stack has shape {tuple(residual_stack.shape)}; expected [..., "
                             f"{', '.join(map(str, total.shape))}] like the cached residual {total_name} (pass "
                             f"pos_slice= / batch_slice= for a stack sliced to some positions or prompts)")
        return self._frozen_norm(norm, total, residual_stack) * scale

    def logit_lens(self, stack: torch.Tensor) -> torch.Tensor:
        """Components [c, batch, pos, d_model] (already normed) -> their logits [c, batch, pos, d_vocab]."""
        unembed = self.model.family_module("unembed")
        return stack @ weight_in_out(unembed).to(stack.dtype)

    # stacks --------------------------------------------------------------------
    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream at the input of each block up to and including ``layer`` (default: all
        of them plus the final ``resid_post``): [component, batch, pos, d_model], labels ``0_pre``,
        ``0_mid`` (``incl_mid``), ..., ``final_post``.

        ``apply_ln``: to the final layer, the final norm run on each component on its own (the logit
        lens: each component gets its own scale, the norm's bias included); to an earlier layer, that
        layer's norm with the run's frozen scale (as TransformerLens).
        """
        layer = self._layer(layer)
        n = self._n_layers()
        comps, labels = [], []
        for l in range(layer + 1):
            if l == n:
                comps.append(self[act_name("resid_post", n - 1)])
                labels.append("final_post")
                continue
            comps.append(self[act_name("resid_pre", l)])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                comps.append(self[act_name("resid_mid", l)])
                labels.append(f"{l}_mid")
        stack = torch.stack([slice_dim(c, pos_slice, -2) for c in comps])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           recompute_ln=layer == n)
        return (stack, labels) if return_labels else stack

    def _embed_rows(self) -> tuple[list[torch.Tensor], list[str]]:
        """``embed`` and ``pos_embed`` rows where the model adds a learned position embedding and both
        are cached; else one ``embed`` row: the residual entering block 0 (e.g. Gemma's scaled embedding)."""
        if "pos_embed" in self.model.hook_map.family and "hook_embed" in self and "hook_pos_embed" in self:
            return [self["hook_embed"], self["hook_pos_embed"].expand_as(self["hook_embed"])], ["embed", "pos_embed"]
        if act_name("resid_pre", 0) in self or "hook_embed" not in self:
            return [self[act_name("resid_pre", 0)]], ["embed"]
        return [self["hook_embed"]], ["embed"]

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True, return_labels: bool = False):
        """The residual stream at the input of ``layer`` (default: the unembedding) as a sum of its parts.

        Components: ``embed`` and, for learned positions, ``pos_embed``; then ``{l}_attn_out`` (and/or
        ``{l}_mixer_out`` on hybrid layers) and ``{l}_mlp_out`` for each layer below (``mode`` "attn" /
        "mlp" keeps the token-mixing or the MLP terms; ``mlp_input`` adds the layer's own attention /
        mixer in a sequential block; a parallel block's MLP reads the layer's input). Returns [component, batch, pos, d_model]; with ``incl_embeds`` and
        mode "all" the components sum to the residual.
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"decompose_resid: mode must be 'all', 'attn' or 'mlp'; got {mode!r}")
        layer = self._layer(layer)
        comps, labels = self._embed_rows() if incl_embeds else ([], [])
        for l in range(layer + self._mlp_reads_own_attention(mlp_input)):
            for kind in self._token_mixers(l) if mode != "mlp" else ():
                comps.append(self[act_name(kind, l)])
                labels.append(f"{l}_{kind}")
            if mode != "attn" and l < layer and act_name("mlp_out", l) in self.model.points.points:
                comps.append(self[act_name("mlp_out", l)])
                labels.append(f"{l}_mlp_out")
        stack = torch.stack([slice_dim(c, pos_slice, -2) for c in comps])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _head_results(self, l: int, pos_slice=None) -> torch.Tensor:
        """Heads' outputs of layer ``l`` in d_model: [head, batch, pos, d_model] (bias not included)."""
        m, fam = self.model, self.model.hook_map.family
        if fam.get("residual") == "increments" or fam.get("heads_not_linear"):
            raise ValueError(f"per-head results: {terms_not_linear(fam)}; use decompose_resid")
        name = act_name("result", l)
        if name in self:  # cached with use_attn_result: [batch, pos, head, d_model]
            return slice_dim(self[name], pos_slice, -3).movedim(-2, 0)
        z = slice_dim(self[act_name("z", l)], pos_slice, -3)  # [b, p, H, dh] (this layer's own head count)
        o_proj = m.family_module("attn_out_proj", l)
        w = weight_in_out(o_proj).unflatten(0, tuple(z.shape[-2:])).to(z.dtype)  # [H, dh, d_model]
        res = torch.einsum("...hd,hdm->h...m", z, w) * self._scale("attn_out", l)
        if "attn_post_norm" in fam:
            b = bias_of(o_proj)
            total = res.sum(0) + (b if b is not None else 0)
            res = self._frozen_norm(m.family_module("attn_post_norm", l), total, res)  # centred if a LayerNorm
        return res

    def stack_head_results(self, layer: int | None = None, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False):
        """Each head's contribution to the residual stream, from ``attn.hook_z`` and W_O.

        Returns [layer * n_heads, batch, pos, d_model] for the layers below ``layer`` (default all),
        labels ``L{l}H{h}``; ``incl_remainder`` adds the rest of the residual as a last row.
        Per layer, the heads plus the output projection's bias sum to the attention output. Where the
        map names an ``attn_post_norm`` (Gemma's sandwich norm), that norm is applied with its scale
        frozen at the full output, so the heads sum to ``hook_attn_out`` exactly as well.
        """
        layer = self._layer(layer)
        parts = [self._head_results(l, pos_slice) for l in range(layer)]
        labels = [f"L{l}H{h}" for l, part in enumerate(parts) for h in range(part.shape[0])]
        if parts:
            stack = torch.cat(parts)
        else:
            like = slice_dim(self[act_name("resid_pre", 0)], pos_slice, -2)
            stack = like.new_zeros((0, *like.shape))
        if incl_remainder:
            total = slice_dim(self[act_name("resid_post", layer - 1)] if layer else self[act_name("resid_pre", 0)],
                              pos_slice, -2)
            stack = torch.cat([stack, (total - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def head_result_bias(self, layer: int) -> torch.Tensor | None:
        """The output projection's bias of ``layer`` ([d_model]), the part of attn_out no head owns."""
        return bias_of(self.model.family_module("attn_out_proj", layer))

    def get_neuron_results(self, layer: int, neuron_slice=None, pos_slice=None) -> torch.Tensor:
        """Each neuron's output in d_model for ``layer``: [batch, pos, d_mlp, d_model] (no bias)."""
        acts = slice_dim(slice_dim(self[act_name("post", layer)], pos_slice, -2), neuron_slice, -1)
        w_out = slice_dim(weight_in_out(self.model.family_module("mlp_down_proj", layer)), neuron_slice, 0)
        return acts[..., None] * (w_out * self._scale("mlp_out", layer)).to(acts.dtype)

    def stack_neuron_results(self, layer: int | None = None, pos_slice=None, neuron_slice=None,
                             return_labels: bool = False, incl_remainder: bool = False, apply_ln: bool = False):
        """Each neuron's contribution below ``layer``: [layer * d_mlp, batch, pos, d_model], labels
        ``L{l}N{n}``. Memory grows as d_mlp * d_model per position: slice first on real models.
        Families whose MLP output goes through a post-norm (Gemma) are refused (no linear split)."""
        why = terms_not_linear(self.model.hook_map.family)
        if why:
            raise ValueError(f"stack_neuron_results: {why}, so neurons do not add up linearly; use decompose_resid")
        layer = self._layer(layer)
        parts, labels = [], []
        for l in range(layer):
            r = self.get_neuron_results(l, neuron_slice, pos_slice)  # [..., n, d_model]
            parts.append(r.movedim(-2, 0))
            idx = torch.arange(self.model.cfg.d_mlp)
            labels += [f"L{l}N{int(i)}" for i in slice_dim(idx, neuron_slice, 0).reshape(-1)]
        if parts:
            stack = torch.cat(parts)
        else:
            like = slice_dim(self[act_name("resid_pre", 0)], pos_slice, -2)
            stack = like.new_zeros((0, *like.shape))
        if incl_remainder:
            total = slice_dim(self[act_name("resid_post", layer - 1)] if layer else self[act_name("resid_pre", 0)],
                              pos_slice, -2)
            stack = torch.cat([stack, (total - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _token_mixers(self, l: int) -> list[str]:
        """The token-mixing terms layer ``l`` adds: "attn_out", "mixer_out" or both (Falcon-H1)."""
        points = self.model.points.points
        return [k for k in ("attn_out", "mixer_out") if act_name(k, l) in points]

    def _scale(self, kind: str, l: int) -> float:
        """The factor the map's ``kind`` point of layer ``l`` applies to its module's output (a residual
        multiplier, Granite / MiniCPM), 1 where none."""
        spec = self.model.points.points.get(act_name(kind, l))
        return 1.0 if spec is None or spec.scale is None else float(spec.scale)

    def _mlp_reads_own_attention(self, mlp_input: bool) -> int:
        """1 where the residual asked for (``mlp_input``: the MLP's) holds the layer's own attention output
        (a sequential block), else 0 (the block's input; a parallel block's MLP reads that too)."""
        return int(mlp_input and not self.model.cfg.parallel_attn_mlp)

    def _accumulated_bias(self, layer: int, mlp_input: bool, include_mlp_biases: bool) -> torch.Tensor:
        d = self.model.cfg.d_model
        p = next(self.model.hf_model.parameters())
        acc = torch.zeros(d, dtype=p.dtype, device=p.device)
        for l in range(layer + self._mlp_reads_own_attention(mlp_input)):
            b = bias_of(self.model.family_module("attn_out_proj", l))
            if b is not None:
                acc = acc + b.to(acc.device) * self._scale("attn_out", l)
            if include_mlp_biases and l < layer:
                b = bias_of(self.model.family_module("mlp_down_proj", l))
                if b is not None:
                    acc = acc + b.to(acc.device) * self._scale("mlp_out", l)
        return acc

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False, pos_slice=None,
                                     return_labels: bool = False):
        """The residual at the input of ``layer`` as every head, every neuron (or each MLP with
        ``expand_neurons=False``), the embeddings and the summed biases (``bias``), in TransformerLens's
        order: heads, neurons / MLPs, ``embed`` (``pos_embed``), ``bias``. The rows sum to the residual.
        Returns [component, batch, pos, d_model]."""
        why = terms_not_linear(self.model.hook_map.family)
        if why:
            raise ValueError(f"get_full_resid_decomposition: {why}, so heads, neurons and biases do not add up "
                             "linearly; use decompose_resid")
        mixers = [n for n in self.model.points.points if n.endswith(".hook_mixer_out")]
        if mixers:
            raise ValueError(f"get_full_resid_decomposition: this model's layers add token-mixer outputs ({mixers[0]}, "
                             f"Mamba / linear attention / convolution), which are not heads; use decompose_resid")
        layer = self._layer(layer)
        heads, labels = self.stack_head_results(layer + self._mlp_reads_own_attention(mlp_input), pos_slice=pos_slice,
                                                return_labels=True)
        comps = [heads]
        if layer > 0:
            if expand_neurons:
                neurons, nl = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True)
            else:
                neurons, nl = self.decompose_resid(layer, mode="mlp", pos_slice=pos_slice, incl_embeds=False,
                                                   return_labels=True)
            comps.append(neurons)
            labels = labels + nl
        emb, el = self._embed_rows()
        comps += [slice_dim(e, pos_slice, -2)[None] for e in emb]
        labels = labels + el
        bias = self._accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        comps.append(bias.to(heads.dtype).expand((1, *heads.shape[1:])))
        labels.append("bias")
        stack = torch.cat(comps)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None, pos_slice=None,
                    batch_slice=None, has_batch_dim: bool = True) -> torch.Tensor:
        """Direct logit attribution: each component's contribution to the logit of ``tokens`` (or to
        the logit difference ``tokens - incorrect_tokens``), through the final norm with its scale
        frozen at the run's final residual.

        ``residual_stack`` [c, batch, (pos,) d_model] (pos already sliced by ``pos_slice``); tokens:
        a str / int (one token), ids [batch] or [batch, pos]. Returns [c, batch, (pos)]. Summed over
        components that make up the whole residual (e.g. :meth:`decompose_resid`), the result equals
        the model's logit (difference) minus the norm's bias through W_U and the unembedding bias.
        """
        dirs = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            wrong = self.model.tokens_to_residual_directions(incorrect_tokens)
            if wrong.shape != dirs.shape:
                raise ValueError(f"logit_attrs: tokens and incorrect_tokens must have the same shape; got "
                                 f"{tuple(dirs.shape[:-1])} and {tuple(wrong.shape[:-1])}")
            dirs = dirs - wrong
        if batch_slice is not None and has_batch_dim and dirs.dim() > 1:
            dirs = slice_dim(dirs, batch_slice, 0)
        scaled = self.apply_ln_to_stack(residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        return (scaled * dirs.to(scaled.dtype)).sum(-1)

    def stack_activation(self, activation_name: str, layer: int | None = None, sublayer_type: str | None = None):
        """``cache[(activation_name, l, sublayer_type)]`` stacked over layers below ``layer``: [layer, ...]."""
        layer = self._layer(layer)
        return torch.stack([self[(activation_name, l, sublayer_type)] for l in range(layer)])

    # batch ---------------------------------------------------------------------
    def remove_batch_dim(self):
        """Drop the batch axis of a one-prompt cache (in place, like TransformerLens); returns the cache."""
        if not self.has_batch_dim:
            return self
        sizes = {k: v.shape[0] for k, v in self._store.items() if v.dim() > 0}
        bad = {k: s for k, s in sizes.items() if s != 1}
        if bad:
            k, s = next(iter(bad.items()))
            raise ValueError(f"remove_batch_dim needs a batch of one prompt; '{k}' has batch size {s}")
        self._store = {k: (v[0] if v.dim() > 0 else v) for k, v in self._store.items()}
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice):
        """A new cache with ``batch_slice`` applied to every tensor's batch axis."""
        out = type(self)({k: slice_dim(v, batch_slice, 0) for k, v in self._store.items()}, self.model, self.batch)
        if isinstance(batch_slice, int):
            out.has_batch_dim = False
        return out


