"""mechkit's attention function: eager attention that exposes q, k, v and the pattern per head.

Registered with transformers' ``AttentionInterface`` under the name ``"mechkit"`` together
with the matching ``AttentionMaskInterface`` entry (the eager, additive float mask): without
the mask entry transformers 5.x builds a different mask and logits drift.

It is used only while a per-head point (``attn.hook_q/k/v/pattern``) is requested; otherwise
the model keeps its own attention implementation (sdpa/flash). ``attn.hook_z`` is the input
of the output projection and needs no special attention function.

Shapes seen by hooks (TransformerLens convention):
``hook_q``: [batch, q_pos, n_heads, d_head]; ``hook_k``/``hook_v``: [batch, k_pos, n_kv_heads,
d_head] (grouped-query models keep their KV heads); ``hook_pattern``: [batch, n_heads, q_pos,
k_pos]; ``hook_attn_scores``: [batch, n_heads, q_pos, k_pos], scaled, soft-capped and masked (masked
entries hold the mask's large negative value), the input of the softmax. For rotary models the q and
k seen here are after the rotation (what the pattern is computed from): the maps name them
``hook_rot_q``/``hook_rot_k``, and ``hook_q``/``hook_k`` there are the rotation's inputs (the
``rotary`` side of a map, :func:`mechkit.hf_compat.rotary_inputs`).

Handled: grouped-query attention (KV heads repeated after the hooks), logit soft-capping
(``softcap``, Gemma 2), sliding windows (in the mask transformers builds), the scaling passed
by the module (GPT-2's inverse-layer scaling, Gemma's ``query_pre_attn_scalar``), dropout in
training mode, attention sinks (``s_aux``) as an extra softmax column that is dropped after.
"""

from __future__ import annotations

import torch
from torch import nn

from .hf_compat import register_attention
from .hookpoints import run_attention_handlers

NAME = "mechkit"


def mechkit_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [b, H, q, dh], key/value [b, Hkv, k, dh], additive mask [b, 1, q, >=k]; ``indices``
    [b, q, topk] (DeepSeek-V3.2-style sparse attention hands its indexer's choice to attention
    functions other than eager/SDPA): keys outside each query's top-k are masked, as eager does.

    Returns (z [b, q, H, dh], pattern [b, H, q, k]) like every HF attention function.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q = run_attention_handlers(module, "q", query.transpose(1, 2)).transpose(1, 2)
    k = run_attention_handlers(module, "k", key.transpose(1, 2)).transpose(1, 2)
    v = run_attention_handlers(module, "v", value.transpose(1, 2)).transpose(1, 2)
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : k.shape[-2]]
    indices = kwargs.get("indices")
    if indices is not None:  # sparse attention: each query sees only its indexer's top-k keys [b, q, topk]
        keep = torch.zeros(scores.shape[0], scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=scores.device)
        scores = scores.masked_fill(~keep.scatter_(-1, indices.long(), True)[:, None], torch.finfo(scores.dtype).min)
    scores = run_attention_handlers(module, "scores", scores)
    if s_aux is not None:
        sinks = s_aux.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[-2], 1)
        probs = torch.softmax(torch.cat([scores, sinks.to(scores.dtype)], dim=-1).float(), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores.float(), dim=-1)
    pattern = run_attention_handlers(module, "pattern", probs.to(q.dtype))
    pattern_used = nn.functional.dropout(pattern, p=dropout, training=module.training)
    z = torch.matmul(pattern_used, v).transpose(1, 2).contiguous()
    return z, pattern


_registered = False


def register() -> str:
    """Register mechkit's attention and its mask function (idempotent); returns the name."""
    global _registered
    if not _registered:
        register_attention(NAME, mechkit_attention)
        _registered = True
    return NAME
