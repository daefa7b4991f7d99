"""Features as sites: fused feature patching equals one spliced forward per feature; feature AtP equals
patching where the model is affine downstream; ablation and steering through the usual contexts."""

from __future__ import annotations

import pytest
import torch
from factories import random_hf_model
from test_attribution import linear_gpt2, make_task
from test_sae import random_sae

import mechkit as mk
from mechkit import sae as S
from mechkit.hookpoints import has_mechkit_hooks
from mechkit.sae.features import ablate_features, feature_attribution, feature_patch


def loop_patch(model, task, sae, by, feats, metric):
    """Reference: one forward per patch, the dictionary spliced (error term on) and the clean
    activation of the feature written at hook_sae_acts_post."""
    name = f"{sae.hook_name}.hook_sae_acts_post"
    with S.splice(model, sae):
        _, cache = model.run_with_cache(task.clean_tokens, names=[name], attention_mask=task.clean_mask)
    clean = cache[name]
    out = []
    cells = [(None, f) for f in feats] if by == ("feature",) else [(p, f) for p in range(task.clean_tokens.shape[1])
                                                                    for f in feats]
    for pos, f in cells:
        def write(a, hook, _p=pos, _f=f):
            a = a.clone()
            if _p is None:
                a[..., _f] = clean[..., _f]
            else:
                a[:, _p, _f] = clean[:, _p, _f]
            return a
        with torch.no_grad(), S.splice(model, sae), model.hooks({name: write}):
            out.append(metric(model(task.corrupt_tokens, attention_mask=task.corrupt_mask)).mean())
    return torch.stack(out).reshape(-1 if by == ("feature",) else (task.clean_tokens.shape[1], len(feats)))


@pytest.mark.parametrize("family,arch,hook", [("gpt2", "topk", "blocks.1.hook_resid_post"),
                                              ("llama", "jumprelu", "blocks.1.hook_resid_post"),
                                              ("gemma2", "standard", "blocks.1.hook_resid_post"),
                                              ("llama", "standard", "blocks.1.attn.hook_z")])
