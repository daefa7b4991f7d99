"""AtP / RelP / IG against activation patching: exact on a linear model, finite differences,
IG completeness, result conventions, and clean-up after errors."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from factories import random_hf_model, random_tokens
from torch import nn

import mechkit as mk
from mechkit.attribution import attribution_patch, lrp
from mechkit.hookpoints import has_mechkit_hooks
from mechkit.tasks.base import PatchingTask


def make_task(n=3, T=6, seed=0, changed=(2,)):
    clean = random_tokens(n, T, seed=seed)
    corrupt = clean.clone()
    for j, p in enumerate(changed):
        corrupt[:, p] = random_tokens(n, 1, seed=seed + 1 + j)[:, 0]
    mask = torch.ones_like(clean)
    return PatchingTask(clean, corrupt, mask, mask.clone(), torch.arange(3, 3 + n), torch.arange(50, 50 + n),
                        [""] * n, [""] * n)


def reference_patch(model, task, hook_template, index_fn, shape, metric):
    """One forward per cell: clean activation written into the corrupted run at that cell;
    returns M_patched - M_corrupt (fp64 model, so no rounding to speak of)."""
    L = model.cfg.n_layers
    names = [hook_template.format(l=l) for l in range(L)]
    _, cache = model.run_with_cache(task.clean_tokens, names=names)
    with torch.no_grad():
        base = metric(model(task.corrupt_tokens)).mean()
    out = torch.zeros((L,) + shape, dtype=torch.float64)
    for l in range(L):
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, len(shape)).tolist():
            def write(x, hook, _idx=idx, _n=names[l]):
                x = x.clone()
                sel = index_fn(_idx)
                x[sel] = cache[_n][sel]
                return x
            with torch.no_grad(), model.hooks({names[l]: write}):
                out[(l, *idx)] = metric(model(task.corrupt_tokens)).mean() - base
    return out


def linear_gpt2():
    """GPT-2 with identity activation, norms removed and q/k zeroed (uniform causal attention):
    the metric is affine in every site, so AtP and RelP must equal activation patching."""
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=3, n_embd=64, n_head=4, n_inner=96, vocab_size=211, n_positions=64,
                        activation_function="linear", initializer_range=0.1, bos_token_id=0, eos_token_id=0)
    hf = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval()
    d = cfg.n_embd
    with torch.no_grad():
        for blk in hf.transformer.h:
            blk.attn.c_attn.weight[:, : 2 * d] = 0
            blk.attn.c_attn.bias[: 2 * d] = 0
            blk.ln_1, blk.ln_2 = nn.Identity(), nn.Identity()
        hf.transformer.ln_f = nn.Identity()
    return mk.load(hf)


CELLS = {  # site -> (hook, index of one cell, cell shape), per (layer, pos) / (layer, head) / (layer, neuron)
    "resid_pre": ("blocks.{l}.hook_resid_pre", lambda i: (slice(None), i[0]), (6,)),
    "attn_out": ("blocks.{l}.hook_attn_out", lambda i: (slice(None), i[0]), (6,)),
    "mlp_out": ("blocks.{l}.hook_mlp_out", lambda i: (slice(None), i[0]), (6,)),
    "z": ("blocks.{l}.attn.hook_z", lambda i: (slice(None), slice(None), i[0]), (4,)),
    "neuron": ("blocks.{l}.mlp.hook_post", lambda i: (slice(None), slice(None), i[0]), (96,)),
}


@pytest.fixture(scope="module")
def linear_model():
    return linear_gpt2()


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out", "z"])
def test_linear_model_atp_relp_ig_equal_activation_patching(linear_model, site):
    m, task = linear_model, make_task()
    metric = mk.metrics.logit_diff(task, normalise=False)
    hook, index_fn, shape = CELLS[site]
    ref = reference_patch(m, task, hook, index_fn, shape, metric)
    assert ref.abs().max() > 1e-3  # the corruption matters
    for method in ("atp", "relp", "ig"):
        r = attribution_patch(m, task, sites=site, method=method, metric=metric, ig_steps=2, progress=False,
                              rules=lrp.ALL_RULES)
        assert (r.values.double() - ref).abs().max() <= 1e-5, method


def test_linear_model_against_mechkit_patching(linear_model):
    patching = pytest.importorskip("mechkit.patching")
    m, task = linear_model, make_task()
    for site in ("resid_pre", "mlp_out", "neuron"):
        ap = patching.activation_patch(m, task, sites=site, progress=False, normalise=False)
        ref = ap.values.double() - ap.baselines["corrupt"]
        for method in ("atp", "relp"):
            r = attribution_patch(m, task, sites=site, method=method, progress=False, normalise=False)
            assert r.axes == ap.axes and r.labels == ap.labels
            assert (r.values.double() - ref).abs().max() <= 1e-5, (site, method)
        # normalised units agree too
        rn = attribution_patch(m, task, sites=site, method="atp", progress=False)
        apn = patching.activation_patch(m, task, sites=site, progress=False)
        scale = abs(apn.baselines["clean"] - apn.baselines["corrupt"])
        assert (rn.values.double() - apn.values.double()).abs().max() * scale <= 1e-5


def _smooth_model():
    """A nonlinear fp64 GPT-2 with weights large enough that the corruption moves the metric."""
    torch.manual_seed(1)
    cfg = tf.GPT2Config(n_layer=3, n_embd=64, n_head=4, n_inner=96, vocab_size=211, n_positions=64,
                        initializer_range=0.15, bos_token_id=0, eos_token_id=0)
    return mk.load(tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval())


def test_atp_matches_finite_differences():
    """AtP's cell score is the directional derivative of M along (clean - corrupt) at that cell."""
    m, task = _smooth_model(), make_task(changed=(1, 3))

    def metric(logits):  # smooth: log-probability of the answer
        return logits[:, -1].log_softmax(-1).gather(1, task.answer_ids.view(-1, 1))[:, 0]

    r = attribution_patch(m, task, sites="resid_pre", method="atp", metric=metric, progress=False)
    _, clean = m.run_with_cache(task.clean_tokens, names=lambda n: n.endswith("hook_resid_pre"))
    _, corr = m.run_with_cache(task.corrupt_tokens, names=lambda n: n.endswith("hook_resid_pre"))
    eps = 1e-4
    checked = 0
    for layer, pos in [(0, 1), (0, 3), (1, 3), (2, 3), (2, 5)]:
        name = f"blocks.{layer}.hook_resid_pre"
        delta = clean[name][:, pos] - corr[name][:, pos]

        def shifted(s, name=name, pos=pos, delta=delta):
            def write(x, hook):
                x = x.clone()
                x[:, pos] = x[:, pos] + s * delta
                return x
            with torch.no_grad(), m.hooks({name: write}):
                return metric(m(task.corrupt_tokens)).mean().item()
        fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
        assert abs(r.values[layer, pos].item() - fd) <= 1e-6 + 1e-4 * abs(fd), (layer, pos, fd)
        checked += abs(fd) > 1e-4
    assert checked >= 3


