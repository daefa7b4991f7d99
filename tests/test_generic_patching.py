"""Patching any hook point by name, TransformerLens's generic_activation_patch habit (issue 16)."""

from __future__ import annotations

import pytest
import torch
from factories import random_hf_model, random_tokens

import mechkit as mk
from mechkit.model import HookedModel
from mechkit.patching import logit_diff
from mechkit.tasks.base import PatchingTask


def _task(n=3, T=6):
    clean, corrupt = random_tokens(n, T, seed=3), random_tokens(n, T, seed=4)
    mask = torch.ones(n, T, dtype=torch.long)
    ans, wrong = torch.randint(1, 211, (2, n), generator=torch.Generator().manual_seed(5))
    return PatchingTask(clean, corrupt, mask, mask.clone(), ans, wrong, [], [])


@pytest.fixture(scope="module")
def setup():
    if "tiny-gpt2" not in mk.list_models():
        return HookedModel(random_hf_model("gpt2")), _task()
    m = mk.load("tiny-gpt2")
    full = mk.tasks.ioi(m.tokenizer, n=64, seed=0)
    keep = (full.clean_mask.all(1) & full.corrupt_mask.all(1)).nonzero().flatten()[:3]  # one length, no padding
    return m, PatchingTask(full.clean_tokens[keep], full.corrupt_tokens[keep], full.clean_mask[keep],
                           full.corrupt_mask[keep], full.answer_ids[keep], full.wrong_ids[keep], [], [])


def _loop(m, task, name_of, index_of, layers, sizes, metric):
    """Reference: one corrupted run per patch, the clean activation written at one index."""
    _, clean = m.run_with_cache(task.clean_tokens, names=[name_of(l) for l in layers])
    out = torch.zeros(len(layers), *sizes)
    for li, l in enumerate(layers):
        for j in range(sizes[0]):
            def patch(x, hook, l=l, j=j):
                ix = index_of(j)
                x[ix] = clean[name_of(l)][ix]
                return x
            out[li, j] = metric(m.run_with_hooks(task.corrupt_tokens, fwd_hooks=[(name_of(l), patch)])).mean()
    return out


def test_any_hook_name_equals_the_reference_loop(setup):
    m, task = setup
    metric = logit_diff(task)
    T = task.clean_tokens.shape[1]
    res = mk.activation_patch(m, task, sites="blocks.{l}.ln1.hook_normalized", layers=[0, 1], metric=metric,
                              normalise=False, progress=False)
    assert res.axes == ("layer", "pos") and res.values.shape == (2, T)
    ref = _loop(m, task, lambda l: f"blocks.{l}.ln1.hook_normalized", lambda j: (slice(None), j), [0, 1], (T,),
                metric)
    torch.testing.assert_close(res.values, ref, atol=1e-4, rtol=1e-5)
    assert (res.values - res.baselines["corrupt"]).abs().max() > 0.1  # the sweep measures something
    # a named site kind's hook name is that site kind
    a = mk.activation_patch(m, task, sites="blocks.{l}.hook_resid_pre", metric=metric, normalise=False, progress=False)
    b = mk.activation_patch(m, task, sites="resid_pre", metric=metric, normalise=False, progress=False)
    assert torch.equal(a.values, b.values)


def test_one_layer_hook_name_and_opt_in_result(setup):
    m, task = setup
    metric = logit_diff(task)
    res = mk.activation_patch(m, task, sites="blocks.2.attn.hook_result", metric=metric, normalise=False,
                              progress=False)
    assert res.values.shape == (1, m.cfg.n_heads) and res.labels["layer"] == ["2"]
    by_z = mk.activation_patch(m, task, sites="z", layers=[2], metric=metric, normalise=False, progress=False)
    torch.testing.assert_close(res.values, by_z.values, atol=1e-5, rtol=1e-5)  # result is linear in z
    scores = mk.activation_patch(m, task, sites="blocks.1.attn.hook_attn_scores", by=("layer", "head"),
                                 metric=metric, normalise=False, progress=False)
    pattern = mk.activation_patch(m, task, sites="pattern", layers=[1], metric=metric, normalise=False, progress=False)
    torch.testing.assert_close(scores.values, pattern.values, atol=1e-5, rtol=1e-5)  # whole rows: same softmax
    with pytest.raises(ValueError, match="names layer 2"):
        mk.activation_patch(m, task, sites="blocks.2.attn.hook_result", layers=[1], progress=False)
    with pytest.raises(KeyError, match="unknown hook point"):
        mk.activation_patch(m, task, sites="blocks.{l}.ln1.hook_normalised", progress=False)
    with pytest.raises(ValueError, match="per-layer point"):
        mk.activation_patch(m, task, sites="ln_final.hook_scale", progress=False)


def test_transformer_lens_scalar_metric(setup):
    m, task = setup
    per_prompt = logit_diff(task)

    def tl_metric(logits):  # TransformerLens style: one number for the batch
        return per_prompt(logits).mean()

    a = mk.activation_patch(m, task, sites="blocks.{l}.hook_mlp_out", metric=tl_metric, progress=False)
    b = mk.activation_patch(m, task, sites="mlp_out", metric=per_prompt, normalise=False, progress=False)
    torch.testing.assert_close(a.values, b.values, atol=1e-6, rtol=1e-6)
