"""Agreement with TransformerLens (TransformerBridge over the same in-memory HF weights)."""

from __future__ import annotations

import pytest
import torch
from factories import random_hf_model, random_tokens

from mechkit.model import HookedModel

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