def test_integrated_gradients_complete_and_relp_differs():
    """IG over layer 0's resid (all positions) sums to M_clean - M_corrupt; on a nonlinear
    model RelP is not AtP (the rules do change the backward pass)."""
    m, task = _smooth_model(), make_task(changed=(1, 3))
    ig = attribution_patch(m, task, sites="resid_pre", method="ig", ig_steps=12, progress=False, normalise=False)
    gap = ig.baselines["clean"] - ig.baselines["corrupt"]
    assert abs(gap) > 1e-3
    assert abs(ig.values[0].sum().item() - gap) <= 5e-3 * abs(gap) + 1e-6
    atp = attribution_patch(m, task, sites="resid_pre", method="atp", progress=False, normalise=False)
    relp = attribution_patch(m, task, sites="resid_pre", method="relp", progress=False, normalise=False)
    assert (atp.values - relp.values).abs().max() > 1e-4
    no_rules = attribution_patch(m, task, sites="resid_pre", method="relp", rules=(), progress=False,
                                 normalise=False)
    assert torch.equal(no_rules.values, atp.values)  # RelP differs from AtP only by its rules
    assert not has_mechkit_hooks(m.hf_model)


def test_reductions_and_axes():
    m = mk.load(random_hf_model("llama"))
    task = make_task()
    full = attribution_patch(m, task, sites="z", by=("layer", "pos", "head"), method="relp", progress=False)
    heads = attribution_patch(m, task, sites="z", method="relp", progress=False)
    assert heads.axes == ("layer", "head") and heads.labels["head"] == ["H0", "H1", "H2", "H3"]
    assert torch.allclose(full.values.sum(1), heads.values, atol=1e-5)
    swapped = attribution_patch(m, task, sites="z", by=("layer", "head", "pos"), method="relp", progress=False)
    assert torch.allclose(swapped.values, full.values.transpose(1, 2), atol=1e-6)
    neur = attribution_patch(m, task, sites="neurons", method="atp", progress=False)
    assert neur.axes == ("layer", "neuron") and neur.shape == (3, 96)
    layer_only = attribution_patch(m, task, sites="mlp_out", by="layer", method="atp", progress=False)
    per_pos = attribution_patch(m, task, sites="mlp_out", method="atp", progress=False)
    assert torch.allclose(layer_only.values, per_pos.values.sum(1), atol=1e-5)


