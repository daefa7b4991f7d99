"""TransformerLens weight views, FactoredMatrix, circuits and composition scores (issue 16)."""

from __future__ import annotations

import pytest
import torch
from factories import FAMILIES, random_hf_model, random_tokens

from mechkit.factored import FactoredMatrix, composition_scores
from mechkit.model import HookedModel
from mechkit.weight_views import ungroup

bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
tl_fm = pytest.importorskip("transformer_lens.FactoredMatrix")

VIEWS = ["W_E", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out", "b_in", "b_out",
         "W_gate"]


def _bridge(family, tok):
    # the bridge replaces modules of the model it wraps: it gets its own copy of the same weights
    return bridge_mod.TransformerBridge.boot_transformers(family, hf_model=random_hf_model(family), tokenizer=tok,
                                                          device="cpu")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_weight_views_equal_the_bridges(family, word_tokenizer):
    m = HookedModel(random_hf_model(family), word_tokenizer)
    b = _bridge(family, word_tokenizer)
    checked = 0
    for name in VIEWS + (["W_pos"] if family == "gpt2" else []):
        ours = getattr(m, name)
        try:
            theirs = getattr(b, name)
        except AttributeError:  # the bridge raises for absent biases; ours are zeros like HookedTransformer's
            assert name.startswith("b_") and torch.count_nonzero(ours) == 0, name
            continue
        if theirs is None:
            assert ours is None, name
            continue
        torch.testing.assert_close(ours, theirs.detach(), atol=0, rtol=0, msg=name)
        checked += 1
    assert checked >= (16 if family == "gpt2" else 9)
    if family == "llama":  # grouped layout: 2 KV heads for 4 query heads, as the bridge keeps them
        assert m.W_K.shape == (3, 2, 64, 16) and m.W_Q.shape == (3, 4, 64, 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_views_reproduce_the_models_q_k_v_and_mlp(family):
    """On every family: resid -> ln1 -> W_Q/W_K/W_V (+b) equals hook_q/k/v before rotary/q-norm, checked
    where the model has neither (gpt2) and through the attention output: z @ W_O + b_O == attn_out."""
    m = HookedModel(random_hf_model(family))
    toks = random_tokens(2, 7)
    _, cache = m.run_with_cache(toks)
    c = m.cfg
    for l in range(c.n_layers):
        z = cache[f"blocks.{l}.attn.hook_z"]
        out = torch.einsum("bphd,hdm->bpm", z, m.W_O[l]) + m.b_O[l]
        if "attn_post_norm" not in m.hook_map.family:
            torch.testing.assert_close(out, cache[f"blocks.{l}.hook_attn_out"], atol=1e-5, rtol=1e-5)
        post = cache[f"blocks.{l}.mlp.hook_post"]
        if "attn_post_norm" not in m.hook_map.family:  # gemma post-norms its MLP output too
            torch.testing.assert_close(post @ m.W_out[l] + m.b_out[l], cache[f"blocks.{l}.hook_mlp_out"],
                                       atol=1e-5, rtol=1e-5)
    assert m.W_Q.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)
    assert m.W_K.shape == m.W_V.shape == (c.n_layers, c.n_kv_heads, c.d_model, c.d_head)
    assert m.W_in.shape == (c.n_layers, c.d_model, c.d_mlp)
    assert (m.W_gate is not None) == c.gated_mlp
    if family == "gpt2":  # no rotary: q from the weights equals hook_q
        x = m.module("transformer.h.0.ln_1")(cache["blocks.0.hook_resid_pre"])
        q = torch.einsum("bpm,hmd->bphd", x, m.W_Q[0]) + m.b_Q[0]
        torch.testing.assert_close(q, cache["blocks.0.attn.hook_q"], atol=1e-5, rtol=1e-5)
    if family == "gpt_neox":  # fused per-head layout: v has no rotary
        x = m.module("gpt_neox.layers.1.input_layernorm")(cache["blocks.1.hook_resid_pre"])
        v = torch.einsum("bpm,hmd->bphd", x, m.W_V[1]) + m.b_V[1]
        torch.testing.assert_close(v, cache["blocks.1.attn.hook_v"], atol=1e-5, rtol=1e-5)
    if family in ("phi3", "llama"):  # fused concat (phi3) and separate (llama) v; gated MLP pre-activation
        x = m.module("model.layers.1.input_layernorm")(cache["blocks.1.hook_resid_pre"])
        v = torch.einsum("bpm,hmd->bphd", x, m.W_V[1])
        torch.testing.assert_close(v, cache["blocks.1.attn.hook_v"], atol=1e-5, rtol=1e-5)


