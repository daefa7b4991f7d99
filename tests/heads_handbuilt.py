"""A 2-layer attention-only GPT-2 whose weights are set by hand: L0H0 is a previous-token head,
L1H0 an induction head (reading L0H0's copy of the previous token), L0H1 and L1H1 attend
uniformly (zero query/key weights). Used by the head-score tests.

Residual layout (d_model 128): dims [0, V) token one-hot, [V, V + P) position one-hot,
[V + P, 2V + P) previous-token copy, dim 127 a balance coordinate holding minus the sum of the
others, so every residual vector has mean 0 and the same norm at every position: LayerNorm
(weight 1, bias 0) then only rescales by a constant, and large query/key scales make attention
sharp. MLPs are zero (weights and biases), so the blocks are attention-only.
"""

from __future__ import annotations

import torch
import transformers as tf

V, P, D, H = 20, 48, 128, 2
DH = D // H
TOK, POS, PREV, BAL = 0, V, V + P, D - 1


def handbuilt_induction_model(q_scale: float = 3.0) -> tf.GPT2LMHeadModel:
    cfg = tf.GPT2Config(n_layer=2, n_embd=D, n_head=H, n_inner=4 * D, vocab_size=V, n_positions=P,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    m = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for ln in [m.transformer.ln_f] + [b.ln_1 for b in m.transformer.h] + [b.ln_2 for b in m.transformer.h]:
            ln.weight.fill_(1.0)
        wte, wpe = m.transformer.wte.weight, m.transformer.wpe.weight
        for t in range(V):
            wte[t, TOK + t], wte[t, BAL] = 1.0, -1.0
        for p in range(P):
            wpe[p, POS + p], wpe[p, BAL] = 1.0, -1.0
        # layer 0, head 0: query at position p looks for the key carrying position p - 1
        a0 = m.transformer.h[0].attn
        Wq, Wk, Wv = a0.c_attn.weight[:, :D], a0.c_attn.weight[:, D:2 * D], a0.c_attn.weight[:, 2 * D:]
        for p in range(P - 1):
            Wq[POS + p + 1, p] = q_scale   # query p+1 -> head dim p
            Wk[POS + p, p] = q_scale       # key p -> head dim p
        sigma0 = (6 / 128) ** 0.5  # std of a layer-0 input (entries 1, 1, -2): LayerNorm divides by it
        for t in range(V):
            Wv[TOK + t, t] = 1.0           # value = current token one-hot
            a0.c_proj.weight[t, PREV + t] = sigma0  # write the copy with entry ~1 in the residual
            a0.c_proj.weight[t, BAL] = -sigma0
        # layer 1, head 0: query = current token, key = previous-token copy
        a1 = m.transformer.h[1].attn
        Wq, Wk = a1.c_attn.weight[:, :D], a1.c_attn.weight[:, D:2 * D]
        for t in range(V):
            Wq[TOK + t, t] = q_scale + 1
            Wk[PREV + t, t] = q_scale + 1
            a1.c_attn.weight[TOK + t, 2 * D + t] = 1.0  # value: the key's token; output to the logits
            a1.c_proj.weight[t, TOK + t] = 4.0  # the copied token dominates the logits
    return m
