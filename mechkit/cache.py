"""ActivationCache: recorded activations by hook name, with residual-stream decompositions.

Shapes: residual points [batch, pos, d_model]; per-head points [batch, pos, head, d_head];
patterns [batch, head, q, k]. Stacks returned here are [component, batch, pos, d_model].
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .io import atomic_path
from .weights import bias_of, weight_in_out

if TYPE_CHECKING:
    from .inputs import Batch
    from .model import HookedModel


class ActivationCache(Mapping[str, torch.Tensor]):
    """A read-only mapping ``name -> tensor`` plus helpers that need the model's weights."""

    def __init__(self, store: dict[str, torch.Tensor], model: HookedModel | None = None, batch: Batch | None = None):
        self._store = store
        self.model = model
        self.batch = batch
        self.kv: list | None = None  # HF's key/value cache of the run, when asked for (run_with_cache(keep_kv=True))

    # mapping -----------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._store:
            if self.model is not None:
                self.model.points.resolve(name)  # unknown names get the closest-name error
            raise KeyError(f"'{name}' was not cached; cached names include {list(self._store)[:5]}")
        return self._store[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} points)"

    def to(self, device) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self._store.items()}, self.model, self.batch)

    # residual stream ---------------------------------------------------------
    def _n_layers(self) -> int:
        return self.model.cfg.n_layers

    def accumulated_resid(
        self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False, return_labels: bool = False
    ):
        """Residual stream before each layer up to ``layer`` (default: all, plus the final resid_post).

        Returns [component, batch, pos, d_model] (and labels like ``0_pre``, ``0_mid``, ``final_post``).
        """
        n = self._n_layers() if layer is None else layer
        comps, labels = [], []
        for l in range(n):
            comps.append(self[f"blocks.{l}.hook_resid_pre"])
            labels.append(f"{l}_pre")
            if incl_mid:
                comps.append(self[f"blocks.{l}.hook_resid_mid"])
                labels.append(f"{l}_mid")
        if layer is None or layer == self._n_layers():
            comps.append(self[f"blocks.{self._n_layers() - 1}.hook_resid_post"])
            labels.append("final_post")
        stack = torch.stack(comps)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, apply_ln: bool = False, return_labels: bool = False):
        """The residual stream before ``layer`` (default: final) as a sum of its parts.

        Components: ``embed`` (blocks.0.hook_resid_pre: token and, where the model has them,
        positional embeddings), then ``{l}_attn_out`` and ``{l}_mlp_out`` for each layer below.
        Returns [component, batch, pos, d_model]; the components sum to the residual.
        """
        n = self._n_layers() if layer is None else layer
        comps, labels = [self["blocks.0.hook_resid_pre"]], ["embed"]
        for l in range(n):
            comps += [self[f"blocks.{l}.hook_attn_out"], self[f"blocks.{l}.hook_mlp_out"]]
            labels += [f"{l}_attn_out", f"{l}_mlp_out"]
        stack = torch.stack(comps)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer: int | None = None, apply_ln: bool = False, return_labels: bool = False):
        """Each head's contribution to the residual stream, from ``attn.hook_z`` and W_O.

        Returns [n_layers * n_heads, batch, pos, d_model] for layers below ``layer`` (default all),
        labels ``L{l}H{h}``. Per layer, the heads plus the output projection's bias sum to the
        attention output. Where the map names an ``attn_post_norm`` (Gemma's sandwich norm), that
        norm is applied with its scale frozen at the full output, so the heads sum to
        ``hook_attn_out`` exactly as well.
        """
        m, fam = self.model, self.model.hook_map.family
        n = self._n_layers() if layer is None else layer
        out, labels = [], []
        for l in range(n):
            z = self[f"blocks.{l}.attn.hook_z"]  # [b, p, H, dh]
            o_proj = m.family_module("attn_out_proj", l)
            w = weight_in_out(o_proj).unflatten(0, (m.cfg.n_heads, m.cfg.d_head)).to(z.dtype)  # [H, dh, d_model]
            res = torch.einsum("bphd,hdm->hbpm", z, w)
            if "attn_post_norm" in fam:
                b = bias_of(o_proj)
                total = res.sum(0) + (b if b is not None else 0)
                res = self._frozen_norm(m.family_module("attn_post_norm", l), total, res, center=False)
            out.append(res)
            labels += [f"L{l}H{h}" for h in range(m.cfg.n_heads)]
        stack = torch.cat(out)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack)
        return (stack, labels) if return_labels else stack

    def head_result_bias(self, layer: int) -> torch.Tensor | None:
        """The output projection's bias of ``layer`` ([d_model]), the part of attn_out no head owns."""
        return bias_of(self.model.family_module("attn_out_proj", layer))

    # layer norm --------------------------------------------------------------
    def _frozen_norm(self, norm: torch.nn.Module, total: torch.Tensor, stack: torch.Tensor, center: bool | None = None):
        """Apply ``norm`` to each component of ``stack`` [c, ..., d] linearly: scale (and mean) taken
        from ``total`` [..., d], the full input. Bias is not added (it belongs to no component)."""
        fam = self.model.hook_map.family
        if fam.get("norm_kind") == "none":  # no final norm: the unembedding reads the residual stream
            return stack
        if center is None:
            center = fam.get("norm_kind", "layernorm") == "layernorm"
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-5
        x = total.float()
        if center:
            x = x - x.mean(-1, keepdim=True)
            stack = stack - stack.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
        weight = getattr(norm, "weight", None)
        w = 1.0 if weight is None else weight.float() + float(fam.get("norm_weight_offset", 0.0))
        return (stack.float() * scale * w).to(stack.dtype)

    def apply_ln_to_stack(self, stack: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Apply the final norm to each component of ``stack`` [c, batch, pos, d_model] with its
        scale frozen at the final residual stream (the logit lens of TransformerLens).

        ``(sum of components) -> norm`` equals ``ln_final`` of the summed residual, minus its bias.
        ``layer`` is accepted for TransformerLens compatibility; the final norm is always used.
        """
        total = self[f"blocks.{self._n_layers() - 1}.hook_resid_post"]
        return self._frozen_norm(self.model.family_module("final_norm"), total, stack)

    def logit_lens(self, stack: torch.Tensor) -> torch.Tensor:
        """Components [c, batch, pos, d_model] (already normed) -> their logits [c, batch, pos, d_vocab]."""
        unembed = self.model.family_module("unembed")
        return stack @ weight_in_out(unembed).to(stack.dtype)

    # files -------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """safetensors file (tensors) with the model's config in its metadata; written atomically."""
        meta = {"mechkit": json.dumps(self.model.cfg.to_dict() if self.model is not None else {})}
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().clone().contiguous() for k, v in self._store.items()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, model: HookedModel | None = None) -> ActivationCache:
        return cls(dict(load_file(str(path))), model)
