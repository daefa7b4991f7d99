"""TransformerLens-named weight views of a hooked HF model: ``W_E``, ``W_U``, ``W_Q`` ... ``W_out``.

Where each weight lives is data in the family's hook map (``[family]`` keys ``q_proj``/``k_proj``/
``v_proj`` with ``qkv_layout``, ``mlp_in_proj``, ``mlp_gate_proj`` or a fused ``mlp_gate_up_proj``,
``pos_embed``). This module never branches on the
architecture.

Shapes (TransformerLens's, stacked over layers):

- ``W_E`` [d_vocab, d_model], ``W_pos`` [n_ctx, d_model], ``W_U`` [d_model, d_vocab], ``b_U`` [d_vocab]
- ``W_Q`` [n_layers, n_heads, d_model, d_head], ``b_Q`` [n_layers, n_heads, d_head]
- ``W_K``/``W_V`` [n_layers, n_kv_heads, d_model, d_head], ``b_K``/``b_V`` [n_layers, n_kv_heads, d_head]:
  grouped-query models keep their KV heads (the layout of TransformerLens's ``TransformerBridge``;
  query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``). :func:`ungroup` repeats them to
  n_heads (the layout of TransformerLens's ``HookedTransformer``); ``QK`` and ``OV`` use it.
- ``W_O`` [n_layers, n_heads, d_head, d_model], ``b_O`` [n_layers, d_model]
- ``W_in``/``W_gate`` [n_layers, d_model, d_mlp], ``b_in`` [n_layers, d_mlp], ``W_out`` [n_layers, d_mlp, d_model],
  ``b_out`` [n_layers, d_model]. ``W_gate`` is None for a non-gated MLP.

A bias the model does not have reads as zeros (as in ``HookedTransformer``). The stacked tensors
are copies: writing into them does not change the model (edit the HF modules, or use
:func:`mechkit.processing.process_weights`). ``hook_embed`` of a model that scales its embeddings
(Gemma) is ``W_E[tokens]`` times that scale.
"""

from __future__ import annotations

import torch
from torch import nn

from .factored import FactoredMatrix, composition_scores
from .split_qkv import Sizes, columns
from .weights import bias_of, weight_in_out


def ungroup(w: torch.Tensor, n_heads: int, dim: int = -3) -> torch.Tensor:
    """Repeat grouped KV heads to ``n_heads`` along ``dim`` (e.g. ``W_K`` [L, Hkv, d, dh] -> [L, H, d, dh])."""
    reps = n_heads // w.shape[dim]
    return w if reps == 1 else w.repeat_interleave(reps, dim=dim)


