"""Head and neuron ablation: zero / mean / resample equal hand-computed replacements of
attn.hook_z (and mlp.hook_post), positions under padding and KV-cached generate, cleanup."""

from __future__ import annotations

import pytest
import torch
from factories import random_hf_model, random_tokens

import mechkit as mk
from mechkit.hookpoints import has_mechkit_hooks
from mechkit.interventions import ablate

HEADS = [(0, 1), (1, 2), (1, 0)]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return mk.load(random_hf_model(request.param))


def _hand(model, x, repl_by_layer, mask=None):
    """Logits and z of ``x`` with z[..., h, :] replaced by hand: repl_by_layer[l] = (heads, fn(z) -> z_new)."""
    def make(l):
        heads, fn = repl_by_layer[l]
        def hook(z, hook):
            z = z.clone()
            z[:, :, heads] = fn(z)[:, :, heads]
            return z
        return hook
    return model(x, attention_mask=mask) if not repl_by_layer else _run(model, x, mask, {
        f"blocks.{l}.attn.hook_z": make(l) for l in repl_by_layer})


def _run(model, x, mask, hooks):
    with model.hooks(hooks):
        return model(x, attention_mask=mask)


def _ref_z(model, ref, mask=None):
    _, cache = model.run_with_cache(ref, attention_mask=mask, names=lambda n: n.endswith("hook_z"))
    return cache


def _by_layer(heads):
    out = {}
    for l, h in heads:
        out.setdefault(l, []).append(h)
    return out


def test_zero_ablation_equals_hand(model):
    x = random_tokens(3, 10, seed=1)
    with ablate(model, heads=HEADS, how="zero"):
        got = model(x)
    want = _hand(model, x, {l: (hs, torch.zeros_like) for l, hs in _by_layer(HEADS).items()})
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, model(x))


@pytest.mark.parametrize("per_position", [True, False])
def test_mean_ablation_equals_hand(model, per_position):
    x, ref = random_tokens(3, 10, seed=1), random_tokens(6, 12, seed=2)
    cache = _ref_z(model, ref)
    repl = {}
    for l, hs in _by_layer(HEADS).items():
        zr = cache[f"blocks.{l}.attn.hook_z"]  # [6, 12, H, dh]
        mean = zr.mean(0)[:10] if per_position else zr.mean((0, 1)).expand(10, -1, -1)
        repl[l] = (hs, lambda z, _m=mean: _m.expand_as(z))
    with ablate(model, heads=HEADS, how="mean", reference=ref, per_position=per_position):
        got = model(x)
    torch.testing.assert_close(got, _hand(model, x, repl), atol=1e-5, rtol=1e-5)


def test_resample_ablation_equals_hand(model):
    x, ref = random_tokens(4, 10, seed=1), random_tokens(3, 12, seed=2)
    seed = 7
    perm = torch.randperm(3, generator=torch.Generator().manual_seed(seed))
    rows = perm[torch.arange(4) % 3]
    cache = _ref_z(model, ref)
    repl = {l: (hs, lambda z, _l=l: cache[f"blocks.{_l}.attn.hook_z"][rows, :10])
            for l, hs in _by_layer(HEADS).items()}
    with ablate(model, heads=HEADS, how="resample", reference=ref, seed=seed):
        got = model(x)
    torch.testing.assert_close(got, _hand(model, x, repl), atol=1e-5, rtol=1e-5)


def test_mean_per_position_uses_position_ids_under_left_padding(model):
    """A left-padded reference row contributes at its real positions; a left-padded input row gets the
    mean of its own position ids. Checked against the unpadded computation row by row."""
    ref = random_tokens(4, 8, seed=2)
    ref_mask = torch.ones_like(ref)
    ref_mask[0, :3] = 0  # row 0 is 5 real tokens, left-padded
    x = random_tokens(2, 6, seed=3)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    cache = _ref_z(model, ref, ref_mask)
    hs = {l: hs for l, hs in _by_layer(HEADS).items()}
    means = {}
    for l in hs:
        zr = cache[f"blocks.{l}.attn.hook_z"]
        pos_sum = zr[1:].sum(0).clone()  # rows 1..3: positions 0..7
        pos_sum[:5] += zr[0, 3:]           # row 0: real positions 0..4 sit at columns 3..7
        cnt = torch.full((8,), 3.0)
        cnt[:5] += 1
        means[l] = pos_sum / cnt[:, None, None]
    with ablate(model, heads=HEADS, how="mean", reference=ref, reference_mask=ref_mask):
        got = model(x, attention_mask=mask)
    for b, start in [(0, 0), (1, 2)]:
        xb = x[b:b + 1, start:]
        n = xb.shape[1]
        repl = {l: (h, lambda z, _m=means[l][:n]: _m.expand_as(z)) for l, h in hs.items()}
        torch.testing.assert_close(got[b:b + 1, start:], _hand(model, xb, repl), atol=1e-4, rtol=1e-4)


