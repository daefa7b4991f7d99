"""Split q/k/v input points (built by the edge-circuits work) seen from the TransformerLens side (issue 16):
on every mapped family, caching them keeps logits bit-identical and the split model computes the same
q, k, v as the unsplit one; writing one head's copy changes only that head's q."""

from __future__ import annotations

import pytest
import torch
from factories import FAMILIES, random_hf_model, random_tokens

from mechkit.model import HookedModel

TOKS = random_tokens(2, 6, seed=9)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_inputs_give_the_same_q_k_v(family):
    m = HookedModel(random_hf_model(family))
    if "blocks.0.hook_q_input" not in m.points.points:
        pytest.skip(f"family {family} has no split q/k/v input points")
    l = 1
    parts = ("q", "k", "v")
    plain_logits, plain = m.run_with_cache(TOKS, names=[f"blocks.{l}.attn.hook_{p}" for p in parts])
    names = [f"blocks.{l}.hook_{p}_input" for p in parts] + [f"blocks.{l}.attn.hook_{p}" for p in parts]
    logits, split = m.run_with_cache(TOKS, names=names)
    assert torch.equal(logits, plain_logits)
    for p in parts:
        assert torch.equal(split[f"blocks.{l}.attn.hook_{p}"], plain[f"blocks.{l}.attn.hook_{p}"])
    c = m.cfg
    assert split[f"blocks.{l}.hook_q_input"].shape == (*TOKS.shape, c.n_heads, c.d_model)
    assert split[f"blocks.{l}.hook_k_input"].shape == (*TOKS.shape, c.n_kv_heads, c.d_model)

    def scale_head0(x, hook):
        x = x.clone()  # a new tensor: the split points detect a change by identity (see the i16 note)
        x[:, :, 0] = x[:, :, 0] + torch.linspace(-1, 1, x.shape[-1])  # norms are scale-invariant: shift it
        return x
    _, changed = m.run_with_cache(TOKS, names=[f"blocks.{l}.attn.hook_q"],
                                  hooks=[(f"blocks.{l}.hook_q_input", scale_head0)])
    q0, q1 = changed[f"blocks.{l}.attn.hook_q"], plain[f"blocks.{l}.attn.hook_q"]
    assert not torch.allclose(q0[:, :, 0], q1[:, :, 0])
    torch.testing.assert_close(q0[:, :, 1:], q1[:, :, 1:], atol=1e-5, rtol=1e-5)
    m.set_use_split_qkv_input(True)
    assert f"blocks.{l}.hook_v_input" in m.hook_names()
