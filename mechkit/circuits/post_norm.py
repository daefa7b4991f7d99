"""EAP-IG's reading of edges in models with a norm between the attention and the residual add
(Gemma 2/3's sandwich norm): senders are the heads' outputs *before* the norm, and each receiver
reads every upstream attention layer's output recomputed from its own mixture of heads,

    N_l(P_l + b_l + Σ_{h of layer l, h -> v absent} (ablated_h - current_h)) - N_l(P_l + b_l)

added to what it reads (P_l: the layer's current pre-norm sum of heads, b_l: its output bias, N_l:
its post-norm, run as the model runs it). Non-head senders (the input, MLPs) shift linearly as
everywhere. This is EAP-IG's ``evaluate_graph`` for ``use_normalization_before_and_after`` models
(and so MIB's); mechkit's default instead passes each head through the norm at the scale of the
whole output (:func:`mechkit.norms.frozen_norm`). Selected by ``post_norm_heads="pre_norm"``.

Shapes: sender buffers ``[K, S, n, p, d]`` (row groups K, prompts n), ablated values ``[S, n, p, d]``
or ``[S, 1, 1, d]`` (means), masks ``[K, up, R]`` (absent edges into R receivers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..hf_compat import inner_forward
from ..weights import bias_of

if TYPE_CHECKING:
    from ..model import HookedModel


class PostNorms:
    """Each layer's post-norm (run without hooks), output bias and head senders."""

    def __init__(self, model: HookedModel, graph):
        self.g = graph
        self.norms = [inner_forward(model.family_module("attn_post_norm", l)) for l in range(graph.n_layers)]
        self.bias = [bias_of(model.family_module("attn_out_proj", l)) for l in range(graph.n_layers)]
        self.heads = [slice(graph.head_sender(l, 0), graph.head_sender(l, 0) + graph.n_heads)
                      for l in range(graph.n_layers)]

    @classmethod
    def of(cls, model: HookedModel, graph, post_norm_heads: str) -> PostNorms | None:
        """The post-norms when ``post_norm_heads`` is "pre_norm" and the model has them, else None."""
        if post_norm_heads not in ("frozen", "pre_norm"):
            raise ValueError(f"post_norm_heads must be 'frozen' or 'pre_norm'; got {post_norm_heads!r}")
        if post_norm_heads == "frozen" or "attn_post_norm" not in model.hook_map.family:
            return None
        return cls(model, graph)

    def _normed(self, l: int, x: torch.Tensor) -> torch.Tensor:
        b = self.bias[l]
        return self.norms[l](x if b is None else x + b.to(x.dtype))

    def linear_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` [K, up, R] with the head rows cleared (their shift is :meth:`head_shift`)."""
        out = mask.clone()
        for sl in self.heads:
            if sl.start < mask.shape[1]:
                out[:, sl] = False
        return out

    def head_shift(self, mask: torch.Tensor, A: torch.Tensor, buf: torch.Tensor, cpu: torch.Tensor) -> torch.Tensor | None:
        """[K, R, n·p·d] shift from the heads of every layer upstream (``mask`` [K, up, R] on the device,
        ``cpu`` the same on the CPU for the decisions; ``buf`` the current senders [K, S, n, p, d]; ``A``
        the ablated ones), or None when no head edge is absent."""
        K, up, R = mask.shape
        _, _, n, p, d = buf.shape
        out = None
        for l, sl in enumerate(self.heads):
            if sl.start >= up or not bool(cpu[:, sl].any()):
                continue
            cur = buf[:, sl]  # [K, H, n, p, d]
            total = cur.sum(1)  # [K, n, p, d]: the layer's current pre-norm sum
            diff = (A[sl].to(cur.dtype).expand(-1, n, p, d).unsqueeze(0) - cur).reshape(K, sl.stop - sl.start, -1)
            mix = total.reshape(K, 1, -1) + mask[:, sl].transpose(1, 2).to(cur.dtype) @ diff  # [K, R, n·p·d]
            term = (self._normed(l, mix.view(K, R, n, p, d)) - self._normed(l, total).unsqueeze(1)).reshape(K, R, -1)
            out = term if out is None else out + term
        return out

    def single_deltas(self, A: torch.Tensor, clean: torch.Tensor, senders: torch.Tensor) -> dict[int, torch.Tensor]:
        """Single-edge patching: {row group: its receiver's shift [n, p, d]} for the row groups whose one
        removed edge leaves a head (``senders`` [K] their senders; ``clean`` the clean run's senders
        [S, n, p, d], which is what every sender upstream of the receiver carries in such a row)."""
        out = {}
        for k, s in enumerate(senders.tolist()):
            for l, sl in enumerate(self.heads):
                if sl.start <= s < sl.stop:
                    total = clean[sl].sum(0)  # [n, p, d]
                    out[k] = self._normed(l, total + (A[s] - clean[s]).to(total.dtype)) - self._normed(l, total)
        return out