def test_neuron_zero_and_mean(model):
    x, ref = random_tokens(2, 9, seed=1), random_tokens(3, 9, seed=2)
    _, cache = model.run_with_cache(ref, names=["blocks.1.mlp.hook_post"])
    mean = cache["blocks.1.mlp.hook_post"].mean(0)  # [9, d_mlp]

    def hand(post, hook):
        post = post.clone()
        post[:, :, [3, 5]] = mean[:, [3, 5]]
        return post
    with ablate(model, neurons=[(1, 3), (1, 5)], how="mean", reference=ref):
        got = model(x)
    torch.testing.assert_close(got, _run(model, x, None, {"blocks.1.mlp.hook_post": hand}), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["mean", "resample"])
def test_generate_kv_cache_matches_full_recompute(model, how):
    """Decode steps (seq len 1) get the reference value of their own position: cached generate equals
    generate without a cache, under the same ablation, with left-padded prompts."""
    prompts = random_tokens(2, 6, seed=4)
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0
    ref = random_tokens(4, 14, seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with ablate(model, heads=HEADS, how=how, reference=ref):
        a = model.generate(prompts, use_cache=True, **kw)
        b = model.generate(prompts, use_cache=False, **kw)
    plain = model.generate(prompts, use_cache=True, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sa, sb, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a.scores[-1], plain.scores[-1], atol=1e-4)  # the ablation was active
    assert not has_mechkit_hooks(model.hf_model)


def test_preserve_pattern_keeps_own_pattern(model):
    """preserve_pattern: z_h = A_h @ v_ref with the head's own pattern (hand-computed from a cache)."""
    x, ref = random_tokens(2, 8, seed=1), random_tokens(3, 8, seed=2)
    c = model.cfg
    group = c.n_heads // c.n_kv_heads
    _, rc = model.run_with_cache(ref, names=lambda n: n.endswith("attn.hook_v"))
    _, xc = model.run_with_cache(x, names=lambda n: n.endswith("attn.hook_pattern"))
    heads = [(0, 1)]  # layer 0 only: its pattern does not depend on the ablation
    vmean = rc["blocks.0.attn.hook_v"].mean(0).repeat_interleave(group, dim=1)  # [8, H, dh]
    A = xc["blocks.0.attn.hook_pattern"]  # [2, H, 8, 8]
    want_z = torch.einsum("bhqk,khd->bqhd", A, vmean)
    repl = {0: ([1], lambda z: want_z)}
    with ablate(model, heads=heads, how="mean", reference=ref, preserve_pattern=True):
        got = model(x)
    torch.testing.assert_close(got, _hand(model, x, repl), atol=1e-5, rtol=1e-5)


def test_errors_and_cleanup(model):
    w = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    with pytest.raises(ValueError, match="out of range"):
        with ablate(model, heads=[(0, 99)]):
            pass
    with pytest.raises(ValueError, match="needs reference"):
        with ablate(model, heads=[(0, 0)], how="mean"):
            pass
    with pytest.raises(ValueError, match="how must be"):
        with ablate(model, heads=[(0, 0)], how="median", reference=random_tokens(1, 4)):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with ablate(model, heads=[(0, 0)], how="zero"):
            model(random_tokens(1, 4))
            raise RuntimeError("boom")
    assert not has_mechkit_hooks(model.hf_model)
    assert not model.hf_model._forward_pre_hooks
    for k, v in model.hf_model.state_dict().items():
        assert torch.equal(v, w[k])


def test_inside_outer_hooks_context(model):
    """Ablation composes with an outer caching hook: downstream points see the ablated run."""
    x = random_tokens(2, 8, seed=1)
    seen = {}
    with model.hooks({"blocks.2.hook_resid_pre": lambda t, h: seen.__setitem__("r", t.clone())}):
        with ablate(model, heads=[(0, 0), (1, 1)], how="zero"):
            model(x)
    _, cache = model.run_with_cache(x, names=["blocks.2.hook_resid_pre"], hooks={
        "blocks.0.attn.hook_z": lambda z, h: torch.cat([torch.zeros_like(z[:, :, :1]), z[:, :, 1:]], 2),
        "blocks.1.attn.hook_z": lambda z, h: torch.stack([z[:, :, 0], torch.zeros_like(z[:, :, 1]), *z[:, :, 2:].unbind(2)], 2)})
    torch.testing.assert_close(seen["r"], cache["blocks.2.hook_resid_pre"])


def test_preserve_pattern_generate_kv_cache(model):
    """Pattern-preserving ablation reads v at every key position (cached keys included) in generate."""
    prompts = random_tokens(2, 6, seed=4)
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with ablate(model, heads=[(0, 1), (2, 2)], how="mean", reference=random_tokens(3, 12, seed=5),
                preserve_pattern=True):
        a = model.generate(prompts, use_cache=True, **kw)
        b = model.generate(prompts, use_cache=False, **kw)
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sa, sb, atol=1e-4, rtol=1e-4)
