"""Where the edge graph lives in a hooked model: the hook points of senders and receivers, and
the hooks that read senders' outputs and read or shift receivers' inputs during one forward.

Senders: ``input`` = layer 0's residual input; a head's output = ``attn.hook_z[..., h, :] @ W_O[h]``
(the output projection's rows of that head, no bias); where a norm follows the attention before the
residual add (``attn_post_norm``: Gemma 2/3, OLMo 2, GLM-4) that output through the norm with its
scale frozen at the whole attention output of the same forward, so the heads still add up to
``hook_attn_out`` (:func:`mechkit.norms.frozen_norm`); an MLP's output = ``hook_mlp_out``.
Receivers: the split inputs ``hook_q_input/k_input/v_input`` (one residual copy per head, or per
KV head), ``hook_mlp_in`` (the MLP's own copy of the residual) and the last layer's
``hook_resid_post`` (what the final norm reads). Every receiver hook returns a tensor that
only that receiver reads, so a gradient taken there flows through that receiver alone.

Shapes: sender outputs ``[senders, batch, pos, d_model]`` (sender-major: a block of senders is one
contiguous matrix for the products of attribution and evaluation); per-layer receiver inputs
``[batch, pos, receivers_of_layer, d_model]`` (queries, keys, values, the MLP).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..hookpoints import terms_not_linear
from ..norms import frozen_norm
from ..sites import act_name
from ..weights import bias_of, weight_in_out
from .graph import Graph

if TYPE_CHECKING:
    from ..model import HookedModel


def point(kind: str, layer: int | None = None) -> str:
    """The hook point name of a graph site (one place that spells names)."""
    if kind == "input":
        return act_name("resid_pre", 0)
    kinds = {"z": "z", "mlp_out": "mlp_out", "attn_out": "attn_out", "q": "q_input", "k": "k_input", "v": "v_input",
             "mlp_in": "mlp_in", "final": "resid_post", "resid_pre": "resid_pre"}
    return act_name(kinds[kind], int(layer))


def check_model(model: HookedModel) -> Graph:
    """The model's graph, or a clear error where heads do not add linearly into the residual."""
    fam = model.hook_map.family
    why = terms_not_linear(fam, post_norm_frozen=True)
    if why:
        raise ValueError(f"edge-level circuits need each head's output to add linearly into the residual stream; "
                         f"{why}, which is not supported yet")
    kinds = set(fam.get("layer_kinds") or ["attn"])
    if kinds != {"attn"}:
        raise ValueError(f"edge-level circuits need attention and an MLP in every layer; this model's layers are "
                         f"{sorted(kinds)} (mixer layers are not graph nodes yet)")
    extra = [n for n in model.points.points if n.endswith(".hook_mixer_out")]
    if extra:
        raise ValueError(f"edge-level circuits need every residual term to be a head or an MLP; this model's layers "
                         f"also add {extra[0]} (a token mixer beside attention), which is not a graph node yet")
    scaled = [n for n in (point("attn_out", 0), point("mlp_out", 0))
              if n in model.points.points and model.points.points[n].scale not in (None, 1.0)]
    if scaled:
        raise ValueError(f"edge-level circuits need each sender's output to be the term added to the residual; "
                         f"{scaled} are scaled module outputs (a residual multiplier), which is not supported yet")
    needed = [point(k, l) for l in range(model.cfg.n_layers) for k in ("q", "k", "v", "mlp_in", "z")]
    missing = [p for p in needed if p not in model.points.points]
    if missing or "attn_out_proj" not in fam:
        raise ValueError(f"edge-level circuits need the hook points {missing[:4] or ['attn_out_proj']}, which hook "
                         f"map {model.hook_map.source} does not define (detection adds split q/k/v inputs where one "
                         f"norm of the residual feeds linear q/k/v projections of separate heads, and hook_mlp_in "
                         f"where one norm feeds the MLP; a map names attn_in_norm, q_proj, ... as hooks/gpt2.toml "
                         f"does)")
    return Graph.from_model(model)


