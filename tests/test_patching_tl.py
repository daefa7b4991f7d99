"""Activation patching agrees with TransformerLens's patching functions on the same weights."""

from __future__ import annotations

import pytest
import torch
from factories import random_hf_model, random_tokens

import mechkit as mk
from mechkit.model import HookedModel
from mechkit.patching import activation_patch, logit_diff
from mechkit.tasks.base import PatchingTask

bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
tl_patching = pytest.importorskip("transformer_lens.patching")


def equal_length_task(n=3, T=6, vocab=211):
    clean, corrupt = random_tokens(n, T, vocab, seed=3), random_tokens(n, T, vocab, seed=4)
    mask = torch.ones(n, T, dtype=torch.long)
    ans, wrong = torch.randint(1, vocab, (2, n), generator=torch.Generator().manual_seed(5))
    return PatchingTask(clean, corrupt, mask, mask.clone(), ans, wrong, [], [])


def _models(name, tok):
    if name == "gpt2":
        # the bridge replaces modules of the model it wraps: it gets its own copy of the same weights
        return HookedModel(random_hf_model("gpt2"), tok), random_hf_model("gpt2")
    if name not in mk.list_models():
        pytest.skip(f"bundled model {name} has no weights in mechkit/models yet")
    return mk.load(name, dtype="float32"), mk.load(name, dtype="float32").hf_model


@pytest.mark.parametrize("name", ["gpt2", "tiny-gpt2"])
def test_resid_pre_and_head_out_by_pos_agree_with_transformer_lens(name, word_tokenizer):
    m, hf_copy = _models(name, word_tokenizer)
    bridge = bridge_mod.TransformerBridge.boot_transformers("gpt2", hf_model=hf_copy, tokenizer=m.tokenizer,
                                                            device="cpu")
    task = equal_length_task(vocab=m.cfg.d_vocab)
    metric = logit_diff(task)

    def tl_metric(logits):
        return metric(logits).mean()

    _, clean_cache = bridge.run_with_cache(task.clean_tokens)
    tl_resid = tl_patching.get_act_patch_resid_pre(bridge, task.corrupt_tokens, clean_cache, tl_metric)
    tl_heads = tl_patching.get_act_patch_attn_head_out_by_pos(bridge, task.corrupt_tokens, clean_cache, tl_metric)
    ours_resid = activation_patch(m, task, sites="resid_pre", metric=metric, normalise=False, progress=False)
    ours_heads = activation_patch(m, task, sites="z", by=("layer", "pos", "head"), metric=metric, normalise=False,
                                  progress=False)
    torch.testing.assert_close(ours_resid.values, torch.as_tensor(tl_resid).detach().float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_heads.values, torch.as_tensor(tl_heads).detach().float(), atol=1e-4, rtol=0)
    assert ours_resid.values.std() > 1e-3  # the sweep measures something