class WeightViews:
    """Mixin for :class:`mechkit.HookedModel`: the weight views listed in the module docstring."""

    # helpers ------------------------------------------------------------------
    def _fam_module(self, key: str, layer: int | None = None) -> nn.Module:
        fam = self.hook_map.family
        if key not in fam:
            raise ValueError(f"the hook map of family '{self.hook_map.name}' has no '{key}' entry in [family], "
                                 f"so this weight view is not available for it")
        return self.module(self.hook_map.path(fam[key], layer))

    def _has(self, key: str) -> bool:
        return key in self.hook_map.family

    def _qkv(self, layer: int, which: str, bias: bool = False) -> torch.Tensor | None:
        """q, k or v projection of ``layer`` as [heads, d_model, d_head] (bias: [heads, d_head]).

        The map's ``qkv_layout``: ``separate`` (own modules), ``blocks`` (q | k | v consecutive in one
        output) or ``per_head`` ([q, k, v] per head or KV group), as :func:`mechkit.split_qkv.columns` reads them."""
        c = self.cfg
        mod = self._fam_module(f"{which}_proj", layer)
        full = bias_of(mod) if bias else weight_in_out(mod)  # [(d_model,) out]
        if full is None:
            return None
        layout = self.hook_map.family.get("qkv_layout", "separate")
        part = full[..., columns(layout, which, Sizes(c.n_heads, c.n_kv_heads, c.d_head)).to(full.device)]  # [(d_model,) n, d_head]
        return part if bias else part.permute(1, 0, 2)

    def _mlp(self, layer: int, which: str, bias: bool = False) -> torch.Tensor | None:
        """W_in / W_gate of ``layer`` as [d_model, d_mlp] (bias: [d_mlp])."""
        if self._has(f"mlp_{which}_proj"):
            mod = self._fam_module(f"mlp_{which}_proj", layer)
            return bias_of(mod) if bias else weight_in_out(mod)
        if self._has("mlp_gate_up_proj"):
            mod = self._fam_module("mlp_gate_up_proj", layer)
            full = bias_of(mod) if bias else weight_in_out(mod)
            if full is None:
                return None
            gate, up = full.chunk(2, dim=-1)
            return gate if which == "gate" else up
        if which == "gate":
            return None
        raise ValueError(f"the hook map of family '{self.hook_map.name}' names no MLP input projection")

    def _stack(self, fn, shape_if_absent: tuple[int, ...] | None = None) -> torch.Tensor | None:
        parts = [fn(l) for l in range(self.cfg.n_layers)]
        if all(p is None for p in parts):
            if shape_if_absent is None:
                return None
            p = next(self.hf_model.parameters())
            return torch.zeros((self.cfg.n_layers, *shape_if_absent), dtype=p.dtype, device=p.device)
        like = next(p for p in parts if p is not None)  # a layer without the bias others have: zeros
        return torch.stack([torch.zeros_like(like) if p is None else p.to(like.device) for p in parts])

    # embeddings ------------------------------------------------------------------
    @property
    def W_E(self) -> torch.Tensor:
        """Token embeddings [d_vocab, d_model]."""
        return self.family_module("embed").weight

    @property
    def W_pos(self) -> torch.Tensor:
        """Learned position embeddings [n_ctx, d_model]; an error for rotary / no positional embedding."""
        if not self._has("pos_embed"):
            raise ValueError(f"W_pos: family '{self.hook_map.name}' has no learned position embedding "
                                 "(positions enter through rotary q/k or not at all)")
        return self._fam_module("pos_embed").weight

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding [d_model, d_vocab]."""
        return weight_in_out(self.family_module("unembed"))

    @property
    def b_U(self) -> torch.Tensor:
        """Unembedding bias [d_vocab] (zeros when lm_head has none)."""
        b = bias_of(self.family_module("unembed"))
        return b if b is not None else torch.zeros(self.cfg.d_vocab, dtype=self.W_U.dtype, device=self.W_U.device)

    # attention ---------------------------------------------------------------------
    @property
    def W_Q(self) -> torch.Tensor:
        return self._stack(lambda l: self._qkv(l, "q"))

    @property
    def W_K(self) -> torch.Tensor:
        return self._stack(lambda l: self._qkv(l, "k"))

    @property
    def W_V(self) -> torch.Tensor:
        return self._stack(lambda l: self._qkv(l, "v"))

    @property
    def b_Q(self) -> torch.Tensor:
        return self._stack(lambda l: self._qkv(l, "q", bias=True), (self.cfg.n_heads, self.cfg.d_head))

    @property
    def b_K(self) -> torch.Tensor:
        return self._stack(lambda l: self._qkv(l, "k", bias=True), (self.cfg.n_kv_heads, self.cfg.d_head))

    @property
    def b_V(self) -> torch.Tensor:
        return self._stack(lambda l: self._qkv(l, "v", bias=True), (self.cfg.n_kv_heads, self.cfg.d_head))

    @property
    def W_O(self) -> torch.Tensor:
        c = self.cfg

        def per_layer(l: int) -> torch.Tensor:
            w = weight_in_out(self.family_module("attn_out_proj", l))
            if w.shape != (c.n_heads * c.d_head, c.d_model):
                raise ValueError(f"W_O: layer {l}'s output projection maps {w.shape[0]} inputs to {w.shape[1]}, not "
                                 f"n_heads x d_head = {c.n_heads} x {c.d_head} to d_model {c.d_model} (head counts or "
                                 f"sizes differ per layer): read the projection module itself")
            return w.reshape(c.n_heads, c.d_head, c.d_model)
        return self._stack(per_layer)

    @property
    def b_O(self) -> torch.Tensor:
        return self._stack(lambda l: bias_of(self.family_module("attn_out_proj", l)), (self.cfg.d_model,))

    # MLP ---------------------------------------------------------------------------
    @property
    def W_in(self) -> torch.Tensor:
        return self._stack(lambda l: self._mlp(l, "in"))

    @property
    def W_gate(self) -> torch.Tensor | None:
        return self._stack(lambda l: self._mlp(l, "gate"))

    @property
    def b_in(self) -> torch.Tensor:
        return self._stack(lambda l: self._mlp(l, "in", bias=True), (self.cfg.d_mlp,))

    @property
    def W_out(self) -> torch.Tensor:
        return self._stack(lambda l: weight_in_out(self.family_module("mlp_down_proj", l)))

    @property
    def b_out(self) -> torch.Tensor:
        return self._stack(lambda l: bias_of(self.family_module("mlp_down_proj", l)), (self.cfg.d_model,))

    # circuits ----------------------------------------------------------------------
    @property
    def QK(self) -> FactoredMatrix:
        """Each head's QK circuit ``W_Q @ W_K.T``: [n_layers, n_heads, d_model, d_model] (KV heads ungrouped)."""
        return FactoredMatrix(self.W_Q, ungroup(self.W_K, self.cfg.n_heads).transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """Each head's OV circuit ``W_V @ W_O``: [n_layers, n_heads, d_model, d_model] (KV heads ungrouped)."""
        return FactoredMatrix(ungroup(self.W_V, self.cfg.n_heads), self.W_O)

    def all_composition_scores(self, mode: str) -> torch.Tensor:
        """Q-, K- or V-composition of every earlier head into every later head (Elhage et al. 2021).

        Returns [n_layers, n_heads, n_layers, n_heads]; entry [l1, h1, l2, h2] is the score of head
        (l1, h1)'s OV into head (l2, h2)'s query side ("Q"), key side ("K") or OV ("V"), zero unless
        l1 < l2. Same definition and numbers as TransformerLens on the same weights.
        """
        left = self.OV
        if mode == "Q":
            right = self.QK
        elif mode == "K":
            right = self.QK.T
        elif mode == "V":
            right = left
        else:
            raise ValueError(f"all_composition_scores: mode must be 'Q', 'K' or 'V'; got {mode!r}")
        scores = composition_scores(left, right, broadcast_dims=True)
        idx = torch.arange(self.cfg.n_layers, device=scores.device)
        mask = idx[:, None, None, None] < idx[None, None, :, None]
        return torch.where(mask, scores, torch.zeros_like(scores))

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """Unembedding directions of tokens: a token (str, int, 0-d tensor) -> [d_model]; ids [...] -> [..., d_model].

        These are the raw ``W_U`` columns. Dotting them with a residual needs the final norm applied
        first (:meth:`mechkit.ActivationCache.apply_ln_to_stack`, which includes the norm's weight,
        so no weight folding is needed for direct logit attribution).
        """
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        t = torch.as_tensor(tokens, device=self.W_U.device)
        if t.dtype.is_floating_point:
            raise TypeError(f"tokens_to_residual_directions: expected token ids; got a {t.dtype} tensor")
        return self.W_U[:, t].movedim(0, -1)