def test_errors_leave_no_hooks():
    m = mk.load(random_hf_model("gpt2"))
    task = make_task()
    with pytest.raises(ValueError, match="unknown sites"):
        attribution_patch(m, task, sites="resid")
    with pytest.raises(ValueError, match="by="):
        attribution_patch(m, task, sites="mlp_out", by=("layer", "head"))
    with pytest.raises(ValueError, match="unknown method"):
        attribution_patch(m, task, method="lrp")

    def bad_metric(logits):
        raise RuntimeError("metric failed")
    with pytest.raises(RuntimeError, match="metric failed"):
        attribution_patch(m, task, method="relp", metric=bad_metric, rules=lrp.ALL_RULES, progress=False)
    assert not has_mechkit_hooks(m.hf_model)
    assert m.hf_model.config._attn_implementation == "sdpa"
    assert all("forward" not in mod.__dict__ for _, mod in lrp.norm_modules(m))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_relp_same_under_sdpa_and_eager(family):
    """The rules act on module instances, not on the attention kernel: RelP is the same under
    sdpa and eager attention (and with the AH rule, which runs mechkit's attention function)."""
    task = make_task()
    sdpa = mk.load(random_hf_model(family, attn="sdpa"))
    eager = mk.load(random_hf_model(family, attn="eager"))
    for rules in (lrp.DEFAULT_RULES, lrp.ALL_RULES):
        a = attribution_patch(sdpa, task, sites="resid_pre", method="relp", rules=rules, progress=False,
                              normalise=False)
        b = attribution_patch(eager, task, sites="resid_pre", method="relp", rules=rules, progress=False,
                              normalise=False)
        assert torch.allclose(a.values, b.values, atol=1e-5, rtol=1e-4)
        assert a.values.abs().max() > 0


@pytest.mark.parametrize("method", ["atp", "relp", "ig"])
def test_prompt_batches_give_the_same_scores(method):
    """``batch_size`` splits the prompts (uneven last batch): the scores and baselines are the
    unbatched ones, for the default metric and for one that binds the clean run (KL)."""
    from mechkit.patching.metrics import kl_to_clean

    m = mk.load(random_hf_model("gpt2"))
    task = make_task(n=5, changed=(1, 3))
    for metric_fn, sites in ((None, "resid_pre"), (kl_to_clean, "neurons")):
        # raw scores: this random model's clean-corrupted gap is ~1e-4, so normalising would amplify
        # float rounding of the baselines (batches compute them in other groupings) 10^4-fold
        kw = dict(sites=sites, method=method, ig_steps=2, progress=False, normalise=False)
        whole = attribution_patch(m, task, metric=metric_fn and metric_fn(task), **kw)
        batched = attribution_patch(m, task, metric=metric_fn and metric_fn(task), batch_size=2, **kw)
        assert batched.meta["batch_size"] == 2 and whole.meta["batch_size"] == 5
        torch.testing.assert_close(batched.values, whole.values, atol=1e-5, rtol=1e-4)
        for k in ("clean", "corrupt"):
            assert batched.baselines[k] == pytest.approx(whole.baselines[k], rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="cannot be split by prompt"):
        attribution_patch(m, task, metric=lambda logits: logits[:, -1, 3], batch_size=2, progress=False)
    with pytest.raises(ValueError, match="positive number"):
        attribution_patch(m, task, batch_size=0, progress=False)
    assert not has_mechkit_hooks(m.hf_model)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_attribution_runs_only_positions_after_the_shared_prefix(name):
    """IOI's clean and corrupted prompts agree up to the subject's second mention: there every
    activation difference is 0, so after the clean run (which keeps its keys and values) the corrupted
    and interpolated runs compute only the later positions. Scores equal those of the runs that compute
    every position (a user's hook turns the shortcut off); per position they are 0 before p0."""
    from mechkit.hookpoints import get_module

    m = mk.load(name)
    task = mk.tasks.ioi(m.tokenizer, n=3, seed=4)
    T = task.clean_tokens.shape[1]
    p0 = int(((task.clean_tokens != task.corrupt_tokens) | (task.clean_mask != task.corrupt_mask)).any(0).float().argmax())
    assert 0 < p0 < T - 1
    seen = []

    def count(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])
    handle = get_module(m.hf_model, m.hook_map.family["layers"])[-1].register_forward_pre_hook(count, with_kwargs=True)
    runs = [("resid_pre", "atp", {}), ("z", "relp", {}), ("neurons", "atp", {}), ("attn_out", "ig", {"ig_steps": 2})]
    try:
        for sites, method, kw in runs:
            seen.clear()
            short = attribution_patch(m, task, sites=sites, by=None, method=method, progress=False, **kw)
            assert seen.count(T) == 1 and set(seen) == {T, T - p0}, (sites, method, seen)
            with m.hooks([("blocks.0.hook_resid_mid", lambda x, hook: None)]):
                whole = attribution_patch(m, task, sites=sites, by=None, method=method, progress=False, **kw)
            scale = float(whole.values.abs().max())
            torch.testing.assert_close(short.values, whole.values, atol=1e-5 * scale, rtol=0, msg=(sites, method))
            if "pos" in short.axes:
                assert float(short.values[:, :p0].abs().max()) == 0.0
    finally:
        handle.remove()
    assert not has_mechkit_hooks(m.hf_model)