def test_fused_feature_patching_equals_loop(family, arch, hook):
    m = mk.load(random_hf_model(family))
    kw = {"k": 6} if arch == "topk" else {}
    if hook.endswith("hook_z"):  # [batch, pos, heads, d_head] flattened to heads * d_head = 64
        kw["reshape_activations"] = "hook_z"
    sae = random_sae(arch, hook=hook, scale=0.3, **kw)
    task = make_task(n=2, T=5, changed=(1, 3))
    metric = mk.metrics.logit_diff(task, normalise=False)
    _, c = m.run_with_cache(task.clean_tokens, names=[hook])
    active = (sae.encode(c[hook]) > 0).flatten(0, -2).any(0).nonzero()[:, 0]
    feats = active[:: max(1, len(active) // 6)][:6].tolist()  # features that fire: their patches matter
    for by in (("feature",), ("pos", "feature")):
        r = feature_patch(m, task, sae, by=by, features=feats, metric=metric, progress=False, max_batch_tokens=40)
        ref = loop_patch(m, task, sae, by, feats, metric)
        assert (r.values - ref).abs().max() <= 1e-5, by
        assert (ref - r.baselines["corrupt"]).abs().max() > 1e-4  # the patches matter
    assert not has_mechkit_hooks(m.hf_model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_feature_patching_runs_from_each_chunks_first_change(family):
    """A patched run equals the base run before the first position its patch changes (attention is
    causal): each chunk runs only from there (the base run's keys and values before it), which skips the
    positions clean and corrupted prompts share (before position 3 here) and, by (pos, feature), those
    before the patched one. Values equal one spliced forward per patch; a user's hook turns it off."""
    from mechkit.hookpoints import get_module

    m = mk.load(random_hf_model(family))
    sae = random_sae("topk", hook="blocks.1.hook_resid_post", scale=0.3, k=6)
    task = make_task(n=2, T=7, changed=(3, 5))
    n, T, p0 = 2, 7, 3
    metric = mk.metrics.logit_diff(task, normalise=False)
    _, cc = m.run_with_cache(task.clean_tokens, names=[sae.hook_name])
    _, cr = m.run_with_cache(task.corrupt_tokens, names=[sae.hook_name])
    moved = (sae.encode(cc[sae.hook_name]) != sae.encode(cr[sae.hook_name])).flatten(0, -2).any(0).nonzero()[:, 0]
    feats = moved[:6].tolist() + [int(f) for f in range(96) if f not in moved][:2]  # 2 that change nothing
    seen = []
    handle = get_module(m.hf_model, m.hook_map.family["layers"])[-1].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        for by in (("feature",), ("pos", "feature")):
            seen.clear()
            r = feature_patch(m, task, sae, by=by, features=feats, metric=metric, progress=False,
                              max_batch_tokens=n * T)  # one patch per chunk
            base_runs, runs = seen[:2], seen[2:]  # the source and base runs, then the chunks
            assert base_runs == [T, T] and len(runs) == r.values.numel(), seen
            ref = loop_patch(m, task, sae, by, feats, metric)
            assert (r.values - ref).abs().max() <= 1e-5, by
            assert (ref - r.baselines["corrupt"]).abs().max() > 1e-4  # the patches matter
            if by == ("feature",):
                assert max(runs) <= T - p0, runs
            else:
                first = [max(p0, p) for p in range(T) for _ in feats]
                assert all(q <= max(1, T - f) for q, f in zip(runs, first)), runs
                assert max(runs[len(feats) * p0:]) == T - p0  # a patch at p0 runs every later position
        seen.clear()
        with m.hooks([("blocks.0.hook_resid_mid", lambda x, hook: None)]):
            whole = feature_patch(m, task, sae, features=feats, metric=metric, progress=False, max_batch_tokens=n * T)
        assert set(seen) == {T}
    finally:
        handle.remove()
    torch.testing.assert_close(whole.values, loop_patch(m, task, sae, ("feature",), feats, metric), atol=1e-5, rtol=0)
    assert not has_mechkit_hooks(m.hf_model)


def test_feature_attribution_runs_only_positions_after_the_shared_prefix():
    """Feature AtP / RelP: where the clean and corrupted prompts agree (positions 0-2 here) every feature's
    clean - corrupted difference is 0, so the corrupted forward and backward run positions 3.. only (the
    clean run's keys and values before); scores equal those of the run over every position."""
    from mechkit.hookpoints import get_module

    m = mk.load(random_hf_model("llama"))
    sae = random_sae("standard", hook="blocks.1.hook_resid_post", scale=0.3)
    task = make_task(n=2, T=7, changed=(3, 5))
    metric = mk.metrics.logit_diff(task, normalise=False)
    seen = []
    handle = get_module(m.hf_model, m.hook_map.family["layers"])[-1].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        for method in ("atp", "relp"):
            seen.clear()
            short = feature_attribution(m, task, sae, by=("pos", "feature"), method=method, metric=metric, progress=False)
            assert seen == [7, 4], seen
            with m.hooks([("blocks.0.hook_resid_mid", lambda x, hook: None)]):
                whole = feature_attribution(m, task, sae, by=("pos", "feature"), method=method, metric=metric,
                                            progress=False)
            assert float(whole.values.abs().max()) > 0
            torch.testing.assert_close(short.values, whole.values, atol=1e-6 * float(whole.values.abs().max()), rtol=0)
            assert float(short.values[:3].abs().max()) == 0.0
    finally:
        handle.remove()
    assert not has_mechkit_hooks(m.hf_model)


def test_feature_patching_transcoder_and_spliced_site():
    m = mk.load(random_hf_model("qwen3"))
    tc = random_sae("transcoder", d_out=64, hook="blocks.1.mlp.hook_in", apply_b_dec_to_input=False,
                    hook_name_out="blocks.1.hook_mlp_out", scale=0.3)
    task = make_task(n=2, T=5)
    metric = mk.metrics.logit_diff(task, normalise=False)
    feats = [0, 5, 9, 40]
    ref = loop_patch(m, task, tc, ("feature",), feats, metric)
    with S.splice(m, tc):
        r = feature_patch(m, task, site="blocks.1.mlp.hook_in", features=feats, metric=metric, progress=False)
    assert (r.values - ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="no dictionary is spliced"):
        feature_patch(m, task, site="blocks.1.mlp.hook_in", metric=metric, progress=False)


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_feature_atp_equals_patching_on_a_linearised_model(kind):
    m = linear_gpt2()
    if kind == "sae":
        sae = random_sae("standard", hook="blocks.1.hook_resid_pre", scale=0.3).double()
    else:
        sae = random_sae("skip_transcoder", d_out=64, hook="blocks.1.mlp.hook_in", apply_b_dec_to_input=False,
                         hook_name_out="blocks.1.hook_mlp_out", scale=0.3).double()
    task = make_task()
    metric = mk.metrics.logit_diff(task, normalise=False)
    for by in (("feature",), ("pos", "feature")):
        ap = feature_patch(m, task, sae, by=by, metric=metric, progress=False)
        ref = ap.values.double() - ap.baselines["corrupt"]
        assert ref.abs().max() > 1e-3
        for method in ("atp", "relp"):
            at = feature_attribution(m, task, sae, by=by, method=method, metric=metric, progress=False)
            assert at.axes == ap.axes and at.labels == ap.labels
            assert (at.values.double() - ref).abs().max() <= 1e-5, (by, method)


def test_ablation_modes():
    m = mk.load(random_hf_model("gpt2"))
    sae = random_sae("standard", scale=0.3)
    ids = make_task().clean_tokens
    _, c = m.run_with_cache(ids, names=[sae.hook_name])
    x = c[sae.hook_name]
    a = sae.encode(x)
    f = [int(a.sum((0, 1)).argmax())]
    means = S.features.feature_means(m, sae, ids)
    for mode, kw, target in (("zero", {}, 0.0), ("clamp", {"value": 4.0}, 4.0), ("mean", {"means": means},
                                                                                   float(means[f[0]]))):
        with ablate_features(m, sae, f, mode=mode, **kw):
            _, cache = m.run_with_cache(ids, names=[f"{sae.hook_name}.hook_sae_output"])
        expect = x + (target - a[..., f[0]:f[0] + 1]) * sae.W_dec[f[0]]
        assert torch.allclose(cache[f"{sae.hook_name}.hook_sae_output"], expect, atol=1e-5), mode
    assert not has_mechkit_hooks(m.hf_model)


def test_feature_steering_add_and_clamp_through_steering_apply_and_files(tmp_path, word_tokenizer):
    m = mk.load(random_hf_model("gpt2"), tokenizer=word_tokenizer)
    sae = random_sae("jumprelu", scale=0.3)
    ids = make_task().clean_tokens
    f = [3, 11]
    add = mk.steering.FeatureSteering.from_dictionary(m, sae, f, coefficients=[2.0, -1.0])
    _, c = m.run_with_cache(ids, names=[sae.hook_name])
    x = c[sae.hook_name]

    def written(st, strength=1.0):
        with st.apply(m, strength=strength):
            _, cache = m.run_with_cache(ids, names=[sae.hook_name])
        return cache[sae.hook_name]
    assert torch.allclose(written(add, 0.5), x + 0.5 * (2.0 * sae.W_dec[3] - sae.W_dec[11]), atol=1e-5)
    clamp = mk.steering.FeatureSteering.from_dictionary(m, sae, f, mode="clamp", values=[5.0, 0.0])
    with ablate_features(m, sae, f, mode="clamp", value=[5.0, 0.0]):  # the spliced dictionary, clamped
        _, cache = m.run_with_cache(ids, names=[f"{sae.hook_name}.hook_sae_output"])
    assert torch.allclose(written(clamp), cache[f"{sae.hook_name}.hook_sae_output"], atol=1e-5)
    # files: saved, reloaded, same effect; generate under it
    for st in (add, clamp):
        st.save(tmp_path / "s.safetensors")
        back = mk.steering.load(tmp_path / "s.safetensors", model=m)
        assert type(back).__name__ == "FeatureSteering" and torch.allclose(written(back), written(st))
    with clamp.apply(m):
        m.generate(["w5 w6"], max_new_tokens=2, do_sample=False)
    assert not has_mechkit_hooks(m.hf_model)
    with pytest.raises(ValueError, match="clamping needs"):
        mk.steering.FeatureSteering.from_dictionary(m, random_sae("topk", k=3), f, mode="clamp", values=1.0)


def test_sae_sites_in_activation_and_attribution_patch():
    m = linear_gpt2()
    sae = random_sae("standard", hook="blocks.1.hook_resid_pre", scale=0.3).double()
    task = make_task()
    with S.splice(m, sae):
        ap = mk.activation_patch(m, task, sites="sae:blocks.1.hook_resid_pre", normalise=False, progress=False)
        at = mk.attribution_patch(m, task, sites="sae:blocks.1.hook_resid_pre", normalise=False, progress=False)
    ref = feature_patch(m, task, sae, normalise=False, progress=False)
    assert ap.axes == ("feature",) and torch.equal(ap.values, ref.values)
    assert (at.values.double() - (ap.values.double() - ap.baselines["corrupt"])).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="no dictionary is spliced"):
        mk.activation_patch(m, task, sites="sae:blocks.1.hook_resid_pre", progress=False)
    with pytest.raises(ValueError, match="no site family 'xyz'"):
        mk.activation_patch(m, task, sites="xyz:blocks.1", progress=False)


def test_feature_patch_refuses_equal_baselines_and_unsupported_options():
    """Normalising by equal clean/corrupted baselines would give nan for every feature: refused, like
    activation_patch; sweep options feature_patch does not implement are refused by name."""
    m = linear_gpt2()
    sae = random_sae("standard", hook="blocks.1.hook_resid_pre", scale=0.3).double()
    task = make_task()
    same = mk.tasks.base.PatchingTask(**{**task.__dict__, "corrupt_tokens": task.clean_tokens,
                                         "corrupt_mask": task.clean_mask})
    with pytest.raises(ValueError, match="clean and corrupted baselines are equal"):
        feature_patch(m, same, sae, progress=False)
    raw = feature_patch(m, same, sae, normalise=False, progress=False)
    assert torch.isfinite(raw.values).all()
    opts = mk.SweepOptions(max_batch_tokens=40, progress=False)
    torch.testing.assert_close(feature_patch(m, task, sae, options=opts).values,
                               feature_patch(m, task, sae, max_batch_tokens=40, progress=False).values)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        feature_patch(m, task, sae, checkpoint_dir="x", progress=False)
    with pytest.raises(TypeError, match="feature_patch"):
        feature_patch(m, task, sae, bogus=1)