class SenderHooks:
    """Hooks that write every sender's output of one forward into ``self.out`` [S, b, p, d] (detached);
    read it with :meth:`complete`, which refuses a buffer some sender's hook did not fill.

    ``on_value``: ``fn(s0, value [b, p, n, d])`` called for senders ``s0 .. s0 + n`` as they appear,
    instead of storing them; ``needed``: [S] bool, only these senders' groups are hooked (None: all);
    ``pre_norm``: behind a post-norm, record the heads' outputs before it (EAP-IG's senders; they do
    not add up to ``hook_attn_out``).
    """

    def __init__(self, model, graph: Graph, on_value: Callable | None = None, needed: torch.Tensor | None = None,
                 pre_norm: bool = False):
        self.model, self.g = model, graph
        self.on_value = on_value  # fn(slice of senders, value [b, p, n, d]) called as they appear
        self.needed = needed  # [n_senders] bool: only these senders' groups are hooked (None: all)
        self.out: torch.Tensor | None = None
        # read now: inside start_at_layer the layer list is a slice and paths would not resolve
        self.w_o = [weight_in_out(model.family_module("attn_out_proj", l)) for l in range(graph.n_layers)]
        post = "attn_post_norm" in model.hook_map.family and not pre_norm  # pre_norm: heads before the norm
        self.post = [(model.family_module("attn_post_norm", l), bias_of(model.family_module("attn_out_proj", l)))
                     if post else None for l in range(graph.n_layers)]

    def _store(self, s0: int, value: torch.Tensor) -> None:
        if self.on_value is not None:
            self.on_value(s0, value)
            return
        if self.out is None:  # not zero-filled: complete() checks that every sender was written
            b, p, _, d = value.shape
            self.out = value.new_empty(self.g.n_senders, b, p, d)
            self.written = torch.zeros(self.g.n_senders, dtype=torch.bool)
        self.out[s0:s0 + value.shape[2]] = value.detach().permute(2, 0, 1, 3)
        self.written[s0:s0 + value.shape[2]] = True

    def complete(self) -> torch.Tensor:
        """``out`` [S, b, p, d] when every sender was written by the forward; an error otherwise."""
        missing = list(range(self.g.n_senders)) if self.out is None else (~self.written).nonzero()[:, 0].tolist()
        if missing:
            names = [self.g.sender_names[i] for i in missing]
            raise RuntimeError(f"sender outputs of {names[:6]}{' ...' if len(names) > 6 else ''} ({len(names)} of "
                               f"{self.g.n_senders}) were not recorded: their hook points did not run in this forward")
        return self.out

    def _post_norm(self, l: int, res: torch.Tensor) -> torch.Tensor:
        """Heads' outputs [b, p, H, d] through layer ``l``'s post-norm, scale frozen at their sum (+ bias)."""
        if self.post[l] is None:
            return res
        norm, b = self.post[l]
        total = res.sum(2) + (0 if b is None else b.to(res.dtype))
        return frozen_norm(norm, self.model.hook_map.family, total, res.movedim(2, 0)).movedim(0, 2)

    def _wanted(self, lo: int, hi: int) -> bool:
        return self.needed is None or bool(self.needed[lo:hi].any())

    def hooks(self) -> list[tuple[str, Callable]]:
        g, m = self.g, self.model
        hs = [(point("input"), lambda x, hook: self._store(0, x.unsqueeze(2)))] if self._wanted(0, 1) else []
        for l in range(g.n_layers):
            def z_hook(z, hook, l=l):
                w = self.w_o[l].unflatten(0, (m.cfg.n_heads, m.cfg.d_head)).to(z.dtype)  # [H, dh, d]
                self._store(g.head_sender(l, 0), self._post_norm(l, torch.einsum("bphe,hed->bphd", z, w)))
            if self._wanted(g.head_sender(l, 0), g.head_sender(l, 0) + g.n_heads):
                hs.append((point("z", l), z_hook))
            if self._wanted(g.mlp_sender(l), g.mlp_sender(l) + 1):
                hs.append((point("mlp_out", l), lambda x, hook, l=l: self._store(g.mlp_sender(l), x.unsqueeze(2))))
        return hs


def receiver_hooks(model: HookedModel, graph: Graph, fn: Callable,
                   needed: torch.Tensor | None = None) -> list[tuple[str, Callable]]:
    """Hooks on the MLP and logits receivers' inputs; ``fn(layer, part, x)`` returns the tensor that
    receiver reads: part "mlp": x [b, p, d]; "logits" (layer = n_layers): x [b, p, d]. ``needed``:
    [n_receivers] bool; a layer's MLP (or the logits) is hooked only where its receiver is (None: all).
    Queries, keys and values are reached without split points: their gradients by
    :func:`mechkit.split_qkv.split_input_grads`, their shifted inputs by
    :func:`mechkit.split_qkv.shared_inputs` / :func:`~mechkit.split_qkv.shifted_heads`.
    """
    def wanted(sl: slice) -> bool:
        return needed is None or bool(needed[sl].any())

    hs = []
    for l in range(graph.n_layers):
        sl = graph.layer_slice(l)
        if wanted(slice(sl.stop - 1, sl.stop)):
            hs.append((point("mlp_in", l), lambda x, hook, l=l: fn(l, "mlp", x.view_as(x))))
    last = graph.n_layers - 1
    if wanted(slice(graph.logits, graph.logits + 1)):
        hs.append((point("final", last), lambda x, hook: fn(graph.n_layers, "logits", x.view_as(x))))
    return hs