def test_factored_matrix_equals_transformer_lens():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 4, 20, 5, generator=g), torch.randn(3, 4, 5, 20, generator=g)
    ours, theirs = FactoredMatrix(A, B), tl_fm.FactoredMatrix(A, B)
    torch.testing.assert_close(ours.AB, theirs.AB)
    torch.testing.assert_close(ours.BA, theirs.BA)
    torch.testing.assert_close(ours.S, theirs.S, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.norm(), theirs.norm(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.norm(), ours.AB.norm(dim=(-2, -1)), atol=1e-4, rtol=1e-5)
    U, S, V = ours.svd()
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.transpose(-2, -1), ours.AB, atol=1e-4, rtol=1e-4)
    ev, tev = ours.eigenvalues, theirs.eigenvalues
    key = lambda e: torch.sort(e.real * 1e3 + e.imag, dim=-1).values  # noqa: E731
    torch.testing.assert_close(key(ev), key(tev), atol=1e-3, rtol=1e-4)
    M = torch.randn(20, 7, generator=g)
    torch.testing.assert_close((ours @ M).AB, (theirs @ M).AB, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close((M.T @ ours).AB, (M.T @ theirs).AB, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close((ours @ ours).AB, ours.AB @ ours.AB, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(ours.T.AB, ours.AB.transpose(-2, -1))
    torch.testing.assert_close(ours[1, 2].AB, ours.AB[1, 2])
    torch.testing.assert_close(ours[1, 2, 3].AB, theirs[1, 2, 3].AB)
    torch.testing.assert_close(ours.make_even().AB, ours.AB, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close((2 * ours).AB, 2 * ours.AB)
    v = torch.randn(20, generator=g)
    torch.testing.assert_close(ours @ v, ours.AB @ v, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="inner"):
        ours @ torch.randn(19, 3)
    with pytest.raises(ValueError, match="A's last dim"):
        FactoredMatrix(torch.randn(4, 5), torch.randn(4, 5))


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_scores_equal_transformer_lens(mode, word_tokenizer):
    m = HookedModel(random_hf_model("gpt2"), word_tokenizer)
    b = _bridge("gpt2", word_tokenizer)
    ours = m.all_composition_scores(mode)
    theirs = b.all_composition_scores(mode).scores
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-6, rtol=1e-5)
    assert ours.shape == (3, 4, 3, 4) and ours[1, :, 0].abs().sum() == 0 and ours[0, :, 2].min() > 0
    torch.testing.assert_close(m.QK.AB, b.QK.AB.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m.OV.AB, b.OV.AB.detach(), atol=1e-6, rtol=1e-5)


def test_gqa_circuits_use_ungrouped_kv_heads():
    m = HookedModel(random_hf_model("llama"))
    assert m.OV.shape == m.QK.shape == (3, 4, 64, 64)
    # query heads 0 and 1 share KV head 0: same W_V, so their OV differs only through W_O
    wk = ungroup(m.W_K, 4)
    torch.testing.assert_close(wk[:, 0], wk[:, 1])
    torch.testing.assert_close(m.QK.AB[2, 3], m.W_Q[2, 3] @ m.W_K[2, 1].T)
    s = m.all_composition_scores("K")
    manual = composition_scores(m.OV[0, 2], m.QK.T[1, 3], broadcast_dims=False)
    torch.testing.assert_close(s[0, 2, 1, 3], manual)


def test_tokens_to_residual_directions_and_token_helpers(word_tokenizer):
    m = HookedModel(random_hf_model("gpt2"), word_tokenizer)
    torch.testing.assert_close(m.tokens_to_residual_directions("w7"), m.W_U[:, 7])
    torch.testing.assert_close(m.tokens_to_residual_directions(torch.tensor([[3, 4]])), m.W_U[:, [[3, 4]]].movedim(0, -1))
    assert m.to_single_token("w9") == 9
    with pytest.raises(ValueError, match="2 tokens"):
        m.to_single_token("w9 w10")
    assert m.to_string(torch.tensor([5, 6])) == "w5 w6"
    assert m.to_string(torch.tensor([[5], [6]])) == ["w5", "w6"]
    assert m.get_token_position("w5", "w4 w5 w6 w5") == 2  # BOS at 0
    assert m.get_token_position("w5", "w4 w5 w6 w5", mode="last") == 4
    with pytest.raises(ValueError, match="does not occur"):
        m.get_token_position("w8", "w4 w5")
    c = m.cfg
    assert (c.n_ctx, c.act_fn, c.normalization_type, c.positional_embedding_type, c.n_key_value_heads) == (
        64, "gelu_new", "LN", "standard", 4)
    lc = HookedModel(random_hf_model("llama")).cfg
    assert (lc.normalization_type, lc.positional_embedding_type, lc.gated_mlp, lc.n_key_value_heads) == (
        "RMS", "rotary", True, 2)
    assert HookedModel(random_hf_model("gpt_neox")).cfg.parallel_attn_mlp
    assert not HookedModel(random_hf_model("gpt_neox_seq")).cfg.parallel_attn_mlp
    with pytest.raises(ValueError, match="no learned position"):
        _ = HookedModel(random_hf_model("llama")).W_pos
