"""Agreement with TransformerLens (TransformerBridge over the same in-memory HF weights)."""

from __future__ import annotations

import pytest
import torch
from factories import random_hf_model, random_tokens

from mechkit.model import HookedModel
from mechkit.processing import process_weights

bridge_mod = pytest.importorskip("transformer_lens.model_bridge")

POINTS = ["hook_resid_pre", "attn.hook_pattern", "attn.hook_z", "mlp.hook_post", "hook_resid_post"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cache_agrees_with_transformer_lens(family, word_tokenizer):
    hf = random_hf_model(family)
    # the bridge replaces modules of the model it wraps: give it its own copy of the same weights
    bridge = bridge_mod.TransformerBridge.boot_transformers(family, hf_model=random_hf_model(family), tokenizer=word_tokenizer, device="cpu")
    toks = random_tokens(3, 12, seed=1)
    tl_logits, tl_cache = bridge.run_with_cache(toks)
    m = HookedModel(hf, word_tokenizer)
    logits, cache = m.run_with_cache(toks)
    torch.testing.assert_close(logits, tl_logits.detach(), atol=1e-5, rtol=0)
    for l in range(m.cfg.n_layers):
        for p in POINTS:
            name = f"blocks.{l}.{p}"
            torch.testing.assert_close(cache[name], tl_cache[name].detach(), atol=1e-5, rtol=0, msg=name)


def _with_bridge(model_type: str, word_tokenizer, seed: int):
    """mechkit and TransformerLens's Bridge on the same tiny random weights of ``model_type``: checks the
    logits agree; returns (mechkit model, tokens, mechkit logits, mechkit cache, Bridge cache)."""
    from arch_zoo import build

    hf, twin = build(model_type), build(model_type)
    twin.config.architectures = [type(twin).__name__]  # the bridge picks its adapter from the config
    bridge = bridge_mod.TransformerBridge.boot_transformers(model_type, hf_model=twin, tokenizer=word_tokenizer,
                                                            device="cpu")
    toks = random_tokens(2, 9, seed=seed)
    tl_logits, tl_cache = bridge.run_with_cache(toks)
    m = HookedModel(hf, word_tokenizer)
    logits, cache = m.run_with_cache(toks)
    torch.testing.assert_close(logits, tl_logits.detach(), atol=1e-5, rtol=0)
    return m, toks, logits, cache, tl_cache


def _same_points(m, cache, tl_cache, points) -> None:
    for l in range(m.cfg.n_layers):
        for p in points:
            name = f"blocks.{l}.{p}"
            assert name in tl_cache, name
            torch.testing.assert_close(cache[name], tl_cache[name].detach(), atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("model_type", ["mixtral", "olmo2"])
def test_moe_and_post_norm_agree_with_transformer_lens(model_type, word_tokenizer):
    """A mixture-of-experts family (Mixtral) and a post-norm family (OLMo 2), both on a detected map:
    attn_out / mlp_out are what each block adds to the residual stream, as in TransformerLens."""
    m, _, _, cache, tl_cache = _with_bridge(model_type, word_tokenizer, seed=2)
    assert m.cfg.family == f"auto:{model_type}"
    _same_points(m, cache, tl_cache, ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "attn.hook_pattern",
                                      "attn.hook_z", "hook_resid_post"))


OWN_ATTENTION = {  # hand-written maps of models whose attention is their own code: the points each has
    "gpt_neo": ("attn.hook_q", "attn.hook_k", "attn.hook_v"),
    "bloom": ("hook_resid_mid",),
}


@pytest.mark.parametrize("model_type", sorted(OWN_ATTENTION))
def test_own_attention_maps_agree_with_transformer_lens(model_type, word_tokenizer):
    """GPT-Neo (TinyStories' architecture) and BLOOM compute attention in their own code: their hand-written
    maps read the pattern from the attention dropout's output (GPT-Neo: q/k/v from the projections; BLOOM:
    attn_out / mlp_out are the projections whose outputs its modules add to the residual); every point
    equals the Bridge's on the same weights."""
    m, toks, logits, cache, tl_cache = _with_bridge(model_type, word_tokenizer, seed=3)
    assert m.cfg.family == model_type
    processed = process_weights(m)  # TransformerLens's folding and centring keep the predictions
    torch.testing.assert_close(torch.log_softmax(processed(toks).double(), -1), torch.log_softmax(logits.double(), -1),
                               atol=1e-5, rtol=0)
    _same_points(m, cache, tl_cache, ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "attn.hook_pattern",
                                      "attn.hook_z", "mlp.hook_post", "hook_resid_post", *OWN_ATTENTION[model_type]))


@pytest.mark.parametrize("model_type", ["falcon", "mpt", "xglm"])
def test_own_code_heads_agree_with_transformer_lens(model_type, word_tokenizer):
    """Falcon (multi-query, parallel, rotary), MPT (ALiBi) and XGLM run attention in their own code; on
    a detected map mechkit finds their heads by perturbation and their patterns at the softmax / sdpa
    call. z, the pattern (and XGLM's q/k/v) equal the Bridge's, which reimplements their attention, on
    the same weights."""
    m, _, _, cache, tl_cache = _with_bridge(model_type, word_tokenizer, seed=3)
    assert m.cfg.family == f"auto:{model_type}"
    extra = ("attn.hook_q", "attn.hook_k", "attn.hook_v") if model_type == "xglm" else ()
    _same_points(m, cache, tl_cache, ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "attn.hook_z",
                                      "attn.hook_pattern", "hook_resid_post", *extra))


@pytest.mark.parametrize("model_type", ["laguna", "afmoe", "qwen3_next"])
def test_gated_attention_z_agrees_with_transformer_lens(model_type, word_tokenizer):
    """Gated attention (a per-head gate between the attention and the output projection; Qwen3-Next is a
    hybrid, attention on some layers): ``attn.hook_z`` is the output projection's input, the gated heads,
    equal to the Bridge's on every attention layer (fails before: no z)."""
    m, _, _, cache, tl_cache = _with_bridge(model_type, word_tokenizer, seed=4)
    layers = [l for l in range(m.cfg.n_layers) if f"blocks.{l}.attn.hook_z" in cache]
    assert layers
    for l in layers:
        for p in ("attn.hook_z", "attn.hook_pattern", "hook_attn_out"):
            name = f"blocks.{l}.{p}"
            torch.testing.assert_close(cache[name], tl_cache[name].detach(), atol=1e-5, rtol=0, msg=name)
